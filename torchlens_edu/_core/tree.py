"""Walk the nested outputs models return: tensors, tuples, lists, dicts, dataclasses and
Hugging Face ``ModelOutput`` (an OrderedDict subclass that is also a dataclass)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``obj``, depth first, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):  # ModelOutput lands here: its fields are its items
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from iter_tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, field.name))


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Rebuild ``obj`` with ``fn`` applied to every tensor; containers keep their type."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        mapped = {key: map_tensors(fn, value) for key, value in obj.items()}
        if type(obj) is dict:
            return mapped
        if dataclasses.is_dataclass(obj):  # ModelOutput: rebuild through its constructor
            return type(obj)(**mapped)
        return type(obj)(mapped)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(fn, value) for value in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, value) for value in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj)
                   if f.init}
        return dataclasses.replace(obj, **changes)
    return obj
