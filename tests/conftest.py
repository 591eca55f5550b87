"""Shared fixtures, and one guard for every test: the toolkit never changes global state.

After each test, torch's print options, grad mode, anomaly mode and ``Tensor.__repr__`` must be
exactly what they were before it.
"""

from __future__ import annotations

import os

import pytest
import torch

from torchlens_edu.models import GPT2, GPT2Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
# Tests run on tiny models, in parallel workers on small machines: one intra-op thread per
# worker avoids oversubscription, which made a 20-token generation 100x slower on 2 cores.
torch.set_num_threads(1)


def _global_state() -> tuple:
    opts = torch._tensor_str.PRINT_OPTS
    return (
        (opts.precision, opts.threshold, opts.edgeitems, opts.linewidth, opts.sci_mode),
        torch.is_grad_enabled(),
        torch.is_anomaly_enabled(),
        torch.is_anomaly_check_nan_enabled(),
        torch.Tensor.__repr__,
    )


@pytest.fixture(autouse=True)
def _global_state_is_restored():
    before = _global_state()
    yield
    assert _global_state() == before, "a test (or the toolkit) left global torch state changed"


@pytest.fixture
def tiny_gpt2() -> GPT2:
    """A 2-layer GPT-2 (C=32, nh=2, V=256, ctx=64) with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return GPT2(GPT2Config.preset("tiny")).eval()


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    """Token ids (B=2, T=8) for ``tiny_gpt2``."""
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
