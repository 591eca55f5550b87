"""HookSet: hooks by module path on every zoo model; removal in every way out; in-place safety."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import torchlens_edu as tle
from support.zoo import ZOO, ZOO_BY_NAME, InplaceAfter, ModelGuard, ZooEntry, reference_outputs
from torchlens_edu._core.modules import PatternError, require_module
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.hookset import HookCall


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_forward_hooks_on_every_module_of_the_zoo(entry: ZooEntry) -> None:
    model = entry.build_or_skip()
    expected = [(path, [tuple(t.shape) for t in outs])
                for path, _, outs in reference_outputs(model, entry)]
    guard = ModelGuard(model)
    seen: list[tuple[str, list[tuple[int, ...]]]] = []
    pre: list[HookCall] = []
    with tle.hooks(model) as h:
        h.forward("*", lambda c: seen.append((c.path, [tuple(t.shape)
                                                       for t in iter_tensors(c.output)])))
        h.forward_pre("*", pre.append)
        with torch.no_grad():
            out = entry.run(model)
    assert seen == expected  # same calls, same order, same shapes
    assert len(pre) == len(seen)
    assert seen[-1][0] == "" and seen[-1][1] == [tuple(t.shape) for t in iter_tensors(out)]
    guard.check(out)


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_backward_hooks_on_every_module_of_the_zoo(entry: ZooEntry) -> None:
    model = entry.build_or_skip()
    guard = ModelGuard(model)
    grads: dict[tuple[str, int, int], torch.Tensor] = {}
    with tle.hooks(model) as h:
        h.backward("*", lambda c: grads.__setitem__((c.path, c.call, c.index), c.grad))
        out = entry.run(model)
        floats = [t for t in iter_tensors(out) if t.is_floating_point() and t.requires_grad]
        sum(t.sum() for t in floats).backward()
    assert grads, "no gradient reached a backward hook"
    root = [grads[key] for key in sorted(key for key in grads if key[0] == "")]
    assert [g.shape for g in root] == [t.shape for t in floats]
    if len(floats) == 1:  # d(sum of the output)/d(output) is all ones
        assert torch.equal(root[0], torch.ones_like(root[0]))
    guard.check(out)


def test_backward_hooks_survive_in_place_ops_after_the_module() -> None:
    """fc1's output is multiplied in place, fc2's goes through ReLU(inplace=True) and fc3's
    gets `+= 1`: torch's full backward hooks fail there, ours give the right gradients."""
    torch.manual_seed(0)
    model, x = InplaceAfter().eval(), torch.randn(3, 8)
    broken = model.fc1.register_full_backward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="BackwardHookFunction"):
        model(x).sum().backward()
    broken.remove()
    model.zero_grad()

    # reference: the same maths out of place, gradients from autograd.grad
    h1 = model.fc1(x)
    h2 = model.fc2(h1 * 2.0)
    out = model.fc3(torch.relu(h2)) + 1.0
    ref = dict(zip(("fc1", "fc2"), torch.autograd.grad(out.sum(), [h1, h2]), strict=True))

    guard = ModelGuard(model)
    got: dict[str, torch.Tensor] = {}
    with tle.hooks(model) as h:
        h.backward(lambda path, m: path.startswith("fc"),
                   lambda c: got.__setitem__(c.path, c.grad))
        y = model(x)
        y.sum().backward()
    torch.testing.assert_close(got["fc1"], ref["fc1"])
    torch.testing.assert_close(got["fc2"], ref["fc2"])
    torch.testing.assert_close(got["fc3"], torch.ones(3, 4))
    guard.check(y)


def test_call_index_counts_calls_per_forward() -> None:
    model = ZOO_BY_NAME["mlp_twice"].build()
    calls: list[tuple[str, int]] = []
    with tle.hooks(model) as h:
        h.forward("block*", lambda c: calls.append((c.path, c.call)))
        model(torch.zeros(2, 8))
        model(torch.zeros(2, 8))
        assert h.forwards == 2
    once = [("block.0", 0), ("block.1", 0), ("block", 0),
            ("block.0", 1), ("block.1", 1), ("block", 1)]
    assert calls == once + once  # restarts at 0 for each forward of the model


def test_a_module_shared_under_two_names_reports_every_call() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(4, 4)
            self.dec = self.enc  # the same module, as tied embeddings are

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(self.enc(x))

    model = Shared()
    calls: list[tuple[str, int, tuple[int, ...]]] = []
    with tle.hooks(model) as h:
        h.forward("enc", lambda c: calls.append((c.path, c.call, tuple(c.output.shape))))
        model(torch.zeros(1, 4))
    assert calls == [("enc", 0, (1, 4)), ("enc", 1, (1, 4))]


def test_hooks_see_args_and_kwargs() -> None:
    entry = ZOO_BY_NAME["kwargs_only"]
    model = entry.build()
    seen: list[HookCall] = []
    with tle.hooks(model) as h:
        h.forward_pre("", seen.append)
        h.forward("", seen.append)
        entry.run(model)
    assert [c.kind for c in seen] == ["forward_pre", "forward"]
    assert seen[0].args == () and set(seen[0].kwargs) == {"input_ids", "attention_mask"}
    assert seen[1].kwargs["input_ids"].shape == (2, 6)


def test_replacing_outputs_inputs_and_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    x = torch.randn(2, 3, requires_grad=True)
    with tle.hooks(model) as h:
        h.forward("1", lambda c: torch.zeros_like(c.output))
        assert torch.equal(model(x), model[2].bias.expand(2, 1))
    with tle.hooks(model) as h:
        h.forward_pre("2", lambda c: torch.ones(2, 3))  # a tensor: the first argument
        assert torch.allclose(model(x), model[2](torch.ones(2, 3)))
    with tle.hooks(model) as h:
        h.forward_pre("2", lambda c: ((torch.zeros(2, 3),), {}))  # (args, kwargs)
        assert torch.equal(model(x), model[2].bias.expand(2, 1))
    with tle.hooks(model) as h:
        h.backward("0", lambda c: torch.zeros_like(c.grad))  # no gradient reaches x
        model(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with tle.hooks(model) as h:
        h.forward_pre("2", lambda c: "nonsense")
        with pytest.raises(TypeError, match="forward_pre hook on '2' returned str"):
            model(x)


def test_dict_outputs_can_be_read_and_replaced() -> None:
    entry = ZOO_BY_NAME["dict_outputs"]
    model = entry.build()

    def zero_pooled(call: HookCall) -> dict[str, torch.Tensor]:
        return {**call.output, "pooled": torch.zeros_like(call.output["pooled"])}

    with tle.hooks(model) as h:
        h.forward("trunk", zero_pooled)
        out = entry.run(model)
    assert torch.equal(out["logits"], model.cls.bias.expand(2, 3))


def test_hookset_removes_everything_on_exit_and_exit_twice_is_harmless() -> None:
    model = ZOO_BY_NAME["gpt2_ours"].build()
    guard = ModelGuard(model)
    h = tle.hooks(model)
    with h:
        assert h.forward("transformer.h.*.attn", lambda c: None) == [
            "transformer.h.0.attn", "transformer.h.1.attn"]
        h.forward("transformer.h.*.attn", lambda c: None)  # same modules: one torch hook each
        h.backward("lm_head", lambda c: None)
        assert len(model.transformer.h[0].attn._forward_hooks) == 1
        assert h.active and "forward:transformer.h.0.attn" in repr(h)
    guard.check()
    h.__exit__(None, None, None)
    h.remove()
    assert not h.active
    with pytest.raises(RuntimeError, match="was removed"):
        h.forward("lm_head", lambda c: None)
    guard.check()


def test_hooks_are_removed_when_the_forward_raises() -> None:
    model = ZOO_BY_NAME["gpt2_ours"].build()
    guard = ModelGuard(model)
    with pytest.raises(ValueError, match="token ids of shape"), tle.hooks(model) as h:
        h.forward("*", lambda c: None)
        h.backward("*", lambda c: None)
        model(torch.zeros(3, dtype=torch.long))  # wrong shape: GPT2 raises
    guard.check()


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "backward"])
def test_hooks_are_removed_when_a_hook_raises_even_without_with(kind: str) -> None:
    model = ZOO_BY_NAME["inplace_after"].build()
    guard = ModelGuard(model)

    def boom(call: HookCall) -> None:
        raise KeyError("user bug")

    h = tle.hooks(model)
    getattr(h, kind)("fc2", boom)
    h.backward("fc1", lambda c: None)
    out = None
    with pytest.raises(KeyError, match="user bug") as info:
        out = model(torch.randn(3, 8))
        out.sum().backward()
    assert not h.active
    if hasattr(info.value, "__notes__"):
        assert "hook on module 'fc2'" in info.value.__notes__[0]
    guard.check(out)
    model(torch.randn(3, 8)).sum().backward()  # the model works as before


def test_pattern_that_matches_nothing_suggests_paths() -> None:
    model = ZOO_BY_NAME["gpt2_ours"].build()
    with pytest.raises(PatternError, match=r"Did you mean.*transformer\.h\.0\.attn"):
        tle.hooks(model).forward("transformer.h.*.atn", lambda c: None)
    with pytest.raises(TypeError, match="hook function"):
        tle.hooks(model).forward("lm_head", "not a function")


def test_a_module_given_as_a_pattern_names_its_path() -> None:
    """A module is callable, but not a (path, module) -> bool test: it is never called."""
    model = ZOO_BY_NAME["gpt2_ours"].build()
    attn = model.transformer.h[0].attn
    start = ("a module pattern is a path such as 'transformer.h.*.attn' or a function "
             "(path, module) -> bool, not the CausalSelfAttention module itself; ")
    at = "it is at 'transformer.h.0.attn' in this model: pass that path"
    with pytest.raises(TypeError) as info:
        tle.hooks(model).forward(attn, lambda c: None)  # type: ignore[arg-type]
    assert str(info.value) == start + at
    with pytest.raises(TypeError) as info, tle.inspect(model).capture(attn):  # type: ignore[arg-type]
        pass
    assert str(info.value) == start + at
    other = ZOO_BY_NAME["gpt2_ours"].build().transformer.h[0].attn
    with pytest.raises(TypeError) as info:
        tle.trace_shapes(model, torch.zeros(1, 4, dtype=torch.long), include=other)
    assert str(info.value) == start + "it is not part of this model either"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_modules_are_refused_with_a_clear_message() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(TypeError, match=r"TorchScript.*before scripting"):
        tle.hooks(scripted).forward("0", lambda c: None)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.eager = nn.Linear(2, 2)
            self.sub = scripted

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sub(self.eager(x))

    model = Holder()
    with tle.hooks(model) as h:
        assert h.forward("eager", lambda c: None) == ["eager"]  # the eager part still works
        with pytest.raises(TypeError, match=r"module 'sub\.0' is TorchScript"):
            h.forward("sub.*", lambda c: None)


def test_compiled_modules_say_what_works() -> None:
    inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    compiled = torch.compile(inner, backend="eager")
    seen: list[str] = []
    with tle.hooks(compiled) as h:
        with pytest.raises(TypeError, match=r"torch.compile'd.*_orig_mod"):
            h.forward("_orig_mod.0", lambda c: None)
        h.forward("", lambda c: seen.append(type(c.output).__name__))  # around: works
        compiled(torch.zeros(1, 2))
    assert seen == ["Tensor"]


@pytest.mark.parametrize(("obj", "hint"), [
    (lambda x: x, "this is a function"),
    ({"w": torch.zeros(2)}, "state dict"),
    ("gpt2", "load the model first"),
    (torch.zeros(2), "this is a tensor"),
    (type("Pipeline", (), {"model": nn.Linear(1, 1)})(), "pass its .model"),
    (nn.Linear, r"this is the class Linear, not a model: build one first, e\.g\. model = "
                r"Linear\(\.\.\.\)"),
    (None, "pass the model object itself"),
])
def test_non_modules_get_a_hint(obj: object, hint: str) -> None:
    with pytest.raises(TypeError, match=hint):
        require_module(obj, "hooks()")
    for call, who in [(lambda: tle.hooks(obj), "hooks()"),  # type: ignore[arg-type]
                      (lambda: tle.inspect(obj), "inspect()"),  # type: ignore[arg-type]
                      (lambda: tle.watch_nans(obj), "watch_nans()"),  # type: ignore[arg-type]
                      (lambda: tle.copy_weights(obj, nn.Linear(1, 1)),  # type: ignore[arg-type]
                       "copy_weights(src, dst)"),
                      (lambda: tle.copy_weights(nn.Linear(1, 1), obj),  # type: ignore[arg-type]
                       "copy_weights(src, dst)")]:
        with pytest.raises(TypeError, match=re.escape(who) + r" needs a torch\.nn\.Module, got "
                           + type(obj).__name__ + ": .*" + hint):
            call()


def test_paused_hooks_do_nothing() -> None:
    model = nn.Linear(2, 2)
    seen: list[int] = []
    with tle.hooks(model) as h:
        h.forward("", lambda c: seen.append(c.call))
        with h.paused():
            model(torch.zeros(1, 2))
        model(torch.zeros(1, 2))
    assert seen == [0]


def test_an_accidental_non_tensor_return_is_explained() -> None:
    model = nn.Linear(2, 2)
    notes: dict[str, list[int]] = {}
    with tle.hooks(model) as h:
        h.forward("", lambda c: notes.setdefault(c.path, [1]))  # returns the list
        with pytest.raises(TypeError, match="Return None to keep the output"):
            model(torch.zeros(1, 2))
    ModelGuard(model).check()


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_a_hook_returning_the_wrong_type_is_removed_like_a_raising_hook(kind: str) -> None:
    """Issue 16.3: the TypeError was clear, but 1-2 hooks stayed on the model."""
    model = ZOO_BY_NAME["inplace_after"].build()
    guard = ModelGuard(model)
    h = tle.hooks(model)
    getattr(h, kind)("fc2", lambda c: "not a tensor")
    h.forward("fc1", lambda c: None)
    with pytest.raises(TypeError, match=f"a {kind} hook on 'fc2' returned str") as info:
        model(torch.randn(3, 8))
    assert not h.active
    if hasattr(info.value, "__notes__"):
        assert "removed all hooks of this HookSet" in info.value.__notes__[0]
    guard.check()


def test_a_matched_module_that_never_runs_is_named_with_the_reason(capsys) -> None:
    class UsesTheWeightOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.unembed = nn.Linear(4, 10)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.embed(ids) @ self.unembed.weight.T  # its forward is never called

    model = UsesTheWeightOnly()
    with tle.hooks(model) as h:
        h.forward("unembed", lambda c: None)
        assert h.never_called() == []  # the model has not run yet: nothing to say
        model(torch.zeros(1, 3, dtype=torch.long))
        assert h.never_called() == [("unembed", (
            "its forward was never called: the model skips it on this input, or uses its "
            "parameters directly (e.g. F.linear(x, unembed.weight)) instead of calling it"))]
    err = " ".join(capsys.readouterr().err.split())
    assert "hooks on 1 matched module never ran in 1 forward of UsesTheWeightOnly: unembed:" in err
    with tle.hooks(model) as h:
        h.forward("*", lambda c: None)  # the root and embed ran: no complaint about the rest
        model(torch.zeros(1, 3, dtype=torch.long))
        assert h.never_called() == []
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("kind", "torch_style", "fields"), [
    ("forward", "(module, args, output)", "call.module, call.args, call.output"),
    ("forward_pre", "(module, args)", "call.module, call.args"),
    ("backward", "(module, grad_input, grad_output)", "call.module, call.grad"),
])
def test_a_hook_written_for_torch_is_refused_when_added_with_the_fields_to_use(
        kind: str, torch_style: str, fields: str) -> None:
    """A function with torch's hook signature would fail at the model's first call with
    "missing 2 required positional arguments": it is refused when added, with what to write."""
    model = nn.Sequential(nn.Linear(2, 2))

    def torch_hook(module, args, output=None):  # the signature torch's register_*_hook wants
        return None

    with tle.hooks(model) as h:
        with pytest.raises(TypeError) as info:
            getattr(h, kind)("0", torch_hook)
        assert str(info.value) == (
            "a hook function takes one HookCall, but torch_hook(module, args, output=None) cannot "
            f"be called with one argument. torch's own {kind} hooks take {torch_style}; here "
            f"they are {fields}: write def torch_hook(call): ...")
        with pytest.raises(TypeError, match=r"write lambda call: \.\.\.$"):
            getattr(h, kind)("0", lambda module, args: None)
        assert getattr(h, kind)("0", lambda call, extra=1: None) == ["0"]  # one argument: fine
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
