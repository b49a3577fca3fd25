"""The proximal step in an optimizer's metric (csrc/cuda/metric_cuda.cu), run by the
emulator: bit for bit the CPU kernels (both compute metric_prox of
csrc/penalty_math.h elementwise in float64, without fused multiply-adds), under every
fiber schedule, at sizes around the vector and chunk edges, misaligned, with special
values, centered or not, over several batches and dtypes, in one launch per batch.
The operator table's float64 reference is checked in test_emulated_cuda.py."""

import math

import pytest
import torch

from emulated import CPU, DTYPES, EMU, assert_bits_equal, exact_size, launches, on_every_schedule
from test_emulated_cuda import KINDS, boundary_list, make_values, many_tensors

# Rows (l1_step, ridge_step, scale, eps): both steps; L1 only with a large bias
# correction; the ridge factor only; eps = 0 (d = 0 where v = 0: threshold +inf);
# both steps 0 (a skipped AMP step: untouched); an eps below 1e-30 and an l1_step
# above 1e8, which keep float32/half tensors on the float64 path (metric_fits_float).
ROWS = [[0.3, 0.1, 1.5, 1e-8], [0.05, 0.0, 30.0, 1e-3], [0.0, 0.7, 1.0, 1e-8],
        [0.2, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1e-8], [0.3, 0.0, 1.0, 1e-35],
        [2e8, 0.0, 1e9, 1e-8]]


def coefs_for(n, shift=0):
    return torch.tensor([ROWS[(t + shift) % len(ROWS)] for t in range(n)], dtype=torch.float64)


def state_like(params, gen, scale):
    """Non-negative second moments (exact zeros every 5th element) or signed means, at
    the parameters' element offsets in exact-size allocations."""
    out = []
    for i, p in enumerate(params):
        v = torch.rand(p.numel(), generator=gen, dtype=torch.float64) * scale
        if scale > 0:
            v[::5] = 0.0
        else:
            v = v * -1.0 + 0.5 * scale
        out.append(exact_size(v.to(p.dtype), (i + 3) % 8))
    return out


def run_both(params, moments, means, coefs):
    def run(op):
        xs = [exact_size(p.clone(), i % 8) for i, p in enumerate(params)]
        op.prox_metric_(xs, moments, means, coefs)
        return xs
    return on_every_schedule(lambda: run(EMU)), run(CPU)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_metric_bitwise_equal_cpu(dtype, kind, centered):
    gen = torch.Generator().manual_seed(31)
    params = boundary_list(dtype, kind, gen)
    moments = state_like(params, gen, 2.0)
    means = state_like(params, gen, -1.0) if centered else []
    for shift in range(len(ROWS)):
        got, want = run_both(params, moments, means, coefs_for(len(params), shift))
        assert_bits_equal(got, want, f"prox_metric_ rows shifted by {shift}")


def test_special_values_of_the_state():
    """NaN and inf moments, means larger than the moments (v - m² < 0: clamped to 0)."""
    x = torch.tensor([1.0, -2.0, 3.0, 0.5, -0.5, math.nan, math.inf, 0.0] * 9)
    v = torch.tensor([math.nan, math.inf, 0.0, 4.0, 1e-30, 1.0, 1.0, 0.0] * 9)
    m = torch.tensor([0.0, 0.0, 5.0, 3.0, 0.0, 0.0, math.inf, math.nan] * 9)
    for dtype in DTYPES:
        for means in ([], [m.to(dtype)]):
            got, want = run_both([x.to(dtype)], [v.to(dtype)], means, coefs_for(1))
            assert_bits_equal(got, want, f"special state, {dtype}")


@pytest.mark.parametrize("dtypes, num_tensors",
                         [((torch.float32,), 801), (DTYPES, 203)],
                         ids=["801 tensors", "mixed dtypes"])
def test_several_batches_keep_each_tensors_row(dtypes, num_tensors):
    """More tensors than one MetricBatch holds (800), or dtypes interleaved in the
    list: each tensor must still read its own row of coefs."""
    gen = torch.Generator().manual_seed(32)
    params = many_tensors(num_tensors, gen, dtypes)
    moments = state_like(params, gen, 2.0)
    got, want = run_both(params, moments, [], coefs_for(num_tensors, 1))
    assert_bits_equal(got, want, "several batches")


@pytest.mark.parametrize("num_tensors", [1, 800])
def test_one_launch_per_batch_within_cuda_limits(num_tensors):
    gen = torch.Generator().manual_seed(33)
    params = many_tensors(num_tensors, gen, (torch.float32,))
    moments = state_like(params, gen, 2.0)
    _, log = launches(lambda: EMU.prox_metric_([p.clone() for p in params], moments, [],
                                                coefs_for(num_tensors)))
    assert len(log) == 1, log
    blocks, threads, param_bytes = log[0]
    assert param_bytes <= 32764 and threads <= 1024 and blocks >= 1


def test_a_table_row_of_zeros_leaves_the_tensor_untouched():
    """-0 and NaN payloads stay as they are: the block returns before any store."""
    x = torch.tensor([-0.0, 1.0, math.nan]).repeat(5000)
    want = x.clone()
    EMU.prox_metric_([x], [torch.ones_like(x)], [], coefs_for(5, 4)[:1])
    assert_bits_equal(x, want, "untouched")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coordinates_around_the_threshold_take_both_paths(dtype):
    """|x| across [0.5 t, 2 t]: float32 where it decides, float64 near t, per element,
    as the CPU does (csrc/penalty_math.h, metric_prox_float)."""
    gen = torch.Generator().manual_seed(35)
    n = 40000
    v = torch.rand(n, generator=gen, dtype=torch.float64) * 1e-3
    d = v.sqrt() * 31.6 + 1e-8
    ratio = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    x = (ratio * 2e-4 / d * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)).to(dtype)
    coefs = torch.tensor([[2e-4, 0.0, 31.6, 1e-8], [2e-4, 3e-5, 31.6, 1e-8]], dtype=torch.float64)
    got, want = run_both([x, x.clone()], [v.to(dtype), v.to(dtype)], [], coefs)
    assert_bits_equal(got, want, "around the threshold")


def test_values_span_the_chunk_boundary():
    gen = torch.Generator().manual_seed(34)
    x = make_values(2 * 32768 + 37, torch.float32, "normal", gen)
    v = torch.rand(x.numel(), generator=gen)
    got, want = run_both([x], [v], [], coefs_for(1))
    assert_bits_equal(got, want, "two chunks and a tail")
