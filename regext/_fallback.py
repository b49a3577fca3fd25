"""Reference kernels, in torch ops, for the proximal and sparsity operators.

They define the operators' semantics executably (the tests compare the C++
kernels with them) and stand in on CUDA until a compiled kernel exists: at
import, each is registered for the CUDA dispatch key of an operator that has
no compiled CUDA kernel, so ``regext.prox_l1_`` & co. work on GPU tensors in
any build. A compiled kernel, when present, is always the one used.

Each loops over the list in order, one tensor at a time, which is exactly the
list-order semantics of the in-place operators (csrc/ops.cpp).
"""

import torch

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_threshold(op, threshold):
    if not (threshold == threshold and abs(threshold) != float("inf") and threshold >= 0.0):
        raise ValueError(f"{op}: threshold must be a finite number >= 0, got {threshold}")


def prox_l1_reference(params, threshold):
    """x <- sign(x) * max(|x| - t, 0), computed in float32/float64, rounded once."""
    _check_threshold("regext::prox_l1_", threshold)
    for p in params:
        x = p.to(_compute_dtype(p))
        t = torch.tensor(threshold, dtype=x.dtype, device=x.device)  # rounded like the kernel
        magnitude = x.abs()
        shrunk = torch.where(x < 0, t - magnitude, magnitude - t)  # sign(x) * (|x| - t)
        p.copy_(torch.where(magnitude <= t, torch.zeros_like(x), shrunk))


def group_shrink_scale_reference(sum_sq, threshold):
    """The factor of penalty_math.h's group_shrink_scale, elementwise on a float64 tensor."""
    norm = sum_sq.sqrt()
    scale = torch.where(norm <= threshold, torch.zeros_like(norm), 1.0 - threshold / norm)
    return torch.where(torch.isnan(norm), torch.ones_like(norm), scale)


def prox_group_l2_reference(params, threshold):
    """x <- x * max(0, 1 - t / ||x||), norm from a float64 sum of squares."""
    _check_threshold("regext::prox_group_l2_", threshold)
    for p in params:
        if p.numel() == 0:
            continue
        sum_sq = p.to(torch.float64).pow(2).sum()
        scale = group_shrink_scale_reference(sum_sq, threshold)
        product = torch.float32 if p.dtype in _HALF_TYPES else torch.float64
        p.copy_(p.to(product) * scale.to(product))


def count_zeros_reference(params):
    """int64 [len(params)]: elements equal to +0 or -0 per tensor."""
    return torch.stack([(p == 0).sum() for p in params]).to(torch.int64)


_REFERENCES = {
    "prox_l1_": prox_l1_reference,
    "prox_group_l2_": prox_group_l2_reference,
    "count_zeros": count_zeros_reference,
}


def register_missing(dispatch_key="CUDA"):
    """Registers the references for `dispatch_key` where no compiled kernel exists."""
    registered = []
    for name, fn in _REFERENCES.items():
        qualname = f"regext::{name}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key):
            torch.library.impl(qualname, dispatch_key)(fn)
            registered.append(name)
    return registered


REGISTERED_CUDA_FALLBACKS = register_missing("CUDA")
