"""The group lasso's proximal step in an optimizer's metric (csrc/cuda/group_metric_cuda.cu),
run by the emulator.

Every group layout of csrc/groups.h (test_emulated_groups.LAYOUTS: short and long
rows, runs repeated over outer, pieces, position blocks, conv filters and input
channels, empty tensors), misaligned in allocations of exactly their size, all four
dtypes, centered or not, with group thresholds near the groups' ||d o x|| so that
some groups are zeroed and others shrink. Oracles: the float64 reference
(regext.reference.prox_group_metric_reference) and the CPU kernel; the sums run in a
different order on each, so values agree within float64 round-off amplified by the
conditioning near a group's zero threshold (1e-9 relative), then within one unit in
the last place of the dtype; zeros, NaN and inf exactly. Results
are bitwise identical under the three fiber schedules (a missing barrier between
the block's sums and its broadcast of tau makes them differ).
"""

import math

import pytest
import torch

from emulated import CPU, DTYPES, EMU, assert_bits_equal, exact_size, launches, on_every_schedule
from regext.reference import group_rows_reference, prox_group_metric_reference
from test_emulated_cuda import make_values, many_tensors
from test_emulated_groups import CHUNK, LAYOUTS, place

# How far two float64 solutions may differ: their sums run in different orders, and
# a group near its zero threshold (tau small against c) is ill-conditioned: tau, and u
# with it, moves by the sums' round-off over phi's slope (1e-12 relative measured on
# these layouts). Then each is rounded to the dtype: one unit in its last place.
FLOAT64_AGREEMENT = 1e-9
ULP = {torch.float64: 0.0, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10,
       torch.bfloat16: 2.0 ** -7}


def moments_like(params, gen, scale=2.0, offset=3):
    out = []
    for i, p in enumerate(params):
        v = torch.rand(p.numel(), generator=gen, dtype=torch.float64) * scale
        out.append(exact_size(v.to(p.dtype), (i + offset) % 8).view(p.shape))
    return out


def means_like(params, gen):
    return [exact_size((0.3 * torch.randn(p.numel(), generator=gen, dtype=torch.float64))
                       .to(p.dtype), (i + 5) % 8).view(p.shape) for i, p in enumerate(params)]


def group_size(shape, dim):
    n = math.prod(shape)
    if len(shape) < 2 or n == 0:
        return max(n, 1)
    return n // shape[dim]


def rows_for(layouts, sqrt_size, factor):
    """(l1_step, 0, scale, eps) per tensor: lam = l1_step·w_g near ||d o x|| of a group
    of normal values (3·randn, d ≈ sqrt(U(0, 2)) ≈ 0.94), times `factor`."""
    rows = []
    for t, (shape, dim) in enumerate(layouts):
        expected = 3.0 * 0.94 * math.sqrt(group_size(shape, dim))
        step = factor * expected / (math.sqrt(group_size(shape, dim)) if sqrt_size else 1.0)
        scale = 4.0 if t % 5 == 2 else 1.0  # a large bias correction now and then
        rows.append([step / (scale if t % 5 == 2 else 1.0), 0.0, scale, 1e-8])
    return torch.tensor(rows, dtype=torch.float64)


def run_emulated(params, moments, means, dims, coefs, sqrt_size):
    def run():
        xs = [exact_size(p.clone().flatten(), i % 8).view(p.shape) for i, p in enumerate(params)]
        EMU.prox_group_metric_(xs, moments, means, dims, coefs, sqrt_size)
        return xs
    return on_every_schedule(run)


def run_cpu(params, moments, means, dims, coefs, sqrt_size):
    xs = [p.clone() for p in params]
    CPU.prox_group_metric_(xs, moments, means, dims, coefs, sqrt_size)
    return xs


def run_reference(params, moments, means, dims, coefs, sqrt_size):
    xs = [p.clone() for p in params]
    prox_group_metric_reference(xs, moments, means, dims, coefs, sqrt_size)
    return xs


def assert_agree(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, i)
        g64, w64 = g.double(), w.double()
        assert torch.equal(g64 == 0, w64 == 0), f"{what}, tensor {i}: zeros differ"
        assert torch.equal(g64.isnan(), w64.isnan()), f"{what}, tensor {i}: NaNs differ"
        finite = torch.isfinite(w64)
        same = (g64 == w64) | (g64.isnan() & w64.isnan())
        assert bool(same[~finite].all()), f"{what}, tensor {i}: NaN or inf differ"
        err = (g64 - w64).abs()[finite]
        bound = (FLOAT64_AGREEMENT + ULP[g.dtype]) * w64.abs()[finite] + 1e-300
        assert bool((err <= bound).all()), (
            f"{what}, tensor {i} {tuple(g.shape)}: max error {float(err.max())} "
            f"over {FLOAT64_AGREEMENT} + {ULP[g.dtype]} relative")


# Each dtype once, each option with two dtypes: every fiber of every group block runs
# ~8 passes over its group under three schedules, which under AddressSanitizer costs
# minutes per case for the long layouts (a full dtype x option product took ~4 minutes
# a case in CI); the long rows (pieces of 32Ki elements) run in one case.
CASES = [(torch.float32, False, False, True), (torch.float64, True, True, False),
         (torch.float16, False, True, False), (torch.bfloat16, True, False, False)]
LONG = {((2, CHUNK - 1), 0), ((2, CHUNK), 0), ((2, CHUNK + 1), 0), ((2, 2, CHUNK + 5), 1)}


@pytest.mark.parametrize("dtype, sqrt_size, centered, long_rows", CASES,
                         ids=[f"{d}-sqrt{s}-centered{c}" for d, s, c, _ in CASES])
def test_every_layout_matches_the_reference_and_the_cpu(dtype, sqrt_size, centered, long_rows):
    gen = torch.Generator().manual_seed(41)
    layouts = [lay for lay in LAYOUTS if long_rows or lay not in LONG]
    params = [place(shape, dtype, "normal", gen, i % 8) for i, (shape, _) in enumerate(layouts)]
    dims = [d for _, d in layouts]
    moments = moments_like(params, gen)
    means = means_like(params, gen) if centered else []
    for factor in (0.9, 1.1):
        coefs = rows_for(layouts, sqrt_size, factor)
        args = (params, moments, means, dims, coefs, sqrt_size)
        got = run_emulated(*args)
        want = run_reference(*args)
        assert_agree(got, want, f"factor {factor}: emulated CUDA against float64")
        assert_agree(got, run_cpu(*args), f"factor {factor}: emulated CUDA against the CPU")
        zeroed = shrunk = 0  # groups set to 0, and groups scaled but not zeroed
        for g, p, dim in zip(got, params, dims):
            for u, x in zip(group_rows_reference(g, dim), group_rows_reference(p, dim)):
                if bool((x != 0).any()):
                    zero = bool((u == 0).all())
                    zeroed += zero
                    shrunk += not zero and not torch.equal(u, x)
        assert zeroed > 0 and shrunk > 0, (zeroed, shrunk)


@pytest.mark.parametrize("state", ["zeros", "inf", "nan"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype, state):
    """A group holding NaN or inf is left unchanged; a second moment of exactly 0 with
    eps 0 gives an infinite c (that coordinate becomes 0, the rest of its group
    shrinks); an infinite second moment gives c = 0 (that coordinate keeps its value);
    a NaN one makes its group NaN; an all-zero group stays zero; huge and tiny values."""
    gen = torch.Generator().manual_seed(42)
    x = make_values(12 * 40, dtype, "special", gen).view(12, 40)
    x[5] = 0.0
    v = torch.rand(12, 40, generator=gen, dtype=torch.float64).to(dtype)
    v[:, ::4] = 0.0
    if state == "inf":
        v[:, 1::9] = math.inf
    elif state == "nan":
        v[2, 3] = v[7, 30] = math.nan
    for eps in (0.0, 1e-8):
        coefs = torch.tensor([[1.5, 0.0, 1.0, eps]], dtype=torch.float64)
        for dim in (0, 1, -1):
            args = ([x], [v], [], [dim], coefs, False)
            got = run_emulated(*args)
            assert_agree(got, run_reference(*args), f"special values, dim {dim}, eps {eps}")
            assert_agree(got, run_cpu(*args), f"special values against the CPU, dim {dim}")


def test_a_row_with_no_step_leaves_the_tensor_untouched():
    """-0 and NaN payloads stay as they are: the block returns before any store (the
    row of a skipped AMP step)."""
    x = torch.tensor([-0.0, 1.0, math.nan, 2.0]).repeat(300).view(40, 30)
    want = x.clone()
    coefs = torch.tensor([[0.0, 0.0, 1.0, 1e-8]], dtype=torch.float64)
    EMU.prox_group_metric_([x], [torch.ones_like(x)], [], [0], coefs, False)
    assert_bits_equal(x, want, "untouched")


@pytest.mark.parametrize("dtypes, num_tensors",
                         [((torch.float32,), 441), (DTYPES, 150)],
                         ids=["441 tensors", "mixed dtypes"])
def test_several_batches_keep_each_tensors_row(dtypes, num_tensors):
    """More tensors than one launch holds (440), or dtypes interleaved: each tensor
    must read its own row of coefs and its own state."""
    gen = torch.Generator().manual_seed(43)
    flat = many_tensors(num_tensors, gen, dtypes, max_numel=60)
    params = [p.view(2, p.numel() // 2) if p.numel() % 2 == 0 else p for p in flat]
    dims = [t % 2 for t in range(num_tensors)]
    moments = moments_like(params, gen)
    steps = [0.5 + 3.0 * ((t * 7919) % 13) / 13 for t in range(num_tensors)]
    coefs = torch.tensor([[s, 0.0, 1.0, 1e-8] for s in steps], dtype=torch.float64)
    args = (params, moments, [], dims, coefs, True)
    got = run_emulated(*args)
    assert_agree(got, run_reference(*args), "several batches")


@pytest.mark.parametrize("num_tensors", [1, 440])
def test_one_launch_per_batch_within_cuda_limits(num_tensors):
    gen = torch.Generator().manual_seed(44)
    params = [p.view(1, p.numel()) for p in many_tensors(num_tensors, gen, (torch.float32,),
                                                  max_numel=40)]
    moments = moments_like(params, gen)
    coefs = torch.tensor([[1.0, 0.0, 1.0, 1e-8]] * num_tensors, dtype=torch.float64)
    _, log = launches(lambda: EMU.prox_group_metric_([p.clone() for p in params], moments, [],
                                                      [0] * num_tensors, coefs, False))
    groups = sum(1 for p in params if p.numel() > 0)
    assert groups > 0 and len(log) == 1, log
    blocks, threads, param_bytes = log[0]
    assert blocks == groups and param_bytes <= 32764 and threads <= 1024
