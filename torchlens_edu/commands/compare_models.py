"""``torchlens-edu compare my_gpt.py:GPT --ref embedded``: where a learner's GPT-2 first
differs from the bundled one, down to the op and the line. (The module is not named
``compare``: no module may be named like a public function, see tests/test_layers.py.)

    torchlens-edu compare my_gpt.py:GPT --ref embedded             # the small shipped model
    torchlens-edu compare my_gpt.py:GPT --ref gpt2 --prompt "Hi"   # real weights (cached)
    torchlens-edu compare my_gpt.py:make_model --ref PATH --backward

``GPT`` is built from the reference's config: with the file's own ``...Config`` dataclass when
it has one (fields such as ``n_embd``, ``block_size`` are filled from the reference's), else
with the reference's :class:`~torchlens_edu.models.GPT2Config`; a function is called as a
factory with that config. The reference's weights are copied in (``copy_weights``), both run on
the prompt, and the report is printed. Exit code 0 when they agree, 1 when they differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import sys
import traceback
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from torchlens_edu._core.formatting import did_you_mean
from torchlens_edu.commands import EXIT_FAILED, EXIT_USAGE, CommandError, _inputs

# a learner's config field -> the GPT2Config field it means (nanoGPT's names first)
_ALIASES = {"block_size": "n_positions", "n_ctx": "n_positions", "n_positions": "n_positions",
            "vocab_size": "vocab_size", "n_embd": "n_embd", "n_layer": "n_layer",
            "n_head": "n_head", "dropout": "dropout", "layer_norm_epsilon": "layer_norm_epsilon",
            "eps": "layer_norm_epsilon", "bias": None}


def register(subparsers: Any) -> None:
    """Add the ``compare`` subcommand to the CLI."""
    parser = subparsers.add_parser(
        "compare", help="find where your GPT-2 first differs from the reference",
        description="Build your model (FILE.py:CLASS or FILE.py:FACTORY) from the reference's "
                    "config, copy the reference's weights into it, run both on a prompt and "
                    "report the first module, op and line where they differ. Exit code 0 when "
                    "they agree, 1 when they differ.")
    parser.add_argument("target", metavar="FILE.py:NAME",
                        help="your model: a class taking a config, or a factory function")
    parser.add_argument("--ref", default="embedded", metavar="gpt2|embedded|PATH",
                        help="the reference GPT-2: a preset from the Hugging Face cache, "
                             "'embedded' (default, shipped with the package) or a checkpoint")
    parser.add_argument("--prompt", type=_inputs.prompt, default="Hello, my name is",
                        help="the text both models read (default: 'Hello, my name is')")
    parser.add_argument("--backward", action="store_true",
                        help="also compare the gradients of every parameter")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build, copy, compare, print; returns the exit code."""
    import torch

    from torchlens_edu._core.console import get_console
    from torchlens_edu.divergence import compare, copy_weights
    from torchlens_edu.models.gpt2 import GPT2
    from torchlens_edu.models.loading import load_pretrained
    from torchlens_edu.models.tokenizer import get_tokenizer

    path, name = _split_target(args.target)
    module = _import_file(path)
    factory = _find(module, name, path)
    reference = load_pretrained(GPT2, args.ref, progress=False).with_attn_impl("explicit")
    model = _build(module, factory, reference.config, args.target)
    copy_weights(reference, model)
    ids = _inputs.prompt_ids(args.prompt, get_tokenizer(args.ref), reference.config)
    idx = torch.tensor([ids], dtype=torch.long)  # (1, T)
    result = compare(model.eval(), reference, idx, backward=args.backward)
    get_console().print(result)
    return 0 if result.agree else EXIT_FAILED


def _split_target(target: str) -> tuple[Path, str]:
    file, colon, name = target.rpartition(":")
    if not colon or not file or not name.isidentifier():
        raise CommandError(f"expected FILE.py:NAME (e.g. my_gpt.py:GPT), got {target!r}",
                           exit_code=EXIT_USAGE)
    path = Path(file)
    if not path.is_file():
        raise CommandError(f"{file}: no such file")
    return path, name


def _import_file(path: Path) -> ModuleType:
    """Import the learner's file as a fresh module; its directory is importable meanwhile."""
    name = f"_torchlens_edu_compare_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CommandError(f"{path}: not a Python file (expected FILE.py:NAME)")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise CommandError(f"{path} does not import: {_where(err, path)}") from err
    finally:
        sys.path.remove(folder)
        sys.modules.pop(name, None)
    return module


def _where(err: BaseException, path: Path) -> str:
    """``Type: message (file.py:LINE)`` with the last line of ``path`` in the traceback."""
    lines = [frame for frame in traceback.extract_tb(err.__traceback__)
             if Path(frame.filename).resolve() == path.resolve()]
    if isinstance(err, SyntaxError) and err.lineno:
        return f"SyntaxError: {err.msg} ({path.name}:{err.lineno})"
    at = f" ({path.name}:{lines[-1].lineno})" if lines else ""
    return f"{type(err).__name__}: {err}{at}"


def _find(module: ModuleType, name: str, path: Path) -> Any:
    found = getattr(module, name, None)
    if found is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)]
        hint = did_you_mean(name, names) or f"it defines: {', '.join(sorted(names)[:8])}"
        raise CommandError(f"{path} has no {name!r}; {hint}")
    if not callable(found):
        raise CommandError(f"{path}:{name} is a {type(found).__name__}, not a class or function "
                           "that builds the model")
    return found


def _learner_config(module: ModuleType, config: Any) -> Any:
    """The learner's own ``...Config`` dataclass, filled from the reference's config, or the
    reference's config itself when the file has none."""
    candidates = [value for key, value in vars(module).items()
                  if key.endswith("Config") and dataclasses.is_dataclass(value)
                  and isinstance(value, type) and value.__module__ == module.__name__]
    if not candidates:
        return config
    own = candidates[0]
    values = {}
    for field in dataclasses.fields(own):
        source = _ALIASES.get(field.name, field.name)
        if source is not None and hasattr(config, source):
            values[field.name] = getattr(config, source)
    return own(**values)


def _build(module: ModuleType, factory: Any, config: Any, target: str) -> Any:
    import torch.nn as nn

    try:
        if inspect.isclass(factory) or inspect.signature(factory).parameters:
            model = factory(_learner_config(module, config))
        else:
            model = factory()
    except Exception as err:
        raise CommandError(f"{target} did not build from the reference's config "
                           f"({type(err).__name__}: {err}); give a factory function "
                           "FILE.py:make_model(config) that returns the model") from err
    if not isinstance(model, nn.Module):
        raise CommandError(f"{target} returned a {type(model).__name__}, not an nn.Module")
    return model
