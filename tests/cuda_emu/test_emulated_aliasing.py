"""The in-place operators on the CUDA backend (emulated) with aliasing lists.

The alias planning (csrc/aliasing.h) is shared by both backends: duplicates and
overlapping views at many positions must give, on the CUDA kernels, exactly
what applying the operator tensor by tensor gives, and prox_l1_ must launch one
kernel per run of the brute-force greedy (tests/test_alias_planning.py has the
lists and the CPU side).
"""

import pytest
import torch

from conftest import scalar
from emulated import CPU, EMU, assert_bits_equal, launches, on_every_schedule
from test_alias_planning import SCENARIOS, brute_force_runs, build, make_bases, scenario

N = 120  # entries per list: the emulator runs every CUDA thread as a fiber
L1, L2 = 0.05, 0.3


def over_fresh_data(name, seed, fn):
    """fn(tensors) on the scenario built over fresh random data; the bases after."""
    recipe, shapes = scenario(name, n=N, seed=seed)
    bases = make_bases(recipe, shapes, torch.Generator().manual_seed(seed))
    fn(build(recipe, bases))
    return list(bases.values())


def one_by_one(op):
    def apply(tensors):
        for t in tensors:
            op([t])
    return apply


IN_PLACE = {
    "prox_l1_": lambda ops: lambda ts: ops.prox_l1_(ts, scalar(0.3)),
    "prox_group_l2_": lambda ops: lambda ts: ops.prox_group_l2_(ts, scalar(0.7)),
    "prox_group_lasso_": lambda ops: lambda ts: ops.prox_group_lasso_(
        ts, [0 if t.dim() >= 2 else -1 for t in ts], scalar(0.7), False),
}


@pytest.mark.parametrize("op", sorted(IN_PLACE))
@pytest.mark.parametrize("name", SCENARIOS)
def test_in_place_steps_equal_the_per_tensor_loop(op, name):
    got = on_every_schedule(lambda: over_fresh_data(name, 1, IN_PLACE[op](EMU)))
    want = over_fresh_data(name, 1, one_by_one(IN_PLACE[op](EMU)))
    assert_bits_equal(got, want, f"{op} {name}: list against one tensor at a time")
    if op == "prox_l1_":  # soft-thresholding is bitwise the CPU's too
        assert_bits_equal(got, over_fresh_data(name, 1, IN_PLACE[op](CPU)), f"{op} {name}")


@pytest.mark.parametrize("name", SCENARIOS)
def test_prox_l1_launches_once_per_run(name):
    recipe, shapes = scenario(name, n=N, seed=2)
    tensors = build(recipe, make_bases(recipe, shapes, torch.Generator().manual_seed(2)))
    _, log = launches(lambda: EMU.prox_l1_(tensors, scalar(0.1)))
    assert len(log) == len(brute_force_runs(tensors)) - 1


@pytest.mark.parametrize("name", SCENARIOS)
def test_gradient_accumulation_into_aliasing_grads_equals_the_cpu(name):
    def accumulate(ops):
        def fn(grads):
            gen = torch.Generator().manual_seed(3)
            params = [torch.randn(g.shape, generator=gen) for g in grads]
            _, stats = CPU.penalty_forward(params, scalar(L1), scalar(L2), False)
            ops.penalty_grad_accumulate_(grads, params, stats, scalar(L1), scalar(L2), False)
        return fn
    got = on_every_schedule(lambda: over_fresh_data(name, 4, accumulate(EMU)))
    assert_bits_equal(got, over_fresh_data(name, 4, accumulate(CPU)), f"accumulate {name}")
