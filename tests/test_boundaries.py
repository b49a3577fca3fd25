"""Every size around the CPU kernels' boundaries, every dtype: a deterministic sweep.

Sizes around the 16-element vector body and tail (vector_loops.cpp) and the
32768-element chunk (kChunkElems, penalty_cpu.cpp), each in a tensor whose
data ends exactly where its allocation ends, so that under AddressSanitizer
(.ci/sanitize) a read or write one element too far is reported. Forward,
backward and the in-place accumulate operator are compared with float64.
"""

import pytest
import torch

import regext
from regext.reference import penalty_float64

from conftest import DEVICES, grads_of, scalar

SIZES = [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 49,
         32767, 32768, 32769, 65535, 65536, 65537, 98303, 98305]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
GRAD_TOL = {torch.float64: (1e-12, 1e-300), torch.float32: (1e-6, 1e-44),
            torch.bfloat16: (1.6e-2, 1e-40), torch.float16: (2e-3, 1e-7)}


def _value_rtol(dtype, device):
    if dtype == torch.float64:
        return 1e-12
    return 1e-5 if torch.device(device).type == "cuda" else 1e-6  # float16 sums in float32 there


def _assert_close(got, want, rtol, atol, what):
    """All tensors at once (one assert_close per tensor is slow for half types)."""
    sizes = [g.numel() for g in got]
    got = torch.cat([g.reshape(-1).double() for g in got])
    want = torch.cat([w.reshape(-1).double() for w in want])
    bad = ~((got - want).abs() <= atol + rtol * want.abs())
    if bad.any():
        k = int(bad.nonzero()[0])
        n = next(i for i, c in enumerate(torch.tensor(sizes).cumsum(0).tolist()) if c > k)
        raise AssertionError(f"{what}: tensor {n} (size {sizes[n]}): {got[k].item()!r} vs "
                             f"{want[k].item()!r} (rtol {rtol}, atol {atol})")


def _tensors(dtype, gen, device):
    # One exact-size allocation per tensor (clone): nothing readable past its end
    # (on CUDA only with PYTORCH_NO_CUDA_MEMORY_CACHING=1, as benchmarks/gpu_check.sh
    # runs it under compute-sanitizer).
    return [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(device).clone()
            for n in SIZES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
@pytest.mark.parametrize("l2_squared", [False, True])
def test_sizes_around_vector_and_chunk_boundaries(device, dtype, l2_squared):
    gen = torch.Generator().manual_seed(3)
    params = [t.requires_grad_() for t in _tensors(dtype, gen, device)]
    out = regext.fused_penalty(params, 0.3, 0.7, l2_squared=l2_squared)
    ref = penalty_float64(params, 0.3, 0.7, l2_squared=l2_squared)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=_value_rtol(dtype, device), atol=0)
    rtol, atol = GRAD_TOL[dtype]
    _assert_close(grads_of(out, params), grads_of(ref, params), rtol, atol, "gradient")

    # In place, on gradients of the same exact sizes.
    xs = [p.detach() for p in params]
    acc = [torch.ones_like(x) for x in xs]
    _, stats = torch.ops.regext.penalty_forward(xs, scalar(0.3), scalar(0.7), l2_squared)
    torch.ops.regext.penalty_grad_accumulate_(acc, xs, stats, scalar(0.3), scalar(0.7), l2_squared)
    # Expected: 1 + the exact (float64) gradient. The sum is formed in the compute
    # type (float32 for all but float64), so allow a rounding of each operand (~1).
    exact = [x.double().requires_grad_() for x in xs]
    exact_grads = grads_of(penalty_float64(exact, 0.3, 0.7, l2_squared=l2_squared), exact)
    _assert_close(acc, [1.0 + h for h in exact_grads], rtol, max(atol, 2 * rtol), "accumulate")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
def test_offset_and_strided_views_at_boundaries(device, dtype):
    """Views that start one element into their storage, and ones the kernel must copy."""
    gen = torch.Generator().manual_seed(4)
    params = []
    for n in SIZES:
        base = torch.randn(n + 1, generator=gen, dtype=torch.float64).to(dtype).to(device)
        params.append(base[1:])  # storage offset 1: unaligned start, ends at the allocation
        params.append(torch.randn(2 * n, generator=gen, dtype=torch.float64).to(dtype)
                      .to(device)[::2])
    params = [p.detach().requires_grad_() for p in params]
    out = regext.fused_penalty(params, 0.2, 0.5)
    ref = penalty_float64(params, 0.2, 0.5)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=_value_rtol(dtype, device), atol=0)
    rtol, atol = GRAD_TOL[dtype]
    _assert_close(grads_of(out, params), grads_of(ref, params), rtol, atol, "gradient")
