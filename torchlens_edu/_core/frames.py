"""Find the user's line of code: the first frame outside torch and torchlens_edu's machinery.

The bundled models (``torchlens_edu/models``), demos and tests count as *user* code: a learner
stepping through ``gpt2.py`` wants to see ``gpt2.py:57``, not a line of our hooks. So do model
libraries (transformers, x-transformers): their lines are the model's. Tensor-plumbing
libraries do not (einops, einx, opt_einsum, and the ``<string>`` code such libraries generate
and run): ``rearrange(x, ...)`` belongs to the user's line that called it.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from types import FrameType

import torch

# this file is torchlens_edu/_core/frames.py: the package is two folders up
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODELS_DIR = os.path.join(_PACKAGE_DIR, "models") + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
# site-packages can live inside the stdlib folder: libraries there (transformers...) are user code
_SITE_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep
                    for k in ("purelib", "platlib")})
# code compiled without a file: frozen modules, what exec() runs (einx's generated functions,
# dataclasses' __init__), torch.fx's generated forward
_SKIP_PREFIXES = ("<frozen ", "<string>", "<eval_with_key>")
# libraries that move tensors around on behalf of the line that called them
_PLUMBING = ("einops", "einx", "opt_einsum", "torch_einops_utils", "jaxtyping", "beartype",
             "typeguard")
_PLUMBING_DIRS = tuple(os.path.join(site, name) + os.sep
                       for site in _SITE_DIRS for name in _PLUMBING)
_IPYTHON_7_CELL = re.compile(r"<ipython-input-(\d+)-[0-9a-f]+>$")  # IPython 8+ maps its names


def is_user_file(filename: str) -> bool:
    """True for code a learner wrote or reads (their scripts, notebooks, Hugging Face and
    x-transformers models, our bundled models); False for torch, the standard library, our own
    observers and tensor-plumbing libraries (einops, einx, opt_einsum, generated ``<string>``
    code). Called once per file name by the callers that run per op (they cache it).

    >>> is_user_file("<string>"), is_user_file("train.py"), is_user_file(torch.__file__)
    (False, True, False)
    """
    if filename.startswith(_SKIP_PREFIXES):
        return False
    path = os.path.abspath(filename)
    if path.startswith(_MODELS_DIR):
        return True
    if path.startswith((_PACKAGE_DIR + os.sep, _TORCH_DIR, *_PLUMBING_DIRS)):
        return False
    return path.startswith(_SITE_DIRS) or not path.startswith(_STDLIB_DIR)


def is_toolkit_file(filename: str) -> bool:
    """True for torchlens_edu's own machinery (observers, printing), not its bundled models:
    the torch calls made there are ours, not the model's."""
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR + os.sep) and not path.startswith(_MODELS_DIR)


def user_frame(start: FrameType | None = None) -> FrameType | None:
    """The innermost frame that belongs to the user's code, or None."""
    frame: FrameType | None = start if start is not None else sys._getframe(1)
    while frame is not None:
        if is_user_file(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return None


def frame_location(frame: FrameType | None) -> str:
    """``"path/to/file.py:LINE"`` for a frame (``""`` when unknown)."""
    if frame is None:
        return ""
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def user_source() -> str:
    """``"path/to/file.py:LINE"`` of the user's line that is running now (``""`` if none)."""
    return frame_location(user_frame(sys._getframe(1)))


def source_location(filename: str, line: int) -> str:
    """A source line as a learner knows it: ``gpt2.py:57``, or, for an IPython/Jupyter cell,
    ``Cell In[3], line 2`` as IPython's own tracebacks name it.

    >>> source_location("/home/me/project/train.py", 12)
    'train.py:12'
    >>> source_location("<ipython-input-3-5e3c0b8a1f00>", 2)
    'Cell In[3], line 2'
    """
    cell = _IPYTHON_7_CELL.match(filename)
    if cell:
        return f"Cell In[{cell.group(1)}], line {line}"
    ipython = sys.modules.get("IPython")  # only when the program already uses it
    shell = ipython.get_ipython() if ipython is not None else None
    label = getattr(getattr(shell, "compile", None), "format_code_name", lambda _: None)(filename)
    if label:
        return f"{label[0]} {label[1]}, line {line}"
    return f"{os.path.basename(filename)}:{line}"
