"""assert_shape and shape_scope: named-axis shape checks usable in tests and in plain code."""

from __future__ import annotations

import threading

import pytest
import torch

import torchlens_edu as tle
from torchlens_edu.asserts import ShapeError, ShapeScope, assert_shape, shape_scope

X = torch.zeros(2, 8, 32)


def test_passes_and_returns_the_tensor() -> None:
    assert assert_shape(X, "B T C") is X
    assert assert_shape(X, "B, T, C", B=2, T=8, C=32) is X
    assert assert_shape(X, "(B, T, C)") is X
    assert assert_shape(X, ["B", "T", 32]) is X
    assert assert_shape(X, ["B", None, "C"]) is X
    assert assert_shape(X, [..., "C"], C=32) is X
    assert assert_shape(X, "... T C") is X
    assert assert_shape(X, "B T C ...") is X
    assert assert_shape(X, "_ _ _") is X
    assert assert_shape((2, 8), "B T") == (2, 8)
    assert assert_shape(torch.Size([4, 4]), "T T") == torch.Size([4, 4])


def test_public_names() -> None:
    assert tle.assert_shape is assert_shape
    assert tle.shape_scope is shape_scope
    assert issubclass(ShapeError, AssertionError)


def test_given_size_disagrees_names_the_axis() -> None:
    with pytest.raises(ShapeError) as info:
        assert_shape(X, "B T C", C=768)
    assert str(info.value) == ("expected (B, T, C), got (B=2, T=8, C=32)\n"
                               "  C: 32 on axis 2, but C=768 was given")


def test_literal_size_disagrees() -> None:
    with pytest.raises(ShapeError, match=r"axis 2: 32, but the spec says 768"):
        assert_shape(X, ["B", "T", 768])


def test_rank_mismatch_shows_the_named_shape() -> None:
    with pytest.raises(ShapeError) as info:
        assert_shape(torch.zeros(2, 8), "B T C", B=2)
    assert str(info.value) == "expected 3 axes (B, T, C), got 2: (B=2, 8)"
    with pytest.raises(ShapeError, match=r"expected at least 3 axes \(B, \.\.\., T, C\)"):
        assert_shape(torch.zeros(2, 8), "B ... T C")
    with pytest.raises(ShapeError, match=r"^expected 1 axis \(B\), got 2: \(B=2, 8\)$"):
        assert_shape(torch.zeros(2, 8), "B", B=2)


@pytest.mark.parametrize("value", [None, "x", 3, {"B": 2}])
def test_what_is_not_a_tensor_or_a_shape_says_so(value: object) -> None:
    with pytest.raises(TypeError) as info:
        assert_shape(value, "B T")
    assert str(info.value) == (f"assert_shape checks a tensor (anything with a .shape) or a shape "
                               f"tuple, got {type(value).__name__}: assert_shape(x, 'B T C')")


def test_repeated_name_must_repeat_its_size() -> None:
    with pytest.raises(ShapeError, match=r"T: 5 on axis 1, but T=4 on axis 0"):
        assert_shape(torch.zeros(4, 5), "T T")


def test_multiples_of_a_name() -> None:
    qkv = torch.zeros(2, 8, 96)
    assert_shape(qkv, "B T 3C", C=32)
    with shape_scope() as scope:
        assert_shape(qkv, "B T 3C")
        assert scope["C"] == 32
        assert_shape(X, "B T C")
        with pytest.raises(ShapeError, match=r"4C: 96 on axis 2, but C=32 was bound at "
                                             r"test_assert_shape.py:\d+ \(so 4C=128\)"):
            assert_shape(qkv, "B T 4*C")
    with pytest.raises(ShapeError, match="5C: 96 on axis 2 is not a multiple of 5"):
        assert_shape(qkv, "B T 5C")


def test_scope_binds_names_across_calls() -> None:
    with shape_scope(B=2) as scope:
        assert_shape(X, "B T C")
        assert_shape(torch.zeros(2, 8, 4, 8), "B T nh hs")
        with pytest.raises(ShapeError) as info:
            assert_shape(torch.zeros(3, 9), "B T")
    message = str(info.value)
    assert message.startswith("expected (B, T), got (B=3, T=9)\n")
    assert "B: 3 on axis 0, but B=2 was given to shape_scope() at test_assert_shape.py:" in message
    assert "T: 9 on axis 1, but T=8 was bound at test_assert_shape.py:" in message
    assert dict(scope) == {"B": 2, "T": 8, "C": 32, "nh": 4, "hs": 8}
    assert isinstance(scope, ShapeScope) and "T=8" in repr(scope)
    assert_shape(torch.zeros(3, 9), "B T")  # outside the scope, names are free again


def test_failed_check_binds_nothing() -> None:
    with shape_scope() as scope:
        with pytest.raises(ShapeError):
            assert_shape(X, "B T C", C=3)
        assert dict(scope) == {}


def test_nested_scope_sees_outer_and_forgets_its_own() -> None:
    with shape_scope() as outer:
        assert_shape(X, "B T C")
        with shape_scope() as inner:
            assert_shape(torch.zeros(2, 5), "B S")
            with pytest.raises(ShapeError, match="T: 9 on axis 1"):
                assert_shape(torch.zeros(2, 9), "B T")
            assert dict(inner) == {"B": 2, "T": 8, "C": 32, "S": 5}
        assert "S" not in outer
        assert_shape(torch.zeros(2, 6), "B S")


def test_reentering_a_scope_starts_afresh() -> None:
    scope = shape_scope(B=2)
    for T in (8, 16):
        with scope:
            assert_shape(torch.zeros(2, T), "B T")
            assert dict(scope) == {"B": 2, "T": T}


def test_scope_is_per_thread() -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            assert_shape(torch.zeros(2, 9), "B T")  # no scope here: T is free
        except ShapeError as e:  # handed back to the main thread
            errors.append(e)

    with shape_scope():
        assert_shape(X, "B T C")
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert errors == []


@pytest.mark.parametrize(("spec", "sizes", "error"), [
    ("B T $", {}, r"cannot read '\$' in the spec"),
    ("... B ...", {}, r"more than one '\.\.\.'"),
    ("B T C", {"c": 3}, r"c not in the spec 'B T C'; did you mean C\?"),
    ("B T C", {"C": -1}, r"C=-1: the size must be a non-negative int"),
    (3, {}, r"the spec must be a string like 'B T C'"),
])
def test_bad_input_is_a_clear_error(spec, sizes, error) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        assert_shape(X, spec, **sizes)
