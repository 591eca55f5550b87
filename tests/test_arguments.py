"""A wrong kind of argument gets one message at the call that names the argument and says what
to give: never a traceback from inside torch or rich, never a truthy value taken as True."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn

import torchlens_edu as tle

MODEL = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
X = torch.zeros(2, 4)
ATTENTION = torch.softmax(torch.randn(1, 2, 3, 3), -1)


def _enter(manager: Any) -> None:
    with manager:
        pass


FLAGS: list[tuple[str, Callable[[Any], Any]]] = [
    ("describe(stats={})", lambda v: tle.describe(X, stats=v)),
    ("show(heatmap={})", lambda v: tle.show(X, heatmap=v)),
    ("trace_shapes(ops={})", lambda v: tle.trace_shapes(MODEL, X, ops=v)),
    ("trace_shapes(meta={})", lambda v: tle.trace_shapes(MODEL, X, meta=v)),
    ("trace_shapes(ops={})", lambda v: tle.inspect(MODEL).trace(X, ops=v)),
    ("watch_nans(check_inf={})", lambda v: tle.watch_nans(MODEL, check_inf=v)),
    ("compare(backward={})", lambda v: tle.compare(MODEL, MODEL, X, backward=v)),
    ("capture(grads={})", lambda v: _enter(tle.inspect(MODEL).capture("*", grads=v))),
    ("capture(clone={})", lambda v: _enter(tle.inspect(MODEL).capture("*", clone=v))),
]


@pytest.mark.parametrize("value", [None, "yes", 1])
@pytest.mark.parametrize(("call", "run"), FLAGS, ids=[c for c, _ in FLAGS])
def test_a_flag_is_true_or_false(call: str, run: Callable[[Any], Any], value: Any) -> None:
    with pytest.raises(TypeError) as info:
        run(value)
    assert str(info.value) == call.format(repr(value)) + ": give True or False"


@pytest.mark.parametrize("run", [lambda c: tle.show(X, console=c),
                                 lambda c: tle.show_attention(ATTENTION[0, 0], console=c)])
def test_a_console_is_a_rich_console(run: Callable[[Any], Any], capsys) -> None:
    with pytest.raises(TypeError, match=r"\(console='stdout'\): give a rich\.console\.Console, "
                                        r"or leave it out to print to the terminal or notebook$"):
        run("stdout")
    assert capsys.readouterr().out == ""  # refused before printing anything


@pytest.mark.parametrize("bad", ["h.*.attn", {"h.*": 3}, ["h.*"], {"h.*": []}])
def test_a_path_map_is_a_dict_of_globs(bad: Any) -> None:
    other = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    for who, run in (("compare", lambda: tle.compare(MODEL, other, X, map=bad)),
                     ("copy_weights", lambda: tle.copy_weights(MODEL, other, map=bad))):
        with pytest.raises(TypeError) as info:
            run()
        assert str(info.value).startswith(f"{who}(map={bad!r}): give a dict of module globs, "
                                          "the first model's to the second's")
        assert str(info.value).endswith("e.g. {'h.*.attn.c_attn': 'blocks.*.qkv'}")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"head": "1"}, "show_attention(head='1'): give an int index (negative ones count from the "
                    "end), or None to average the heads"),
    ({"layer": 0.5}, "show_attention(layer=0.5): give an int index (negative ones count from the "
                     "end), or None when there is one layer"),
    ({"batch": None}, "show_attention(batch=None): give an int index (negative ones count from "
                      "the end)"),
])
def test_attention_indices_are_ints(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError) as info:
        tle.show_attention(ATTENTION, **kwargs)
    assert str(info.value) == message


def test_one_token_is_one_token() -> None:
    with pytest.raises(ValueError, match=r"^1 token for 3 key positions: pass one token per "):
        tle.show_attention(ATTENTION, ["a"])


def test_summary_depth_and_dims_format_say_what_to_give() -> None:
    with pytest.raises(ValueError) as info:
        tle.inspect(MODEL).summary(X, depth=None)  # type: ignore[arg-type]
    assert str(info.value) == ("summary(depth=None): give a module depth >= 0 (the model is "
                               "depth 0, its children 1, ...)")
    with pytest.raises(TypeError) as info:
        tle.Dims({"B": 2}).format(None)  # type: ignore[arg-type]
    assert str(info.value) == ("Dims.format takes a shape such as (2, 16, 768) or x.shape, got "
                               "NoneType")


class TakesMask(nn.Module):
    """A forward with a keyword of its own, and one that takes any keyword."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **extra: Any
                ) -> torch.Tensor:
        return x if mask is None else x * mask


@pytest.mark.parametrize(("run", "who", "typo", "meant"), [
    (lambda: tle.trace_shapes(MODEL, X, op=True), "trace_shapes", "op", "ops"),
    (lambda: tle.inspect(MODEL).trace(X, opps=True), "trace_shapes", "opps", "ops"),
    (lambda: tle.trace_shapes(TakesMask(), X, mete=True), "trace_shapes", "mete", "meta"),
    (lambda: tle.inspect(MODEL).summary(X, dept=2), "summary", "dept", "depth"),
])
def test_a_typo_of_an_option_is_not_passed_to_the_model(run: Callable[[], Any], who: str,
                                                         typo: str, meant: str) -> None:
    """Keywords the call does not know go to the model's forward: a close miss of one of the
    call's own options is refused before the forward runs (also where **kwargs would swallow
    it)."""
    with pytest.raises(TypeError) as info:
        run()
    model = "TakesMask" if typo == "mete" else "Sequential"
    assert str(info.value) == (
        f"{who}({typo}=...): '{typo}' is not an option of {who} (did you mean '{meant}'?) nor a "
        f"parameter of {model}.forward; {who} passes the keywords it does not know on to the "
        "model's forward")


def test_the_models_own_keywords_still_reach_its_forward() -> None:
    trace = tle.trace_shapes(TakesMask(), X, mask=torch.ones(2, 4))
    assert trace.events[0].input_shapes == [(2, 4), (2, 4)]
