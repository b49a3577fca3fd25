"""Range: sums that overflow the parameter's own type, and tiny or huge norms.

On CPU, float32 and the half types are summed in float32 over blocks of 256
elements and in float64 across blocks; a run whose float32 squares overflow,
or lose bits to underflow, is summed again element by element in float64. So a
float16/bfloat16 tensor whose sum of squares (or sum of magnitudes) overflows
its own type gives the finite, correct result, and so do float32 tensors of
±1e38 or of ±1e-25, at any length. The gradient of the
Euclidean norm, l2 * x / ||x||, is at most l2 in magnitude for any x; it must
stay finite and correct however tiny or huge ||x|| is.
"""

import math

import pytest
import torch

import regext
from regext.reference import penalty_float64

from conftest import grads_of, scalar

HALF_TYPES = [torch.float16, torch.bfloat16]


def _f64_grads(params, l1, l2, l2_squared=False):
    """float64 reference gradients, rounded to each parameter's dtype."""
    return grads_of(penalty_float64(params, l1, l2, l2_squared=l2_squared), params)


@pytest.mark.parametrize("l2_squared", [False, True])
def test_float16_sums_overflowing_float16_are_finite_and_exact(device, l2_squared):
    # sum x^2 = 4096 * 200^2 = 1.6e8 and sum |x| = 8.2e5: both far above 65504.
    p = torch.full((4096,), 200.0, dtype=torch.float16, device=device, requires_grad=True)
    q = torch.full((3, 1000), -60000.0, dtype=torch.float16, device=device, requires_grad=True)
    for params in ([p], [q], [p, q]):
        ours = regext.fused_penalty(params, 0.25, 0.5, l2_squared=l2_squared)
        exact = penalty_float64(params, 0.25, 0.5, l2_squared=l2_squared)
        assert ours.dtype == torch.float32 and math.isfinite(ours.item())
        assert ours.item() == pytest.approx(exact.item(), rel=1e-6)
        for g, h in zip(grads_of(ours, params), _f64_grads(params, 0.25, 0.5, l2_squared)):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, h, rtol=2e-3, atol=1e-3)


def test_bfloat16_sum_of_squares_overflowing_bfloat16_gives_finite_norm(device):
    # 1e19^2 * 1000 = 1e41: beyond bfloat16's (and float32's) range; the norm 3.2e20 is not.
    p = torch.full((1000,), 1e19, dtype=torch.bfloat16, device=device, requires_grad=True)
    ours = regext.fused_penalty([p], 0.0, 1.0)
    exact = penalty_float64([p], 0.0, 1.0)
    assert ours.dtype == torch.float32 and math.isfinite(ours.item())
    assert ours.item() == pytest.approx(exact.item(), rel=1e-6)
    (g,) = grads_of(ours, [p])
    torch.testing.assert_close(g, _f64_grads([p], 0.0, 1.0)[0], rtol=1e-2, atol=0)


@pytest.mark.parametrize("l2_squared", [False, True])
def test_float32_pm_1e38_accumulates_without_overflow(device, l2_squared):
    p = torch.tensor([3e38, -3e38, 1e38, -1e38, 1.0], device=device, requires_grad=True)
    # The L1 sum (8e38) and the sum of squares (2e77) overflow float32; the
    # penalty does not (the squared form needs a tiny l2 to fit float32).
    l2 = 1e-40 if l2_squared else 1e-3
    ours = regext.fused_penalty([p], 1e-3, l2, l2_squared=l2_squared)
    exact = penalty_float64([p], 1e-3, l2, l2_squared=l2_squared)
    assert math.isfinite(ours.item())
    assert ours.item() == pytest.approx(exact.item(), rel=1e-6)
    (g,) = grads_of(ours, [p])
    h = _f64_grads([p], 1e-3, l2, l2_squared)[0]
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_gradient_of_subnormal_tensor_is_finite_and_correct(device, dtype):
    """||x|| ~ 1e-40: 1 / ||x|| overflows float32, the gradient x / ||x|| does not.

    Regression: the CPU kernel formed l2 / ||x|| in float32, which gave inf
    gradients for the nonzero elements and NaN (inf * 0) for the zero ones.
    """
    p = torch.tensor([1e-40, -1e-40, 0.0, 3e-41], device=device).to(dtype).requires_grad_()
    assert 0 < p.detach().abs().max().item() < torch.finfo(torch.float32).tiny  # subnormal
    for l1 in (0.0, 0.5):
        (g,) = grads_of(regext.fused_penalty([p], l1, 1.0), [p])
        h = _f64_grads([p], l1, 1.0)[0]
        assert torch.isfinite(g).all(), g
        torch.testing.assert_close(g, h, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_gradient_of_huge_tensor_keeps_full_precision(device, dtype):
    """||x|| = 1e41: l2 / ||x|| = 1e-44 is a float32 subnormal with 3 significant bits.

    Regression: the CPU kernel rounded that factor to float32, so each gradient
    element (1e-5 here) came out up to several percent off.
    """
    p = torch.full((10_000,), 1e38, device=device).to(dtype).requires_grad_()
    (g,) = grads_of(regext.fused_penalty([p], 0.0, 1e-3), [p])
    h = _f64_grads([p], 0.0, 1e-3)[0]
    torch.testing.assert_close(g, h, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)



def test_accumulate_op_handles_extreme_norms_too(device):
    """penalty_grad_accumulate_ shares the kernel: same range for the in-place path."""
    params = [torch.tensor([1e-40, -1e-40, 0.0], device=device),
              torch.full((10_000,), 1e38, device=device)]
    start = [torch.ones_like(params[0]), torch.zeros_like(params[1])]
    grads = [g.clone() for g in start]
    _, stats = torch.ops.regext.penalty_forward(params, scalar(0.0), scalar(1.0), False)
    torch.ops.regext.penalty_grad_accumulate_(grads, params, stats, scalar(0.0), scalar(1.0), False)
    leaves = [p.clone().requires_grad_() for p in params]
    for g, g0, h in zip(grads, start, _f64_grads(leaves, 0.0, 1.0)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g0 + h, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("l2_squared", [False, True])
def test_penalty_beyond_float32_range_is_inf_not_an_error(device, dtype, l2_squared):
    """A finite float64 total that does not fit the float32 result becomes +inf.

    Regression: the CPU kernel raised "value cannot be converted to type float
    without overflow" (a RuntimeError in the middle of a training step) where
    the loop returns inf or NaN.
    """
    big = 6e4 if dtype == torch.float16 else 3e38
    p = torch.full((1000,), big, device=device).to(dtype).requires_grad_()
    l1 = 1e40 if dtype == torch.float16 else 1.0  # float16 sums cannot exceed float32 alone
    ours = regext.fused_penalty([p], l1, 1.0, l2_squared=l2_squared)
    assert ours.dtype == torch.float32 and ours.item() == math.inf
    # Gradients come from the float64 sums, not from the rounded total.
    (g,) = grads_of(ours, [p])
    torch.testing.assert_close(g, _f64_grads([p], l1, 1.0, l2_squared)[0], rtol=1e-2, atol=0)
    # float64 parameters keep the float64 total.
    q = p.detach().double()
    assert math.isfinite(regext.fused_penalty([q], l1, 1.0, l2_squared=l2_squared).item())


@pytest.mark.parametrize("l2, scale", [(1e-300, 1e38), (1e300, 1e-100), (1e-250, 1e100)])
def test_float64_gradient_with_extreme_coefficient_over_norm(device, l2, scale):
    """l2 / ||x|| beyond double's range, while each element l2 * x / ||x|| is not.

    Regression: the kernels formed l2 / ||x|| first: 1e-300 / 1e38 underflowed
    to 0 (the L2 part of the gradient vanished) and 1e300 / 1e-100 overflowed
    to inf. found by the property tests (l2 = 2e-291 on ±1e38 float64 values).
    """
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(7, 5, generator=gen, dtype=torch.float64) * scale).to(device)
    p.requires_grad_()
    for l1 in (0.0, l2):
        (g,) = grads_of(regext.fused_penalty([p], l1, l2), [p])
        h = _f64_grads([p], l1, l2)[0]
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, h, rtol=1e-12, atol=0)
    # The in-place operator shares the kernel.
    x = p.detach()
    acc = [torch.zeros_like(x)]
    _, stats = torch.ops.regext.penalty_forward([x], scalar(0.0), scalar(l2), False)
    torch.ops.regext.penalty_grad_accumulate_(acc, [x], stats, scalar(0.0), scalar(l2), False)
    torch.testing.assert_close(acc[0], _f64_grads([p], 0.0, l2)[0], rtol=1e-12, atol=0)


# Lengths that reach the CPU's float32 block loop (256 elements per block, 32Ki
# per chunk) and its tails, not only the short element-by-element tail.
BLOCK_LENGTHS = [256, 4096 + 17, 70_000]


def _stats(p):
    _, stats = torch.ops.regext.penalty_forward([p], scalar(0.0), scalar(0.0), False)
    return stats[0].tolist()


def _exact_stats(p):
    x = p.detach().double()
    return [x.abs().sum().item(), x.pow(2).sum().item()]


@pytest.mark.parametrize("n", BLOCK_LENGTHS)
@pytest.mark.parametrize("scale", [1e-25, 1e-21, 1e20, 1e30])
def test_float32_blocks_with_squares_outside_float32_range(device, n, scale):
    """x^2 underflows (1e-25, 1e-21) or overflows (1e20, 1e30) float32: the sums
    still match float64 to 1e-6 and the gradient stays finite and correct."""
    gen = torch.Generator().manual_seed(n)
    p = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).float().to(device)
    assert torch.isfinite(p).all()
    got, want = _stats(p), _exact_stats(p)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert got[1] == pytest.approx(want[1], rel=1e-6)
    p.requires_grad_()
    (g,) = grads_of(regext.fused_penalty([p], 0.0, 1.0), [p])
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, _f64_grads([p], 0.0, 1.0)[0], rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("n", BLOCK_LENGTHS)
def test_float32_blocks_keep_relative_error_below_1e6_on_wide_ranges(device, n):
    """Magnitudes spread over 12 decades (log-uniform), so a few elements carry
    most of the sum: the float32 block partials stay within 1e-6 of float64."""
    gen = torch.Generator().manual_seed(7 * n)
    mags = torch.pow(10.0, torch.rand(n, generator=gen, dtype=torch.float64) * 12 - 6)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    p = (mags * signs).float().to(device)
    got, want = _stats(p), _exact_stats(p)
    assert abs(got[0] - want[0]) <= 1e-6 * want[0]
    assert abs(got[1] - want[1]) <= 1e-6 * want[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad, expect", [(float("nan"), "nan"), (float("inf"), "inf"),
                                         (float("-inf"), "inf")])
def test_nan_or_inf_inside_a_block_propagates(device, dtype, bad, expect):
    p = torch.randn(4096, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
    p[1000] = bad
    abs_sum, sq_sum = _stats(p)
    if expect == "nan":
        assert math.isnan(abs_sum) and math.isnan(sq_sum)
    else:
        assert abs_sum == math.inf and sq_sum == math.inf
