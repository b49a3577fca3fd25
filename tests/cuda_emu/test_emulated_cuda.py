"""Every CUDA kernel and CUDA backend entry point, run by the emulator on the CPU.

Oracle: the CPU kernels (bit for bit where the two backends compute the same
thing: gradients from given stats, soft-thresholding, zero counts) and a
float64 reference within the bounds stated below (sums, whose order differs
between the backends). Every result must also be bitwise identical under the
three fiber schedules, and every launch within CUDA's limits (the emulator
raises otherwise: parameter bytes, threads per block, __launch_bounds__).
"""

import math

import pytest
import torch

from emulated import (CPU, DTYPES, EMU, assert_bits_equal, exact_size, launches,
                      on_every_schedule, vector_width)
from op_samples import OPS, assert_close_outcomes, cases, outcome, param_dtype, sample
from conftest import scalar

CHUNK = 32768

# Relative error of the forward's sums against float64: float64 data, and every
# tensor of a list whose result is float64, are summed in float64 (1e-12);
# otherwise in float32 over short runs per thread, added in float64 (1e-6, the
# CPU kernels' contract too).
EXACT_BOUND, FLOAT32_RUN_BOUND = 1e-12, 1e-6

HUGE = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 6e4, torch.float64: 1e200}
TINY = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 1e-7, torch.float64: 1e-200}


def boundary_sizes(dtype):
    """0 and 1, one below/at/above the 16-byte vector, one vector per thread and four
    (the loads in flight), the chunk, and two chunks plus a tail."""
    v = vector_width(dtype)
    sizes = {0, 1, v - 1, v, v + 1}
    for edge in (512 * v, 2048 * v, CHUNK):
        sizes |= {edge - 1, edge, edge + 1}
    sizes.add(2 * CHUNK + 37)
    return sorted(sizes)


def make_values(n, dtype, kind, gen):
    """n values of `kind`: normal (with exact zeros and -0), special (normal plus
    +-0, NaN, +-inf, huge and tiny), huge or tiny (all of one extreme magnitude)."""
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if kind == "huge":
        x = x.sign() * HUGE[dtype] * (1 + x.abs())
    elif kind == "tiny":
        x = x.sign() * TINY[dtype] * (1 + x.abs())
    else:
        x = 3 * x
        x[::7] = 0.0
        if n > 3:
            x[3] = -0.0
        if kind == "special":
            specials = [0.0, -0.0, math.nan, math.inf, -math.inf, HUGE[dtype], -HUGE[dtype],
                        TINY[dtype], -TINY[dtype]]
            for k, value in enumerate(specials[:n]):
                x[(k * 7919) % n] = value
    return x.to(dtype)


def boundary_list(dtype, kind, gen):
    """One tensor per boundary size, at element offsets 0..7 in turn, in
    allocations of exactly their size."""
    return [exact_size(make_values(n, dtype, kind, gen), i % 8)
            for i, n in enumerate(boundary_sizes(dtype))]


def float64_stats(params):
    rows = [(p.double().abs().sum().item(), p.double().pow(2).sum().item()) for p in params]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(params), 2)


def check_stats(got, params, cpu_stats, bound):
    """Finite rows within `bound` of float64; non-finite rows exactly the CPU's."""
    want = float64_stats(params)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), (got, want)
    g, c = got[~finite], cpu_stats[~finite]
    assert torch.equal(g.isnan(), c.isnan()) and torch.equal(g.where(~g.isnan(), 0),
                                                             c.where(~c.isnan(), 0))
    err = ((got - want).abs() / want.abs().clamp_min(1e-300))[finite]
    assert err.numel() == 0 or err.max().item() <= bound, (err.max().item(), bound)


def expected_total(stats, l1, l2, l2_squared):
    l2_terms = stats[:, 1] if l2_squared else stats[:, 1].sqrt()
    return l1 * stats[:, 0].sum() + l2 * l2_terms.sum()


def forward_bound(params):
    exact = any(p.dtype == torch.float64 for p in params)
    return EXACT_BOUND if exact else FLOAT32_RUN_BOUND


def check_forward(params, l1, l2, l2_squared):
    total, stats = on_every_schedule(lambda: EMU.penalty_forward(params, scalar(l1), scalar(l2), l2_squared))
    cpu_total, cpu_stats = CPU.penalty_forward(params, scalar(l1), scalar(l2), l2_squared)
    check_stats(stats, params, cpu_stats, forward_bound(params))
    assert total.dtype == cpu_total.dtype and total.shape == ()
    want = expected_total(float64_stats(params), l1, l2, l2_squared)
    if not torch.isfinite(want.to(total.dtype)):  # NaN/inf data, or beyond float32's range
        assert_bits_equal(total, cpu_total, "non-finite total")
    else:
        rounding = 6e-8 if total.dtype == torch.float32 else 0.0
        assert abs(total.item() - want.item()) <= (forward_bound(params) + rounding) * abs(
            want.item()) + 1e-300
    return stats


KINDS = ["normal", "special", "huge", "tiny"]


@pytest.mark.parametrize("l2_squared", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_sums_and_total(dtype, kind, l2_squared):
    gen = torch.Generator().manual_seed(11)
    check_forward(boundary_list(dtype, kind, gen), 0.25, 0.5, l2_squared)


# (l1, l2): ordinary; a linear coefficient beyond float32 (float64 arithmetic);
# a sign coefficient below float32's range; and l2 / ||x|| below double's normal
# range for the huge tensors (the split x * (1/||x||) * l2 form).
COEFFICIENTS = [(0.25, 0.5), (0.0, 1e31), (1e-31, 0.5), (0.0, 1e-300)]


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("coefs", COEFFICIENTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_bitwise_equal_cpu(dtype, kind, coefs, accumulate):
    gen = torch.Generator().manual_seed(12)
    params = boundary_list(dtype, kind, gen)
    l1, l2 = coefs
    for l2_squared in (False, True):
        _, stats = CPU.penalty_forward(params, scalar(l1), scalar(l2), l2_squared)
        for grad_total in (torch.tensor(1.5), torch.tensor(-0.75, dtype=torch.float64)):
            if accumulate:
                start = [make_values(p.numel(), dtype, "normal", gen) for p in params]

                def run(op):
                    grads = [g.clone() for g in start]
                    op.penalty_grad_accumulate_(grads, params, stats, scalar(l1), scalar(l2), l2_squared)
                    return grads
                got = on_every_schedule(lambda: run(EMU))
                want = run(CPU)
            else:
                got = on_every_schedule(lambda: EMU.penalty_backward(
                    grad_total, params, stats, scalar(l1), scalar(l2), l2_squared))
                want = CPU.penalty_backward(grad_total, params, stats, scalar(l1), scalar(l2), l2_squared)
            assert_bits_equal(got, want, f"gradients ({l2_squared=}, {grad_total=})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_of_a_subset_with_duplicates_in_stats_rows(dtype):
    gen = torch.Generator().manual_seed(13)
    params = boundary_list(dtype, "normal", gen)
    _, stats = CPU.penalty_forward(params, scalar(0.3), scalar(0.7), False)
    last = len(params) - 1
    subset, rows = [params[last], params[2], params[last]], [last, 2, last]
    got = on_every_schedule(lambda: EMU.penalty_backward(
        torch.tensor(2.0), subset, stats, scalar(0.3), scalar(0.7), False, rows))
    assert_bits_equal(got, CPU.penalty_backward(torch.tensor(2.0), subset, stats, scalar(0.3), scalar(0.7),
                                                False, rows), "backward with stats_rows")

    grad = make_values(params[last].numel(), dtype, "normal", gen)
    other = make_values(params[2].numel(), dtype, "normal", gen)

    def accumulate(op):  # the same gradient tensor twice: both updates, in order
        g, h = grad.clone(), other.clone()
        op.penalty_grad_accumulate_([g, h, g], subset, stats, scalar(0.3), scalar(0.7), False, rows)
        return [g, h]
    assert_bits_equal(on_every_schedule(lambda: accumulate(EMU)), accumulate(CPU),
                      "accumulate with a gradient listed twice")


@pytest.mark.parametrize("l2_squared", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_accumulate(dtype, l2_squared):
    gen = torch.Generator().manual_seed(14)
    params = boundary_list(dtype, "special", gen)
    start = [make_values(p.numel(), dtype, "normal", gen) for p in params]

    def run():
        grads = [g.clone() for g in start]
        total, stats = EMU.penalty_forward_accumulate_(grads, params, scalar(0.25), scalar(0.5), l2_squared)
        return total, stats, grads
    total, stats, grads = on_every_schedule(run)
    want_total, want_stats = EMU.penalty_forward(params, scalar(0.25), scalar(0.5), l2_squared)
    assert_bits_equal([total, stats], [want_total, want_stats], "forward of forward_accumulate_")
    # The gradients are those of the CPU kernel given the same stats.
    cpu_grads = [g.clone() for g in start]
    CPU.penalty_grad_accumulate_(cpu_grads, params, stats, scalar(0.25), scalar(0.5), l2_squared)
    assert_bits_equal(grads, cpu_grads, "gradients of forward_accumulate_")


@pytest.mark.parametrize("threshold", [0.0, 0.7, 1e30])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_l1_bitwise_equal_cpu(dtype, kind, threshold):
    gen = torch.Generator().manual_seed(15)
    params = boundary_list(dtype, kind, gen)

    def run(op):
        xs = [exact_size(p.clone(), i % 8) for i, p in enumerate(params)]
        op.prox_l1_(xs, scalar(threshold))
        return xs
    assert_bits_equal(on_every_schedule(lambda: run(EMU)), run(CPU), "prox_l1_")


def ulp(dtype):
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_group_l2(dtype, kind):
    """The factor comes from the emulated forward's norms, so it may differ from the
    CPU's in the last bits: each element within 2 ulp of the CPU's."""
    gen = torch.Generator().manual_seed(16)
    params = boundary_list(dtype, kind, gen)
    norms = float64_stats(params)[:, 1].sqrt()
    norms = norms[torch.isfinite(norms)].unique()  # sorted
    # A threshold between two tensors' norms, so that rounding never decides which
    # side a tensor falls on: the lower half is zeroed, the upper half shrunk.
    middle = float((norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2)
    for threshold in (0.0, middle, 1e300):
        def run(op):
            xs = [p.clone() for p in params]
            op.prox_group_l2_(xs, scalar(threshold))
            return xs
        got, want = on_every_schedule(lambda: run(EMU)), run(CPU)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=2 * ulp(dtype), atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_count_zeros_equal_cpu(dtype, kind):
    gen = torch.Generator().manual_seed(17)
    params = boundary_list(dtype, kind, gen)
    assert torch.equal(on_every_schedule(lambda: EMU.count_zeros(params)),
                       CPU.count_zeros(params))


def many_tensors(n, gen, dtypes=DTYPES, max_numel=300):
    sizes = torch.randint(0, max_numel, (n,), generator=gen).tolist()
    return [exact_size(make_values(s, dtypes[i % len(dtypes)], "normal", gen), i % 8)
            for i, s in enumerate(sizes)]


@pytest.mark.parametrize("dtypes, num_tensors",
                         [((torch.float32,), 1001), (DTYPES, 203), (DTYPES, 12)],
                         ids=["1001 tensors", "mixed dtypes", "few mixed dtypes"])
def test_several_batches(dtypes, num_tensors):
    """More than one launch's worth of tensors (1000 per batch), or several dtypes:
    several batches, the total kernel, and rows that must land on their own tensors."""
    gen = torch.Generator().manual_seed(18)
    params = many_tensors(num_tensors, gen, dtypes)
    stats = check_forward(params, 0.3, 0.6, False)
    assert_bits_equal(on_every_schedule(lambda: EMU.penalty_backward(
        torch.tensor(1.0), params, stats, scalar(0.3), scalar(0.6), False)),
        CPU.penalty_backward(torch.tensor(1.0), params, stats, scalar(0.3), scalar(0.6), False), "backward")
    assert torch.equal(EMU.count_zeros(params), CPU.count_zeros(params))

    def prox(op):
        xs = [p.clone() for p in params]
        op.prox_l1_(xs, scalar(0.5))
        return xs
    assert_bits_equal(prox(EMU), prox(CPU), "prox_l1_")


@pytest.mark.parametrize("num_tensors", [1, 10, 1000])
def test_launches_per_call(num_tensors):
    """Forward: at most 3 launches for one dtype and up to 1000 tensors; backward and
    the in-place steps: 1; every launch within CUDA's limits."""
    gen = torch.Generator().manual_seed(19)
    params = many_tensors(num_tensors, gen, (torch.float32,))
    (_, stats), fwd = launches(lambda: EMU.penalty_forward(params, scalar(0.1), scalar(0.2), False))
    assert len(fwd) <= 3, fwd
    _, bwd = launches(lambda: EMU.penalty_backward(torch.tensor(1.0), params, stats, scalar(0.1), scalar(0.2),
                                                   False))
    assert len(bwd) == 1, bwd
    _, prox = launches(lambda: EMU.prox_l1_([p.clone() for p in params], scalar(0.1)))
    assert len(prox) == 1, prox
    for blocks, threads, param_bytes in fwd + bwd + prox:
        assert param_bytes <= 32764 and threads <= 1024 and blocks >= 1


def test_a_kernel_argument_over_the_limit_would_be_refused():
    """The emulator's parameter-size check itself: the batch kernels' argument is
    the largest, and it leaves room below the limit."""
    gen = torch.Generator().manual_seed(20)
    params = many_tensors(3, gen, (torch.float32,))
    _, log = launches(lambda: EMU.penalty_forward(params, scalar(0.1), scalar(0.2), False))
    assert max(row[2] for row in log) > 32000  # the TensorBatch travels in the argument
    assert max(row[2] for row in log) <= 32764


def test_float32_accuracy_on_twenty_million_normal_elements():
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(20_000_000, generator=gen)
    _, stats = EMU.penalty_forward([x], scalar(1.0), scalar(1.0), False)
    want = float64_stats([x])
    assert ((stats - want).abs() / want).max().item() <= FLOAT32_RUN_BOUND


@pytest.mark.parametrize("magnitude", [1e-25, 1e20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elements_whose_float32_squares_leave_float32_range(dtype, magnitude):
    """1e-25 squared underflows float32 and 1e20 squared overflows it: those runs are
    summed again in float64, so the sums stay accurate (not 0, not inf)."""
    gen = torch.Generator().manual_seed(22)
    x = (magnitude * (1 + torch.rand(70_001, generator=gen, dtype=torch.float64))).to(dtype)
    _, stats = EMU.penalty_forward([x], scalar(1.0), scalar(1.0), False)
    want = float64_stats([x])
    assert torch.isfinite(stats).all() and (stats > 0).all()
    assert ((stats - want).abs() / want).max().item() <= FLOAT32_RUN_BOUND


def test_half_tensors_beside_float64_are_summed_in_float64():
    """The result is float64 once any parameter is float64: then every tensor,
    float16 included, is summed in float64, as on the CPU."""
    gen = torch.Generator().manual_seed(23)
    params = [torch.randn(98_000, generator=gen).half(), torch.randn(40_000, generator=gen).half(),
              torch.randn(10, generator=gen, dtype=torch.float64)]
    total, stats = EMU.penalty_forward(params, scalar(0.5), scalar(0.5), False)
    assert total.dtype == torch.float64
    want = float64_stats(params)
    assert ((stats - want).abs() / want).max().item() <= EXACT_BOUND


@pytest.mark.parametrize("name, index", cases(emulated=True))
def test_every_operator_matches_its_reference(name, index):
    """The operator table of tests/op_samples.py: every operator, emulated, against
    its float64 reference (so a new operator is covered here by its table entry), on
    the table's emulator-sized samples where it has them."""
    args = sample(name, index, emulated=True)
    got = on_every_schedule(lambda: outcome(name, getattr(EMU, name), args))
    want = outcome(name, OPS[name].reference, args)
    assert_close_outcomes(got, want, param_dtype(args), f"{name} sample {index}, emulated")
