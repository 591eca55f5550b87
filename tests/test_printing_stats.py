"""tensor_stats / describe: never raise, and their numbers equal torch's own reductions.

Property tests draw dtype x shape x layout x device (CUDA when present) x special values,
build the tensor with torch (fast), and compare against a plain float64 reference.
"""

from __future__ import annotations

import math
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchlens_edu.printing import TensorStats, describe, tensor_stats
from torchlens_edu.printing import stats as _stats

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
          torch.float8_e5m2]
INTS = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint16, torch.uint32, torch.uint64]
COMPLEX = [torch.complex64, torch.complex128]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
LAYOUTS = ["contiguous", "transposed", "strided", "sparse_coo", "sparse_csr", "quantized",
           "requires_grad"]

fast = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw: st.DrawFn, dtypes: list[torch.dtype] = FLOATS + INTS + COMPLEX,
            layouts: list[str] = LAYOUTS) -> torch.Tensor:
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    layout = draw(st.sampled_from(layouts))
    device = draw(st.sampled_from(DEVICES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if dtype.is_floating_point or dtype.is_complex:
        scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
        offset = draw(st.sampled_from([0.0, 1.0, -50.0]))
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
        x = x.masked_fill(torch.rand(shape, generator=gen) < 0.15, 0.0)
        for special in draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf]),
                                     max_size=3)):
            x = x.masked_fill(torch.rand(shape, generator=gen) < 0.2, special)
        if dtype.is_complex:
            x = torch.complex(x, torch.randn(shape, generator=gen, dtype=torch.float64))
        x = x.to(dtype)
    elif dtype == torch.bool:
        x = torch.rand(shape, generator=gen) < 0.5
    else:
        info = torch.iinfo(dtype)
        hi = min(info.max, 2**62) if draw(st.booleans()) else min(info.max, 100)
        lo = max(info.min, -(2**62)) if hi > 100 else max(info.min, -100)
        x = torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)
    return _layout(x, layout).to(device) if layout != "quantized" else _layout(x, layout)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1)
    if layout == "strided" and x.dim() >= 1:
        return x[..., ::2]
    if layout == "sparse_coo" and x.dtype not in (torch.uint16, torch.uint32, torch.uint64) \
            and not (x.dtype.is_floating_point and x.dtype.itemsize == 1):
        return x.to_sparse()
    if layout == "sparse_csr" and x.dim() == 2 and x.dtype in (torch.float32, torch.float64):
        return x.to_sparse_csr()
    if layout == "quantized" and x.dtype == torch.float32:
        with warnings.catch_warnings():  # torch deprecates quantized dtypes; users still have them
            warnings.simplefilter("ignore", UserWarning)
            return torch.quantize_per_tensor(x.nan_to_num(0, 0, 0), 0.05, 3, torch.qint8)
    if layout == "requires_grad" and x.dtype in (torch.float32, torch.float64):
        leaf = x.nan_to_num(0).requires_grad_()
        return leaf * 2
    return x


def _reference(t: torch.Tensor) -> dict[str, float | int | None]:
    """Plain, obviously-correct float64 statistics over the finite values."""
    if t.is_quantized:
        t = t.dequantize()
    dense = t.detach().to_dense() if t.layout != torch.strided else t.detach()
    dense = dense.cpu()
    x = dense.abs() if dense.is_complex() else dense
    exact_int = not x.is_floating_point() and x.dtype != torch.uint64
    xi = x.to(torch.int64) if exact_int else None
    x = x.to(torch.float64).reshape(-1)
    finite = x[torch.isfinite(x)]
    ref: dict[str, float | int | None] = {
        "numel": x.numel(), "nan": int(x.isnan().sum()), "posinf": int((x == math.inf).sum()),
        "neginf": int((x == -math.inf).sum()), "zeros": int((x == 0).sum()),
        "min": None, "max": None, "mean": None, "std": None,
    }
    if finite.numel():
        ref["min"], ref["max"] = finite.min().item(), finite.max().item()
        if xi is not None:
            ref["min"], ref["max"] = xi.min().item(), xi.max().item()
        ref["mean"] = finite.mean().item()
        ref["std"] = finite.std().item() if finite.numel() > 1 else None
    return ref


def _assert_matches(s: TensorStats, t: torch.Tensor) -> None:
    ref = _reference(t)
    assert s.note.startswith(("", "stats of |z|", "no finite values", "empty")), s.note
    for key in ("numel", "nan", "posinf", "neginf", "zeros", "min", "max"):
        assert getattr(s, key) == ref[key], (key, getattr(s, key), ref[key], t)
    if ref["mean"] is None:
        assert s.mean is None
        return
    size = max(abs(ref["min"]), abs(ref["max"]), 1e-30)  # type: ignore[arg-type]
    assert s.mean == pytest.approx(ref["mean"], rel=1e-5, abs=1e-6 * size)
    if ref["std"] is None:
        assert s.std is None
    else:
        assert s.std == pytest.approx(ref["std"], rel=1e-3, abs=1e-6 * size)


@fast
@given(tensors())
def test_stats_equal_torch_reductions(t: torch.Tensor) -> None:
    _assert_matches(tensor_stats(t), t)


@fast
@given(tensors())
def test_stats_equal_torch_reductions_when_chunked(t: torch.Tensor) -> None:
    # tiny chunks: the merge of partial moments (used for every non-f32/f64 tensor) is exercised
    with mock.patch.object(_stats, "_CHUNK", 5):
        _assert_matches(tensor_stats(t), t)


@fast
@given(tensors([torch.float32, torch.float64], ["contiguous", "transposed", "strided"]))
def test_accelerator_float_path_equals_the_chunked_path(t: torch.Tensor) -> None:
    # float32/64 on CUDA/MPS are read in place (_partial_direct); run it here on tiny chunks
    x = _stats._memory_order(t.detach().cpu())
    if not x.numel():
        return  # tensor_stats answers "empty" before any partials
    direct = _stats._merge(torch.stack([_stats._partial_direct(c) for c in _stats._chunks(x, 5)]))
    chunked = _stats._merge(torch.stack([_stats._partial_in_place(c.double().clone(), True)
                                         for c in _stats._chunks(x, 5)]))
    counts = [_stats._N, _stats._MIN, _stats._MAX, _stats._NAN, _stats._POS, _stats._NEG,
              _stats._ZERO]
    assert direct[counts].tolist() == chunked[counts].tolist()
    scale = max(float(chunked[_stats._MAX].abs().nan_to_num(0, 0, 0)),
                float(chunked[_stats._MIN].abs().nan_to_num(0, 0, 0)), 1.0)
    assert float(direct[_stats._MEAN]) == pytest.approx(float(chunked[_stats._MEAN]),
                                                       rel=1e-5, abs=1e-6 * scale)
    assert float(direct[_stats._M2]) == pytest.approx(float(chunked[_stats._M2]),
                                                     rel=1e-3, abs=1e-6 * scale**2 * t.numel())


@pytest.mark.parametrize(("card_gib", "chunk"), [(4, 2**22), (24, 2**24), (80, 2**26),
                                                 (141, 2**26)])
def test_accelerator_chunks_grow_with_the_card(card_gib: int, chunk: int) -> None:
    # scratch near 1% of the card: few chunks, so few kernel launches, on a large GPU
    card = mock.Mock(total_memory=card_gib * 2**30)
    with mock.patch.object(torch.cuda, "get_device_properties", return_value=card):
        assert _stats._device_chunk(torch.device("cuda", 0)) == chunk
    assert _stats._device_chunk(torch.device("mps")) == _stats._DEVICE_CHUNK


@fast
@given(st.sampled_from([torch.float32, torch.float64]), st.integers(1, 3000),
       st.sampled_from([0.0, 0.3]), st.sampled_from([-3.0, 0.0, 500.0]), st.integers(0, 99))
def test_float_fast_path_equals_torch(dtype: torch.dtype, n: int, zero_share: float,
                                      offset: float, seed: int) -> None:
    # the single-pass CPU path (no NaN/Inf): the one the benchmark and most users hit
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=gen, dtype=dtype) + offset)
    x = x.masked_fill(torch.rand(n, generator=gen) < zero_share, 0.0)
    _assert_matches(tensor_stats(x), x)
    _assert_matches(tensor_stats(x.reshape(-1, 1).expand(-1, 2)), x.reshape(-1, 1).expand(-1, 2))


@fast
@given(tensors(), st.booleans())
def test_describe_never_raises(t: torch.Tensor, stats: bool) -> None:
    line = describe(t, dims={"B": 2, "T": 4}, stats=stats)
    assert "\n" not in line and line.startswith(("Tensor[", "Parameter["))
    assert ("stats failed" not in line) and ("unavailable" not in line)


def test_describe_line_has_every_part() -> None:
    from torchlens_edu.dims import Dims

    x = torch.ones(1, 8, 768).requires_grad_()
    y = (x * 2).detach()
    y[0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    y[0, 1] = 0
    line = describe(y, dims=Dims({"B": 1, "T": 8, "C": 768}))
    assert line.startswith("Tensor[B=1, T=8, C=768] f32 cpu n=6144 (24 KiB) ")
    for part in ("NaN:1", "+Inf:1", "-Inf:1", "zeros:12.5%"):
        assert part in line
    assert "grad_fn=MulBackward0" in describe(x * 2)
    assert "requires_grad" in describe(x)


@pytest.mark.parametrize("make, expected", [
    (lambda: torch.empty(2, 3, device="meta"), "Tensor[2, 3] f32 meta n=6 (24 B) (no data)"),
    (lambda: torch.empty(0, 3), "Tensor[0, 3] f32 cpu n=0 (0 B) empty"),
    (lambda: torch.tensor(2.5), "Tensor[] f32 cpu =2.5 NaN:0"),
    (lambda: torch.zeros(3, dtype=torch.int8), "Tensor[3] i8 cpu n=3 (3 B) all zeros"),
    (lambda: torch.tensor([True, False, True]), "Tensor[3] bool cpu n=3 (3 B) True:2/3"),
    (lambda: torch.full((2,), math.nan), "Tensor[2] f32 cpu n=2 (8 B) NaN:2 (no finite values)"),
    (lambda: torch.tensor([2**62, -1]), "Tensor[2] i64 cpu n=2 (16 B) μ=2.306e+18"),
])
def test_describe_edge_cases(make, expected: str) -> None:
    assert describe(make()).startswith(expected)


def test_fake_tensor_is_metadata_only() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(2, 3)
    assert describe(x) == "Tensor[2, 3] f32 fake:cpu n=6 (24 B) (no data)"
    assert tensor_stats(x).note == "fake tensor: no data"


def test_stats_are_exact_for_big_ints_and_ill_conditioned_floats() -> None:
    s = tensor_stats(torch.tensor([2**62 + 1, 2**62 + 3]))
    assert (s.min, s.max) == (2**62 + 1, 2**62 + 3)  # float64 would round both to 2**62
    # |mean| >> std: a naive sum-of-squares would cancel to noise
    x = 1000 + 1e-3 * torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    assert tensor_stats(x).std == pytest.approx(x.double().std().item(), rel=1e-4)


def test_large_float32_std_is_accurate() -> None:
    # float32 reductions over millions of values drift; the fast path must not
    x = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    s, ref = tensor_stats(x), x.double()
    assert s.std == pytest.approx(ref.std().item(), rel=1e-5)
    assert s.mean == pytest.approx(ref.mean().item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_huge_values_do_not_overflow_the_variance(dtype: torch.dtype) -> None:
    x = torch.tensor([3e37, -3e37, 1e37, math.nan], dtype=dtype)  # squares overflow float32
    ref = x[:3].double()
    assert tensor_stats(x).std == pytest.approx(ref.std().item(), rel=1e-3)


def test_big_tensor_uses_chunks_without_float64_copies() -> None:
    x = torch.randint(-5, 5, (1100, 1000), dtype=torch.int32)  # > one 1M chunk
    s = tensor_stats(x[:, ::3])  # non-contiguous too
    ref = x[:, ::3].double()
    assert s.mean == pytest.approx(ref.mean().item()) and s.std == pytest.approx(ref.std().item())
    biggest = max(c.numel() for c in _stats._chunks(x[:, ::3], _stats._CHUNK))
    assert biggest <= _stats._CHUNK


def test_stats_leave_grad_mode_and_warn_nothing() -> None:
    x = torch.randn(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = tensor_stats(x[:1])  # one element: std undefined, without torch's warning
    assert s.std is None and torch.is_grad_enabled()


def test_non_tensor_input() -> None:
    assert tensor_stats([1, 2]).note == "not a tensor (list)"
    with pytest.raises(TypeError, match=r"takes a torch\.Tensor"):
        describe([1, 2])  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stats_sync_once() -> None:
    x = torch.randn(1000, 300, device="cuda")
    x[0, 0] = math.nan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = tensor_stats(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs  # where each sync came from
    _assert_matches(s, x)


def test_stats_are_invisible_to_active_modes() -> None:
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[str] = []

    class FunctionRecorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    class DispatchRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 5)
    x[0, 0] = math.nan
    with FunctionRecorder(), DispatchRecorder():
        line = describe(x.to(torch.bfloat16))
        calls.clear()  # the .to() above is the user's; describe's own work must not show up
        line = describe(x)
    assert calls == [] and "NaN:1" in line


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensors_summarise_their_components() -> None:
    parts = [torch.randn(2, 3), torch.randn(4, 3)]
    flat = torch.cat([p.reshape(-1) for p in parts])
    for layout in (torch.strided, torch.jagged):
        nested = torch.nested.nested_tensor(parts, layout=layout)
        s = tensor_stats(nested)
        assert s.mean == pytest.approx(flat.mean().item(), abs=1e-6)
        assert describe(nested).startswith("NestedTensor[2 tensors: [2, 3], [4, 3]] f32 cpu μ=")


@fast
@given(tensors())
def test_float32_accumulation_as_on_mps(t: torch.Tensor) -> None:
    # Apple's MPS has no float64: the same code accumulates in float32 there (checked on CPU)
    with mock.patch.object(_stats, "_wide", lambda device: torch.float32):
        s = tensor_stats(t)
    ref = _reference(t)
    assert (s.numel, s.nan, s.posinf, s.neginf) == (ref["numel"], ref["nan"], ref["posinf"],
                                                    ref["neginf"])
    assert (s.mean is None) == (ref["mean"] is None), s.note
