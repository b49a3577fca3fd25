"""One tensor of more than 2**31 elements on CPU: 64-bit indexing everywhere.

Opt-in (REGEXT_LARGE_TESTS=1, or REGEXT_SLOW_TESTS=1): it needs about 9 GB of
free memory and a few minutes on two cores, too much for every CI run:

    REGEXT_LARGE_TESTS=1 python -m pytest -q tests/test_large.py -p no:logging -s

The elements past index 2**31 are set to a distinctive value, so a kernel that
wrapped a 32-bit index or skipped the tail would be off by far more than the
tolerance. The reference sums are computed in float64 chunk by chunk (no
float64 copy of the whole tensor).
"""

import gc
import os
import time

import pytest
import torch

import regext
from conftest import scalar

LARGE = any(os.environ.get(v, "0") == "1" for v in ("REGEXT_LARGE_TESTS", "REGEXT_SLOW_TESTS"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not LARGE, reason="opt in with REGEXT_LARGE_TESTS=1 (needs ~9 GB of RAM)")]

N = 2**31 + 4099  # odd, and past every 32-bit index
TAIL = 2**31  # from here on, the distinctive value
STEP = 2**25  # reference chunk: 256 MiB of float64


def _fill(dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.empty(N, dtype=dtype)
    for i in range(0, TAIL, STEP):
        x[i:min(i + STEP, TAIL)].uniform_(-1.0, 1.0, generator=gen)
    x[TAIL:] = 8.0
    return x


def _reference_sums(x):
    """(sum |x|, sum x^2) in float64, chunk by chunk, in a fixed order."""
    abs_sum = sq_sum = 0.0
    for i in range(0, x.numel(), STEP):
        c = x[i:i + STEP].double()
        abs_sum += c.abs().sum().item()
        sq_sum += c.pow(2).sum().item()
    return abs_sum, sq_sum


def test_float32_tensor_over_2_31_elements_gives_the_right_value():
    t0 = time.perf_counter()
    x = _fill(torch.float32)
    abs_sum, sq_sum = _reference_sums(x)
    t1 = time.perf_counter()
    total, stats = torch.ops.regext.penalty_forward([x], scalar(1e-3), scalar(1e-2), False)
    t2 = time.perf_counter()
    torch.testing.assert_close(stats, torch.tensor([[abs_sum, sq_sum]], dtype=torch.float64),
                               rtol=1e-10, atol=0)
    exact = 1e-3 * abs_sum + 1e-2 * sq_sum ** 0.5
    assert total.dtype == torch.float32
    assert abs(total.item() - exact) <= 1e-6 * exact
    for sq in (False, True):
        value = regext.fused_penalty([x], 0.5, 0.25, l2_squared=sq).item()
        want = 0.5 * abs_sum + 0.25 * (sq_sum if sq else sq_sum ** 0.5)
        assert abs(value - want) <= 1e-6 * want
    # Without the tail the sums would be off by 4099 * 8 = 32792 (of ~1.07e9): ~3e-5.
    print(f"\nfloat32, {N} elements: sum|x| = {abs_sum:.6f}, regext {stats[0, 0].item():.6f}; "
          f"sum x^2 = {sq_sum:.6f}, regext {stats[0, 1].item():.6f}; "
          f"fill+reference {t1 - t0:.0f} s, forward {t2 - t1:.1f} s")
    del x
    gc.collect()


def test_float16_tensor_over_2_31_elements_forward_and_backward():
    x = _fill(torch.float16).requires_grad_()
    abs_sum, sq_sum = _reference_sums(x.detach())
    l1, l2 = 1e-3, 100.0
    out = regext.fused_penalty([x], l1, l2)
    exact = l1 * abs_sum + l2 * sq_sum ** 0.5
    assert abs(out.item() - exact) <= 1e-6 * exact
    (g,) = torch.autograd.grad(out, [x])
    assert g.dtype == torch.float16 and g.shape == x.shape
    norm = sq_sum ** 0.5
    worst = 0.0
    for i in range(0, N, STEP):  # every gradient element, chunk by chunk
        c = x.detach()[i:i + STEP].double()
        want = l1 * torch.sign(c) + l2 * c / norm
        got = g[i:i + STEP].double()
        err = ((got - want).abs() / (want.abs() + 1e-7)).max().item()
        worst = max(worst, err)
    assert worst <= 2e-3, worst
    tail = g[TAIL:].double()
    assert torch.allclose(tail, torch.full_like(tail, l1 + l2 * 8.0 / norm), rtol=2e-3)
    print(f"\nfloat16, {N} elements: value {out.item():.6f} vs {exact:.6f}; "
          f"worst gradient relative error {worst:.2e}")
