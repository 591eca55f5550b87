"""What this rank can read of a tensor, without a collective and without a crash.

Under torch.distributed a parameter may be a DTensor (FSDP2, tensor parallel): reading its
global values would start a collective that the other ranks are not in, so every check of the
NaN watch reads the local shard. FSDP also frees the storage of its gathered parameters between
uses; such a tensor has nothing to read.
"""

from __future__ import annotations

import torch

from torchlens_edu.printing.stats import is_fake

__all__ = ["has_values", "local"]


def local(t: torch.Tensor) -> torch.Tensor:
    """The values this rank holds: a DTensor's local shard (reading the global tensor would
    start a collective that the other ranks are not in); any other tensor as it is.

    >>> local(torch.ones(2)).shape
    torch.Size([2])
    """
    shard = getattr(t, "_local_tensor", None)  # DTensor (FSDP2 parameters, tensor parallel)
    return shard if isinstance(shard, torch.Tensor) else t


def has_values(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (a shape trace, a memory estimate) and for storage that
    is not allocated now (FSDP frees its gathered parameters between uses): nothing to read."""
    t = local(t)
    if t.is_meta or is_fake(t):
        return False
    return t.layout != torch.strided or t.numel() == 0 or t.untyped_storage().nbytes() > 0
