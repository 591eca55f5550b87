"""pytest speaks tensors: NaN-watched tests, print presets, readable tensor failures.

Registered through the ``pytest11`` entry point, so it loads in every pytest run of an
environment where torchlens_edu is installed. It is therefore inert unless asked: importing it
imports neither torch nor the rest of the toolkit, and a run without its options behaves exactly
as before. Opt in with

    pytest --tle-nan-watch          # every test under the NaN/Inf watch
    pytest --tle-print=edu          # a torch print preset while each test runs
    @pytest.mark.nan_watch(mode="raise", check_inf=True)
    @pytest.mark.print_options("short", precision=2)

and the fixtures ``tle_inspect`` (an ``inspect`` factory that fails the test if hooks are left
behind) and ``nan_watch`` (watch one model for the rest of the test).

One thing is on by default because it only touches the text of a failure that involves tensors:
``assert a == b`` on tensors and ``torch.testing.assert_close`` failures get one-line summaries of
both sides and where they differ. It costs nothing when no tensor failure happens (torch is never
imported by it) and is switched off with ``-o tle_tensor_diffs=false`` (or ``-p no:torchlens_edu``
for the whole plugin).

PYTEST_DONT_REWRITE: this module holds no test assertions. pytest rewrites the plugins it can
reach before they are imported (installed distributions); this one is often imported first by
another route (an editable install, ``PYTHONPATH``, a conftest or test that imports it, the
entry point before ``-p torchlens_edu.pytest_plugin``), and pytest then warned "Module already
imported so cannot be rewritten" into every such run's output.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

_AMBIGUOUS_BOOL = "Boolean value of Tensor with more than one value is ambiguous"


# --- options and markers -----------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("torchlens_edu", "torchlens_edu: tensors in tests")
    group.addoption("--tle-nan-watch", action="store_true", default=False,
                    help="run every test under torchlens_edu's NaN/Inf watch: a non-finite value "
                         "made in any module fails the test with the producer's report")
    group.addoption("--tle-print", metavar="PRESET", default=None,
                    help="torch print options preset while each test runs "
                         "(edu, short, full, default)")
    parser.addini("tle_tensor_diffs", type="bool", default=True,
                  help="summarise both sides of failing tensor comparisons (default: true)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nan_watch(**options): run this test under torchlens_edu's NaN/Inf watch "
                   "(options as for torchlens_edu.watch_nans, e.g. check_inf=False)")
    config.addinivalue_line(
        "markers", "print_options(preset=None, **overrides): torch print options while this "
                   "test runs (as torchlens_edu.printoptions)")
    preset = config.getoption("--tle-print")
    if preset is not None:  # asked for, so importing torch is fine: fail now, not in every test
        from torchlens_edu._core.formatting import did_you_mean
        from torchlens_edu.printing import PRESETS

        if preset not in PRESETS:
            hint = did_you_mean(preset, PRESETS)
            hint = f" ({hint})" if hint else ""
            raise pytest.UsageError(f"--tle-print={preset}: unknown preset{hint}; choose one of "
                                    f"{', '.join(PRESETS)}")


# --- running each test -------------------------------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    diffs = item.config.getini("tle_tensor_diffs")
    try:
        with _test_context(item):
            return (yield)
    except AssertionError as err:
        if diffs:
            _explain_assert_close(err)
            _explain_torch_equal(err)
        raise
    except RuntimeError as err:
        nans = sys.modules.get("torchlens_edu.nans")
        if nans is not None and isinstance(err, nans.NonFiniteError):
            _end_traceback_at(err, getattr(item, "obj", None))  # the report says the rest
        elif diffs and _AMBIGUOUS_BOOL in str(err) and _raised_by_assert(err):
            err.args = (f"{err.args[0]}\n\n(torchlens_edu) `assert a == b` on tensors asks for "
                        "one bool from an elementwise result: use torch.testing.assert_close(a, b) "
                        "or torch.equal(a, b)",)
        raise


@contextmanager
def _test_context(item: pytest.Item) -> Iterator[None]:
    """The print options and NaN watch this test asked for (nothing at all if none)."""
    print_marker = item.get_closest_marker("print_options")
    nan_marker = item.get_closest_marker("nan_watch")
    preset = item.config.getoption("--tle-print")
    watch = nan_marker is not None or item.config.getoption("--tle-nan-watch")
    if print_marker is None and preset is None and not watch:
        yield
        return
    with ExitStack() as stack:
        if print_marker is not None or preset is not None:
            from torchlens_edu.printing import printoptions

            args, kwargs = (print_marker.args, print_marker.kwargs) if print_marker else ((), {})
            if print_marker is None or (not args and "preset" not in kwargs and preset):
                kwargs = {"preset": preset, **kwargs}
            problem = ""
            try:
                stack.enter_context(printoptions(*args, **kwargs))
            except (TypeError, ValueError) as err:  # checked before any option is changed
                problem = str(err)
            if problem:
                pytest.fail(f"@pytest.mark.print_options: {problem}", pytrace=False)
        if watch:
            stack.enter_context(_watch_every_model(**_watch_options(nan_marker)))
        yield


def _watch_options(marker: pytest.Mark | None) -> dict[str, Any]:
    """The marker's options, checked before the test runs: a wrong one fails the test with what
    to write, instead of being ignored until (or unless) the test calls a model."""
    if marker is None:
        return {}
    import inspect

    import torch

    from torchlens_edu._core.formatting import did_you_mean
    from torchlens_edu.nans.watch import watch_nans

    names = [n for n in inspect.signature(watch_nans).parameters if n != "model"]
    usage = ", ".join(f"{n}=..." for n in names)
    if marker.args:
        pytest.fail(f"@pytest.mark.nan_watch takes keyword options only ({usage}), got "
                    f"{', '.join(map(repr, marker.args))}: write e.g. mode={marker.args[0]!r}",
                    pytrace=False)
    for name in marker.kwargs:
        if name not in names:
            hint = did_you_mean(name, names)
            pytest.fail(f"@pytest.mark.nan_watch: unknown option {name!r}"
                        f"{' (' + hint + ')' if hint else ''}; the options are {usage}",
                        pytrace=False)
    try:  # the watch checks its options when made: make one that is never entered
        watch_nans(torch.nn.Identity(), **marker.kwargs)
    except (TypeError, ValueError) as err:
        problem = str(err)
    else:
        return dict(marker.kwargs)
    pytest.fail(f"@pytest.mark.nan_watch: {problem}", pytrace=False)  # outside: no chained error


@contextmanager
def _watch_every_model(**options: Any) -> Iterator[None]:
    """Watch every model the test calls, including models it builds itself.

    Each module that is called and is not inside an already-watched model starts a
    ``watch_nans`` on itself just before its call (so it is a root: the outermost module of that
    forward). That must happen before ``Module._call_impl`` collects the module's hooks, which
    rules out a global forward pre-hook (it runs after the collection, so the watch would miss
    the model's first forward); ``nn.Module.__call__`` is wrapped instead, for this test only.
    """
    import weakref

    import torch

    from torchlens_edu.nans.watch import watch_nans

    module_class = torch.nn.Module
    original = vars(module_class)["__call__"]
    watched: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
    with ExitStack() as stack:

        def call(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            if self not in watched:
                watched.update(self.modules())
                if not any(p.is_meta for p in self.parameters()):  # meta: no values to watch
                    stack.enter_context(watch_nans(self, **options))
            return original(self, *args, **kwargs)

        module_class.__call__ = call  # type: ignore[method-assign]
        try:
            yield
        finally:
            module_class.__call__ = original  # type: ignore[method-assign]


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def tle_inspect() -> Iterator[Callable[..., Any]]:
    """``tle_inspect(model, **kwargs)`` -> ``torchlens_edu.inspect(model, **kwargs)``; at teardown
    the test fails if any hook it added to those models is still there.

    >>> def test_capture(tle_inspect, tiny_gpt2, tiny_ids):  # doctest: +SKIP
    ...     insp = tle_inspect(tiny_gpt2)
    ...     with insp.capture("transformer.h.*.mlp") as cache:
    ...         tiny_gpt2(tiny_ids)
    """
    import torch

    from torchlens_edu.inspector import inspect

    before: list[tuple[Any, dict[str, int]]] = []

    def factory(model: Any, **kwargs: Any) -> Any:
        if isinstance(model, torch.nn.Module):  # anything else gets inspect's own clear error
            before.append((model, hook_counts(model)))
        return inspect(model, **kwargs)

    yield factory
    left = [f"{where}: +{n}" for model, counts in before
            for where, n in _increases(counts, hook_counts(model)).items()]
    if left:
        pytest.fail("hooks left behind on the inspected model(s):\n  " + "\n  ".join(left),
                    pytrace=False)


@pytest.fixture
def nan_watch() -> Iterator[Callable[..., Any]]:
    """``nan_watch(model, **options)`` watches ``model`` for NaN/Inf until the test ends
    (options as for ``torchlens_edu.watch_nans``); returns the active watch.

    >>> def test_training_step(nan_watch, tiny_gpt2, tiny_ids):  # doctest: +SKIP
    ...     nan_watch(tiny_gpt2)
    ...     tiny_gpt2(tiny_ids).logsumexp(-1).mean().backward()
    """
    from torchlens_edu.nans.watch import watch_nans

    with ExitStack() as stack:
        yield lambda model, **options: stack.enter_context(watch_nans(model, **options))


def hook_counts(model: Any) -> dict[str, int]:
    """Hooks now on ``model``: ``{"<module path> <kind>": count}``, module and tensor hooks, plus
    the global module hooks. Compare two snapshots to find what was left behind.

    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> h = m.register_forward_hook(lambda *a: None)
    >>> hook_counts(m)
    {"module '' forward_hooks": 1}
    >>> h.remove()
    """
    from torch.nn.modules import module as torch_module

    counts: dict[str, int] = {}
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    for path, module in model.named_modules():
        for kind in kinds:
            counts[f"module {path!r} {kind[1:]}"] = len(getattr(module, kind, None) or ())
        for name, param in module.named_parameters(recurse=False):
            hooks = len(param._backward_hooks or ()) + len(
                getattr(param, "_post_accumulate_grad_hooks", None) or ())
            counts[f"parameter {path + '.' if path else ''}{name} tensor hooks"] = hooks
    for kind in ("_global_forward_pre_hooks", "_global_forward_hooks",
                 "_global_backward_pre_hooks", "_global_backward_hooks"):
        counts[f"module {kind[1:]}"] = len(getattr(torch_module, kind))
    return {where: n for where, n in counts.items() if n}


def _increases(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {where: n - before.get(where, 0) for where, n in after.items()
            if n > before.get(where, 0)}


# --- readable tensor failures ------------------------------------------------------------------

def pytest_assertrepr_compare(config: pytest.Config, op: str, left: Any,
                              right: Any) -> list[str] | None:
    """``assert a == b`` with a tensor on either side: summaries, not walls of numbers."""
    torch = sys.modules.get("torch")  # a tensor exists only if torch is already imported
    if torch is None or not config.getini("tle_tensor_diffs"):
        return None
    if not (isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor)):
        return None
    compared = f"{_short(left)} {op} {_short(right)}"
    lines = [compared, f"left:  {_summary(left)}", f"right: {_summary(right)}"]
    if op in ("==", "!="):
        lines += _where_they_differ(left, right, rtol=0.0, atol=0.0, equal_nan=False)
    if not _is_the_whole_assertion(sys._getframe(1)):
        # `assert (a == b).all()`: pytest writes `.all` right after our last line, so that
        # line names the comparison again and reads `in (a == b).all`
        lines.append(f"in ({compared})")
    return lines


def _is_the_whole_assertion(frame: Any) -> bool:
    """False when the comparison being explained is part of a bigger assertion, such as
    ``assert (a == b).all()``; True when it is the assertion (or when that cannot be told)."""
    test = _assertion_frame(frame)
    statement = _assert_statement(test) if test is not None else None
    return statement is None or isinstance(statement.test, ast.Compare)


def _assertion_frame(frame: Any) -> Any:
    """The frame running a rewritten ``assert``: pytest's rewrite imports ``@pytest_ar`` there."""
    while frame is not None and "@pytest_ar" not in frame.f_globals:
        frame = frame.f_back
    return frame


def _assert_statement(frame: Any) -> ast.Assert | None:
    """The ``assert`` statement ``frame`` is executing, from its source file."""
    import linecache

    source = "".join(linecache.getlines(frame.f_code.co_filename))
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    line = frame.f_lineno
    return next((node for node in ast.walk(tree) if isinstance(node, ast.Assert)
                 and node.lineno <= line <= (node.end_lineno or node.lineno)), None)


def _explain_torch_equal(err: AssertionError) -> None:
    """``assert torch.equal(a, b)`` failed: both sides' summaries and where they differ.

    The two arguments are read again from the test's frame, only when they are names,
    attributes or constant subscripts (``a``, ``out.logits``, ``xs[0]``): reading those runs
    no code of the test a second time.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return
    tb = err.__traceback__
    frame = None
    while tb is not None:
        if "@pytest_ar" in tb.tb_frame.f_globals:
            frame = tb.tb_frame
        tb = tb.tb_next
    statement = _assert_statement(frame) if frame is not None else None
    call = statement.test if statement is not None else None
    if not (isinstance(call, ast.Call) and len(call.args) == 2 and not call.keywords
            and ast.unparse(call.func) in ("torch.equal", "equal")):
        return
    values = [_read(arg, frame) for arg in call.args]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return
    left, right = values
    lines = [f"left:  {_summary(left)}", f"right: {_summary(right)}"]
    if left.dtype != right.dtype:
        lines.append(f"dtypes differ: {left.dtype} vs {right.dtype} (torch.equal compares "
                     "values; torch.testing.assert_close(a, b) also checks dtypes)")
    if left.device != right.device:
        lines.append(f"devices differ: {left.device} vs {right.device}")
    if left.shape != right.shape:
        lines.append(f"shapes differ: {tuple(left.shape)} vs {tuple(right.shape)}")
    else:
        lines += _where_they_differ(left, right, rtol=0.0, atol=0.0, equal_nan=False)
    message = err.args[0] if err.args else ""
    err.args = (f"{message}\n\n(torchlens_edu) torch.equal({ast.unparse(call.args[0])}, "
                f"{ast.unparse(call.args[1])}) is False\n" + "\n".join(lines),)


_NO_VALUE = object()


def _read(node: ast.expr, frame: Any) -> Any:
    """The value of a name / attribute / constant subscript in ``frame``, else ``_NO_VALUE``."""
    if isinstance(node, ast.Name):
        for scope in (frame.f_locals, frame.f_globals, frame.f_builtins):
            if node.id in scope:
                return scope[node.id]
        return _NO_VALUE
    if isinstance(node, ast.Attribute):
        owner = _read(node.value, frame)
        return _NO_VALUE if owner is _NO_VALUE else getattr(owner, node.attr, _NO_VALUE)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        owner = _read(node.value, frame)
        try:
            return _NO_VALUE if owner is _NO_VALUE else owner[node.slice.value]
        except (LookupError, TypeError):
            return _NO_VALUE
    return _NO_VALUE


def _short(x: Any) -> str:
    """The values of a tiny tensor on one line, else its shape and dtype."""
    torch = sys.modules["torch"]
    if not isinstance(x, torch.Tensor):
        return repr(x)
    if x.numel() <= 6 and _has_values(x):
        return " ".join(repr(x).split())
    from torchlens_edu._core.formatting import dtype_name  # torch is loaded by now

    return f"Tensor{list(x.shape)} {dtype_name(x.dtype)}"


def _summary(x: Any) -> str:
    from torchlens_edu.printing import describe

    torch = sys.modules["torch"]
    return describe(x) if isinstance(x, torch.Tensor) else repr(x)


def _explain_assert_close(err: AssertionError) -> None:
    """Add both sides' summaries and the first mismatching index to an assert_close failure."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    frame = _frame_of(err, torch.testing.assert_close.__code__)
    if frame is None:
        return
    local = frame.f_locals
    actual, expected = local.get("actual"), local.get("expected")
    metas = local.get("error_metas") or []
    for key in getattr(metas[0], "id", ()) if metas else ():  # the failing item of a container
        actual, expected = actual[key], expected[key]
    if not (isinstance(actual, torch.Tensor) or isinstance(expected, torch.Tensor)):
        return
    lines = [f"actual:   {_summary(actual)}", f"expected: {_summary(expected)}"]
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        rtol, atol = local.get("rtol"), local.get("atol")
        if rtol is None or atol is None:
            from torch.testing._comparison import default_tolerances

            rtol, atol = default_tolerances(actual, expected)
        lines += _where_they_differ(actual, expected, rtol=rtol, atol=atol,
                                    equal_nan=bool(local.get("equal_nan")), first_only=True)
    err.args = (f"{err.args[0] if err.args else ''}\n\n(torchlens_edu)\n" + "\n".join(lines),)


def _where_they_differ(left: Any, right: Any, *, rtol: float, atol: float, equal_nan: bool,
                       first_only: bool = False) -> list[str]:
    """Mismatch count, first mismatching index, max abs/rel difference (values, not reprs)."""
    torch = sys.modules["torch"]
    try:  # the other side may be a number or a nested list; anything else has no diff to show
        a, b = (x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in (left, right))
    except (TypeError, ValueError, RuntimeError):
        return []
    if not _has_values(a) or not _has_values(b):
        return []
    try:
        a, b = torch.broadcast_tensors(a.detach(), b.detach().to(a.device))
    except RuntimeError:
        return [f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"]
    if a.numel() == 0:
        return []
    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype.is_complex:
        dtype = torch.complex128
    elif dtype != torch.bool:
        dtype = torch.float64  # exact for every float dtype; int64 beyond 2**53 is rare in tests
    x, y = a.to(dtype), b.to(dtype)
    if dtype == torch.bool:
        bad = x != y
    else:
        bad = ~torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=equal_nan)
    count = int(bad.sum())
    if count == 0:
        return []
    if a.numel() == 1:
        if dtype == torch.bool or first_only:
            return []
        gap = (x - y).abs().reshape(())
        rel = gap / y.abs().reshape(())  # inf when y is 0, as assert_close reports it
        return [f"differ by {float(gap):.6g} (relative {float(rel):.3g})"]
    first = tuple(int(i) for i in bad.nonzero()[0])
    lines = [f"first mismatch at index {list(first)}: {_item(a, first)} vs {_item(b, first)}"]
    if first_only:
        return lines
    lines.insert(0, f"mismatched elements: {count} / {a.numel()} ({100 * count / a.numel():.1f}%)")
    if dtype != torch.bool:
        diff = torch.where(bad, (x - y).abs(), 0).to(torch.float64)
        rel = torch.where(bad, diff / y.abs(), 0)
        for name, values in (("abs", diff), ("rel", rel)):
            index = tuple(int(i) for i in torch.unravel_index(values.nan_to_num(
                nan=float("inf")).argmax(), values.shape))
            lines.append(f"max {name} diff: {float(values[index]):.6g} at index {list(index)}")
    return lines


def _has_values(t: Any) -> bool:
    return t.layout == sys.modules["torch"].strided and t.device.type != "meta" and not (
        t.is_quantized)


def _item(t: Any, index: tuple[int, ...]) -> str:
    value = t[index].item()
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def _frame_of(err: BaseException, code: Any) -> Any:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return tb.tb_frame
        tb = tb.tb_next
    return None


def _end_traceback_at(err: BaseException, function: Any) -> None:
    """Cut ``err``'s traceback after the frame of ``function`` (the test), if it is there."""
    code = getattr(function, "__code__", None)
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code is not code:
        tb = tb.tb_next
    if tb is not None:
        tb.tb_next = None


def _raised_by_assert(err: BaseException) -> bool:
    """True when the error came out of an ``assert`` line of the test itself."""
    import linecache

    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
    return line.startswith("assert ")
