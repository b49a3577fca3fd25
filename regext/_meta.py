"""Fake (meta) kernels: output shapes and dtypes without computing anything.

They let torch.compile, torch.export and FakeTensor tracing go through the
regext operators, and make parameters on the meta device give meta results.
"""

import torch


def is_non_overlapping_and_dense(t):
    """Mirror of c10's check: the elements fill one span of memory, in any order."""
    sizes, strides = t.shape, t.stride()
    if len(sizes) == 1:
        return sizes[0] < 2 or strides[0] == 1
    dims = sorted(range(len(sizes)), key=lambda d: (sizes[d] < 2, strides[d]))
    expected = 1
    for d in dims:
        if sizes[d] < 2:
            return True
        if strides[d] != expected:
            return False
        expected *= sizes[d]
    return True


def _result_dtype(params):
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _device_of(params):
    torch._check(len(params) > 0, lambda: "regext: params must not be empty")
    return params[0].device


@torch.library.register_fake("regext::penalty_forward")
def _penalty_forward_fake(params, l1, l2, l2_squared):
    device = _device_of(params)
    total = torch.empty((), dtype=_result_dtype(params), device=device)
    stats = torch.empty((len(params), 2), dtype=torch.float64, device=device)
    return total, stats


@torch.library.register_fake("regext::penalty_backward")
def _penalty_backward_fake(grad_total, params, stats, l1, l2, l2_squared):
    # Dense parameters keep their strides in the gradient; others get contiguous ones.
    return [torch.empty_like(p) if is_non_overlapping_and_dense(p) else
            torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]


@torch.library.register_fake("regext::penalty_grad_accumulate_")
def _penalty_grad_accumulate_fake(grads, params, stats, l1, l2, l2_squared):
    return None
