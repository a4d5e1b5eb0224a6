"""kernels.Precompiled: Dynamo's compiled code called directly, under Dynamo's own guards."""

from __future__ import annotations

import gc

import torch

from bnbench.norm.kernels import Precompiled


def _scaled_sum(x: torch.Tensor, scale: float, square: bool, *extra: torch.Tensor):
    """A small function with the kinds of arguments the kernels take."""
    y = x * x if square else x * 2
    for t in extra:
        y = y + t
    return (y * scale).sum(dim=-1), y.exp_()


class _Counting:
    """Counts the calls that go through torch.compile (Dynamo's frame hook)."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def test_precompiled_runs_dynamos_code_directly_and_obeys_its_guards():
    fn = Precompiled(_scaled_sum)
    assert fn._direct, "this PyTorch has isolated recompile regions: the direct path must run"
    dynamo = fn.compiled = _Counting(fn.compiled)
    g = torch.Generator().manual_seed(0)

    def check(*args, dynamo_calls: int) -> None:
        ref = _scaled_sum(*args)
        out = fn(*args)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b)
        assert dynamo.calls == dynamo_calls

    x = torch.randn(3, 5, generator=g)
    check(x, 0.5, True, dynamo_calls=1)  # compiles
    check(x, 0.5, True, dynamo_calls=1)  # direct
    check(torch.randn(4, 7, generator=g), 0.5, True, dynamo_calls=1)  # dynamic shapes: direct
    check(x, 0.25, True, dynamo_calls=2)  # floats are specialized: the guards refuse
    check(x, 0.5, False, dynamo_calls=3)  # so are bools
    check(x, 0.5, True, dynamo_calls=3)  # the first entry again
    check(x, 0.25, True, dynamo_calls=3)  # and the second
    check(x.double(), 0.5, True, dynamo_calls=4)  # dtype guard
    check(x, 0.5, True, torch.ones(5), dynamo_calls=5)  # *args length guard
    check(x, 0.5, True, torch.ones(5), dynamo_calls=5)
    with torch.no_grad():  # global state guard (grad mode)
        check(x, 0.5, True, dynamo_calls=6)
    assert len(fn._runs) == 6


def test_precompiled_routes_keys_dynamo_would_not_compile_to_dynamo():
    fn = Precompiled(_scaled_sum, recompile_limit=1)
    dynamo = fn.compiled = _Counting(fn.compiled)
    x = torch.randn(3, 5)
    fn(x, 1.0, True)
    for _ in range(2):  # past the limit Dynamo runs the function eagerly; so do we
        torch.testing.assert_close(fn(x, 1.0, False)[0], _scaled_sum(x.clone(), 1.0, False)[0])
    assert dynamo.calls == 3 and len(fn._runs) == 1


class _Base:
    pass


def _sign(x: torch.Tensor, obj: object):
    return x + 1 if isinstance(obj, _Base) else x - 1


def _instance_of_a_new_class(base: type) -> object:
    class Local(base):
        pass

    return Local()


def test_precompiled_follows_dynamo_resets_and_invalidations():
    fn = Precompiled(_scaled_sum)
    dynamo = fn.compiled = _Counting(fn.compiled)
    x = torch.randn(3, 5)
    fn(x, 1.0, True)
    fn(x, 1.0, True)
    assert dynamo.calls == 1 and len(fn._runs) == 1
    torch._dynamo.reset()  # Dynamo frees its entries: so do we, and compile afresh
    torch.testing.assert_close(fn(x, 1.0, True)[0], _scaled_sum(x, 1.0, True)[0])
    assert dynamo.calls == 2 and len(fn._runs) == 1

    # Guards that match a class by identity: when it dies Dynamo invalidates the entry (its
    # guards would then accept anything), and it must never run again.
    fn = Precompiled(_sign)
    dynamo = fn.compiled = _Counting(fn.compiled)
    x = torch.zeros(2)
    torch.testing.assert_close(fn(x, _instance_of_a_new_class(_Base)), x + 1)
    gc.collect()
    for _ in range(50):  # new classes, some at the dead one's address
        torch.testing.assert_close(fn(x, _instance_of_a_new_class(object)), x - 1)
    assert dynamo.calls > 1


def _with_default(x: torch.Tensor, scale: float = 2.0):
    return x * scale


def _plus_all(x: torch.Tensor, parts: list[torch.Tensor]):
    return x + sum(parts)


def _with_graph_break(x: torch.Tensor):
    y = x + 1
    torch._dynamo.graph_break()
    return y * 2


def test_precompiled_leaves_to_torch_compile_what_it_cannot_call_directly():
    x = torch.randn(3, 5)
    for fn, args, ref, calls in [
        (Precompiled(_with_default), (x,), x * 2, (1, 2)),  # defaults: not a plain signature
        (Precompiled(_with_graph_break), (x,), (x + 1) * 2, (1, 2)),  # resume functions
        (Precompiled(_plus_all), (x, [x, x]), x * 3, (1, 1)),  # a list: guarded, direct
    ]:
        dynamo = fn.compiled = _Counting(fn.compiled)
        for n in calls:
            torch.testing.assert_close(fn(*args), ref)
            assert dynamo.calls == n
    fn = Precompiled(_scaled_sum)
    dynamo = fn.compiled = _Counting(fn.compiled)
    fn(x, 1.0, True)
    with torch.compiler.set_stance("force_eager"):  # the stance is torch.compile's to apply
        fn(x, 1.0, True)
    assert dynamo.calls == 2
