"""What this rank can read of a tensor, without a collective and without a crash.

Under torch.distributed a parameter may be a DTensor (FSDP2, tensor parallel): reading its
global values would start a collective that the other ranks are not in, so every check of the
NaN watch reads the local shard. FSDP also frees the storage of its gathered parameters between
uses; such a tensor has nothing to read.
"""

from __future__ import annotations

import torch

from torchlens_edu.printing.stats import is_fake, local_shard

__all__ = ["has_values"]


def has_values(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (a shape trace, a memory estimate) and for storage that
    is not allocated now (FSDP frees its gathered parameters between uses): nothing to read."""
    t = local_shard(t)
    if t.is_meta or is_fake(t):
        return False
    return t.layout != torch.strided or t.numel() == 0 or t.untyped_storage().nbytes() > 0
