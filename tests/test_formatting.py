"""One writer per kind of number or name (torchlens_edu/_core/formatting.py), and the places
that show them: bytes in binary units, counts as model cards write them, FLOPs with SI prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import torchlens_edu as tle
from torchlens_edu._core.formatting import (
    did_you_mean,
    dtype_name,
    format_bytes,
    format_count,
    format_si,
    short_dtype,
)


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (402_056, "392.6 KiB"),
    (154_389_504, "147.2 MiB"), (6_230_444_800, "5.8 GiB"), (3 * 2**40, "3 TiB"),
])
def test_bytes_use_binary_units(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (8, "8"), (33_920, "33.9K"), (124_439_808, "124.4M"), (163_037_184, "163.0M"),
    (1_557_611_200, "1.6B"), (70_553_706_496, "70.6B"), (2 * 10**12, "2.0T"),
])
def test_counts_read_like_model_cards(n: int, text: str) -> None:
    assert format_count(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (512, "512 FLOP"), (2_150_000, "2.15 MFLOP"), (613_338.5e9, "613 TFLOP"),
    (3.2e15, "3.2 PFLOP"),
])
def test_flops_use_si_prefixes(n: float, text: str) -> None:
    assert format_si(n, "FLOP") == text


def test_one_name_per_dtype() -> None:
    assert [short_dtype(d) for d in (torch.float32, torch.bfloat16, torch.int64, torch.bool,
                                     torch.complex64, torch.float8_e5m2)] == \
        ["f32", "bf16", "i64", "bool", "c64", "f8e5m2"]
    assert dtype_name(torch.float16) == "float16"


def test_did_you_mean_prefers_the_same_letters_in_another_case() -> None:
    assert did_you_mean("c", ["B", "T", "C"], quote=False) == "did you mean C?"
    assert did_you_mean("atention", ["attention", "mlp"]) == "did you mean 'attention'?"
    assert did_you_mean("xyz", ["attention"]) == ""


def test_meta_trace_shows_kib_billions_of_params_and_tflop() -> None:
    with torch.device("meta"):
        head = nn.Linear(65_536, 1_077_000, bias=False)  # 70.6B parameters, never allocated
        small = nn.Linear(8, 50_257)
    row = tle.trace_shapes(head, torch.zeros(1, 65_536), meta=True).to_text(200)
    assert "70.6B params · 141 GFLOP · 4.1 MiB" in row
    row = tle.trace_shapes(small, torch.zeros(2, 8), meta=True).to_text(200)
    assert "452.3K params · 1.61 MFLOP · 392.6 KiB" in row  # (2, 50257) float32: 402,056 bytes


def test_unknown_preset_says_which_one_was_meant() -> None:
    with pytest.raises(ValueError, match=r"unknown print preset 'edo' \(did you mean 'edu'\?\); "
                                         r"choose one of"), tle.printoptions("edo"):
        pass


def test_one_helper_per_job() -> None:
    """No module writes bytes, dtype names, did-you-means or debugger checks on its own again."""
    root = Path(tle.__file__).parent
    own = {"_core/formatting.py", "_core/debugger.py"}
    patterns = {"difflib": "did_you_mean", '"kB"': "format_bytes", '"MB"': "format_bytes",
                '.dtype).removeprefix("torch.")': "dtype_name",
                ".dtype).removeprefix('torch.')": "dtype_name",
                "is_client_connected": "debugger_attached"}
    # aligning two sequences of module calls or ops is another job than suggesting a name
    aligns = {("divergence/align.py", "difflib")}
    found = [f"{path.relative_to(root)}: {pattern} (use {helper})"
             for path in sorted(root.rglob("*.py")) if str(path.relative_to(root)) not in own
             for pattern, helper in patterns.items() if pattern in path.read_text("utf-8")
             and (str(path.relative_to(root)), pattern) not in aligns]
    assert found == []
