"""Loading GPT-2 weights saved by Hugging Face (or OpenAI, or us) into :class:`GPT2`.

Where the weights come from:
- a preset name (``"gpt2"`` ... ``"gpt2-xl"``, or any hub repo id like ``"openai-community/gpt2"``):
  the Hugging Face hub cache (see :mod:`torchlens_edu.models.hub`);
- ``"embedded"``: the small model shipped in ``torchlens_edu/data/embedded/``;
- a directory in Hugging Face layout: ``config.json`` + ``model.safetensors`` (preferred) or
  ``pytorch_model.bin``;
- a single weights file (``.safetensors``, or ``.bin``/``.pt``/``.pth``): the config is read from
  a ``config.json`` beside it, else inferred from the tensor shapes.

How they map: Hugging Face's GPT-2 stores its four projection matrices as ``Conv1D`` weights of
shape ``(in, out)``; ours are ``nn.Linear`` ``(out, in)``, so exactly those four are transposed
(a saved ``state_dict()`` of our own GPT2 is recognised by c_attn's shape and left as it is).
The causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` are not weights and are skipped.
The model is built on the meta device (no memory) and the loaded tensors are assigned into it, so
loading needs about one copy of the weights, not two.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.nn as nn

from torchlens_edu.models import tokenizer as _tokenizer
from torchlens_edu.models.config import GPT2Config
from torchlens_edu.models.devices import resolve_device
from torchlens_edu.models.hub import WeightsNotFoundError, hub_snapshot
from torchlens_edu.models.progress import progress as show_progress

M = TypeVar("M", bound=nn.Module)  # the model class to build: GPT2 (this file never imports it)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight",
                  "mlp.c_fc.weight", "mlp.c_proj.weight")
_SKIPPED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # HF's causal-mask buffers


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as GPT-2: a damaged or foreign file, a bad
    ``config.json``, wrong keys, shapes or dtypes. The message names the file and the key.

    >>> import pathlib, tempfile
    >>> from torchlens_edu.models import GPT2, CheckpointError
    >>> text = pathlib.Path(tempfile.mkdtemp()) / "model.bin"
    >>> _ = text.write_text("not weights")
    >>> try:
    ...     GPT2.from_pretrained(text, progress=False)
    ... except CheckpointError as err:
    ...     print("not a PyTorch checkpoint" in str(err))
    True
    """


def load_pretrained(cls: type[M], name_or_path: str | os.PathLike[str], *,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    progress: bool = True, config: GPT2Config | None = None) -> M:
    """Build ``cls`` (a :class:`GPT2`) with the weights of ``name_or_path``, in eval mode.

    ``device``: None (CPU), ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``. ``dtype``: None keeps
    float32; e.g. ``torch.bfloat16`` halves the memory. ``config`` overrides the checkpoint's.

    >>> from torchlens_edu.models import GPT2
    >>> m = load_pretrained(GPT2, "gpt2", device="auto")  # doctest: +SKIP
    """
    target = resolve_device("cpu" if device is None else device)
    weights, cfg = _resolve(name_or_path)
    if config is None:
        config = cfg if cfg is not None else _config_from_file(weights)
    with show_progress(f"loading {Path(weights).name}", enabled=progress) as advance:
        state = _read_state_dict(weights, advance)
        model = _build(cls, config, state, source=weights, device=target, dtype=dtype)
    # Where the weights came from, as Hugging Face's models record it: get_tokenizer(model)
    # finds the matching tokenizer there ("embedded", or the directory of the weights).
    source = "embedded" if os.fspath(name_or_path) == "embedded" else str(weights)
    cast(Any, model).name_or_path = source  # a GPT2 declares it; M is any nn.Module to mypy
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Where the files are


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[Path, GPT2Config | None]:
    """The weights file to read, and the config from a ``config.json`` next to it (if any)."""
    name = os.fspath(name_or_path)
    if name == "embedded":
        embedded = _tokenizer.EMBEDDED_DIR
        if not embedded.is_dir():
            raise WeightsNotFoundError(f"the embedded model is missing from {embedded}; "
                                       "reinstall torchlens-edu or run scripts/train_tiny.py")
        return _resolve_dir(embedded)
    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_dir(path)
    if path.is_file():
        config_file = path.parent / "config.json"
        return path, config_from_hf(config_file) if config_file.is_file() else None
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth") or (
            os.sep in name and not _looks_like_repo_id(name)):
        raise FileNotFoundError(f"no such file or directory: {path}")
    return _resolve_dir(hub_snapshot(name, WEIGHT_FILES))


def _resolve_dir(directory: Path) -> tuple[Path, GPT2Config | None]:
    config_file = directory / "config.json"
    config = config_from_hf(config_file) if config_file.is_file() else None
    for filename in WEIGHT_FILES:
        if (directory / filename).is_file():
            return directory / filename, config
    if any(directory.glob("*.index.json")):
        raise CheckpointError(f"{directory} holds a sharded checkpoint (*.index.json); "
                              "torchlens-edu loads single-file checkpoints: save it with "
                              "save_pretrained(..., max_shard_size='100GB')")
    raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


# ---------------------------------------------------------------------------------------------
# Config


def config_from_hf(path: str | os.PathLike[str]) -> GPT2Config:
    """A :class:`GPT2Config` from a Hugging Face ``config.json``.

    >>> config_from_hf("gpt2/config.json").n_layer  # doctest: +SKIP
    12
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the model config {path}: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not the object of a "
                              'model config ({"n_layer": 12, "n_head": 12, ...})')
    if raw.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{path} describes a {raw['model_type']!r} model, not GPT-2")
    activation = raw.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh GELU
        raise CheckpointError(f"{path}: activation_function={activation!r}; this GPT-2 "
                              "implements only GPT-2's tanh GELU ('gelu_new')")
    unsupported = {key: raw[key] for key, ok in (("add_cross_attention", False),
                                                  ("scale_attn_by_inverse_layer_idx", False),
                                                  ("scale_attn_weights", True),
                                                  ("tie_word_embeddings", True))
                   if key in raw and raw[key] != ok}
    if unsupported:
        raise CheckpointError(f"{path}: settings this GPT-2 does not implement: {unsupported}")
    context_key = "n_positions" if raw.get("n_positions") is not None else "n_ctx"
    fields = {
        "vocab_size": _field(raw, "vocab_size", int, path),
        "n_positions": _field(raw, context_key, int, path, default=1024),
        "n_embd": _field(raw, "n_embd", int, path),
        "n_layer": _field(raw, "n_layer", int, path),
        "n_head": _field(raw, "n_head", int, path),
        "n_inner": _field(raw, "n_inner", int, path, default=None),
        "layer_norm_epsilon": _field(raw, "layer_norm_epsilon", float, path, default=1e-5),
        "dropout": _field(raw, "resid_pdrop", float, path, default=0.0),
    }
    try:
        return GPT2Config(**fields)
    except ValueError as err:  # "GPT2Config: n_head=0 must be ...": name the file and its key
        message = str(err).removeprefix("GPT2Config: ")
        if message.startswith("n_positions="):
            message = context_key + message.removeprefix("n_positions")
        elif message.startswith("dropout="):
            message = "resid_pdrop" + message.removeprefix("dropout")
        raise CheckpointError(f"{path}: {message}") from err


_MISSING = object()


def _field(raw: dict[str, Any], key: str, kind: type[int] | type[float], path: object, *,
           default: Any = _MISSING) -> Any:
    """``raw[key]`` as an ``int`` or ``float``, or a CheckpointError naming the file and key.
    A JSON null counts as absent (Hugging Face writes ``"n_inner": null``)."""
    value = raw.get(key)
    if value is None:
        if default is _MISSING:
            raise CheckpointError(f"{path} lacks the field {key!r}")
        return default
    accepted = (int,) if kind is int else (int, float)
    if not isinstance(value, accepted) or isinstance(value, bool):
        wanted = "an integer" if kind is int else "a number"
        raise CheckpointError(f"{path}: {key}={value!r} must be {wanted}")
    return kind(value)


def _config_from_file(weights: Path) -> GPT2Config:
    """Infer the config from tensor shapes (the head count from GPT-2's head size of 64)."""
    shapes = _read_shapes(weights)
    get = {_our_key(k): v for k, v in shapes.items() if not _SKIPPED.search(k)}
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        if key not in get:
            raise CheckpointError(f"{weights} is not a GPT-2 checkpoint: it has no {key!r}; "
                                  f"its first keys are {list(shapes)[:5]}")
        if len(get[key]) != 2:
            raise CheckpointError(f"{weights}: {key} has shape {get[key]}; an embedding is a "
                                  "matrix (rows, n_embd)")
    V, C = get["transformer.wte.weight"]
    n_positions = get["transformer.wpe.weight"][0]
    n_layer = len({k.split(".")[2] for k in get if k.startswith("transformer.h.")})
    c_fc = get.get("transformer.h.0.mlp.c_fc.weight", (C, 4 * C))
    inner = c_fc[0] if _linear_layout(shapes) else c_fc[1]
    if C % 64:
        raise CheckpointError(f"cannot infer the number of heads of {weights} (n_embd={C} is not "
                              "a multiple of 64): put its config.json next to it or pass "
                              "config=GPT2Config(...)")
    try:
        return GPT2Config(vocab_size=V, n_positions=n_positions, n_embd=C, n_layer=n_layer,
                          n_head=C // 64, n_inner=None if inner == 4 * C else inner)
    except ValueError as err:  # e.g. no blocks at all: n_layer=0
        raise CheckpointError(f"{weights}: the config inferred from its tensor shapes is "
                              f"impossible ({str(err).removeprefix('GPT2Config: ')}); put its "
                              "config.json next to it") from err


# ---------------------------------------------------------------------------------------------
# Tensors


def _our_key(key: str) -> str:
    """Checkpoint key -> our key: with or without the ``transformer.`` prefix."""
    if key.startswith("transformer.") or key.startswith("lm_head."):
        return key
    return "transformer." + key


def _open_safetensors(weights: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(weights), framework="pt")
    except SafetensorError as err:
        raise _damaged(weights, err) from err


def _read_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    if weights.suffix == ".safetensors":
        f = _open_safetensors(weights)
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    return {k: tuple(v.shape) for k, v in _load_bin(weights).items()}


def _linear_layout(shapes: dict[str, tuple[int, ...]]) -> bool:
    """True when projections are stored ``(out, in)`` like ``nn.Linear`` (a state_dict of our
    GPT2), False for Hugging Face's ``Conv1D`` ``(in, out)``; c_attn's ``3C`` side tells."""
    for key, shape in shapes.items():
        if key.endswith("attn.c_attn.weight") and len(shape) == 2:
            return shape[0] == 3 * shape[1]
    return False


def _read_state_dict(weights: Path, advance: Callable[..., None]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(our key, tensor)`` one tensor at a time, Conv1D weights transposed."""
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError

        f = _open_safetensors(weights)
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

        def get(key: str) -> torch.Tensor:
            try:
                return f.get_tensor(key)
            except SafetensorError as err:
                raise _damaged(weights, err) from err
    else:
        state = _load_bin(weights)
        shapes = {k: tuple(v.shape) for k, v in state.items()}

        def get(key: str) -> torch.Tensor:
            return state.pop(key)  # each original is freed once its (transposed) copy is made

    transpose = not _linear_layout(shapes)
    advance(total=len(shapes))
    for key in shapes:
        tensor = get(key)
        advance()
        if _SKIPPED.search(key):
            continue
        ours = _our_key(key)
        if transpose and ours.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        yield ours, tensor


def _load_bin(weights: Path) -> dict[str, torch.Tensor]:
    _check_torch_file(weights)
    try:
        obj = torch.load(str(weights), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # a broken pickle, not a refused class
            raise _damaged(weights, err) from err
        raise CheckpointError(
            f"{weights} is not a weights-only checkpoint: unpickling it would run code stored in "
            "the file, which torchlens-edu never does. Load it yourself only if you trust its "
            "source, then save the state_dict with safetensors.torch.save_file") from err
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, IndexError) as err:
        # torch's weights-only unpickler reports a broken stream in any of these
        raise _damaged(weights, err) from err
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{weights} does not hold a state_dict (a mapping of names to "
                              f"tensors) but a {type(obj).__name__}")
    return obj


def _check_torch_file(weights: Path) -> None:
    """A ``torch.save`` file is a zip archive (since torch 1.6) or, older, a pickle (``\\x80``)."""
    try:
        with weights.open("rb") as f:
            head = f.read(16)
    except OSError as err:
        raise CheckpointError(f"cannot read {weights}: {err}") from err
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"{weights} is not a PyTorch checkpoint: it starts with {head!r}, "
                              "not with the zip archive torch.save writes. Is it the right file "
                              "(a text file, an HTML error page, a git-lfs pointer)?")


def _damaged(weights: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{weights} is damaged or incomplete (a truncated download?): {err}. "
                           "Delete it and download or save it again")


def _build(cls: type[M], config: GPT2Config, state: Iterator[tuple[str, torch.Tensor]], *,
           source: Path, device: torch.device, dtype: torch.dtype | None) -> M:
    with torch.device("meta"):
        model = cls(config)  # shapes only, no memory
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}
    lm_head: torch.Tensor | None = None
    wrong_shape: list[str] = []
    wrong_dtype: list[str] = []
    unexpected: list[str] = []
    for key, tensor in state:
        if key not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != expected[key]:
            wrong_shape.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {expected[key]}")
            continue
        if not tensor.is_floating_point():
            wrong_dtype.append(f"{key}: {tensor.dtype}")
            continue
        tensor = tensor.to(dtype or torch.float32)
        tensor = tensor.to(device).contiguous()
        if key == "lm_head.weight":
            lm_head = tensor  # tied to wte: checked below, not loaded twice
        else:
            loaded[key] = tensor
    missing = sorted(set(expected) - set(loaded) - {"lm_head.weight"})
    problems = [f"missing keys: {_names(missing)}" if missing else "",
                f"unexpected keys: {_names(unexpected)}" if unexpected else "",
                f"shape mismatches: {'; '.join(wrong_shape[:6])}" if wrong_shape else "",
                f"weights that are not floating point: {'; '.join(wrong_dtype[:6])}"
                if wrong_dtype else ""]
    if any(problems):
        raise CheckpointError(f"{source} does not fit GPT2(" + _short(config) + "): "
                              + " | ".join(p for p in problems if p)
                              + ". Check that config.json belongs to these weights")
    wte = loaded["transformer.wte.weight"]
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise CheckpointError(f"{source}: lm_head.weight differs from transformer.wte.weight; "
                              "GPT-2 ties them, so these weights are not GPT-2's")
    loaded["lm_head.weight"] = wte
    model.load_state_dict(loaded, strict=True, assign=True)
    tied = model.get_submodule("transformer.wte").weight
    model.get_submodule("lm_head").weight = tied  # assign=True replaced wte: tie again
    return model


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _short(config: GPT2Config) -> str:
    return (f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
            f"vocab_size={config.vocab_size}, n_positions={config.n_positions}")
