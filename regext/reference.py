"""Reference implementations: the loop regext replaces, exact baselines, and the
executable semantics of the proximal and counting operators.

`penalty_loop` is the per-parameter loop people write (l1 * sum of torch.norm(p, 1)
plus l2 * sum of torch.norm(p, 2) over model.parameters()), written so that it
runs on any device; tests compare values and gradients against it, and the
benchmarks time it. `penalty_float64` is the ground truth for accuracy.
`penalty_foreach` is the best one can do with stock torch._foreach_norm.
`prox_l1_reference`, `prox_group_l2_reference` and `count_zeros_reference` define
what the operators compute, in torch ops, one tensor at a time in list order; the
tests compare the kernels with them bit for bit. `group_rows_reference`,
`group_lasso_float64` and `prox_group_lasso_reference` do the same for the group
lasso (groups along a dimension, regext/_groups.py).
"""

import math

import torch


def _start(params):
    # torch.tensor(0.) in the loop: a float32 zero, promoted by float64 norms.
    device = params[0].device if params else torch.device("cpu")
    return torch.zeros((), device=device)


def penalty_loop(params, l1=0.0, l2=0.0, *, l2_squared=False):
    """l1 * sum ||p||_1 + l2 * sum ||p||_2, one torch.norm per parameter."""
    params = list(params)
    l1_reg = _start(params)
    for p in params:
        l1_reg = l1_reg + torch.norm(p, 1)
    l2_reg = _start(params)
    for p in params:
        l2_reg = l2_reg + (p.pow(2).sum() if l2_squared else torch.norm(p, 2))
    return l1 * l1_reg + l2 * l2_reg


def penalty_float64(params, l1=0.0, l2=0.0, *, l2_squared=False):
    """The same penalty computed in float64 throughout (differentiable)."""
    params = [p.double() for p in params]
    l1_reg = sum((p.abs().sum() for p in params), torch.zeros((), dtype=torch.float64))
    l2_terms = (p.pow(2).sum() if l2_squared else torch.linalg.vector_norm(p) for p in params)
    l2_reg = sum(l2_terms, torch.zeros((), dtype=torch.float64))
    return l1 * l1_reg + l2 * l2_reg


def penalty_foreach(params, l1=0.0, l2=0.0, *, l2_squared=False):
    """The same penalty from two torch._foreach_norm calls (all tensors one dtype)."""
    params = list(params)
    if not params:
        return torch.zeros(())
    l1_reg = torch.stack(torch._foreach_norm(params, 1)).sum()
    norms = torch.stack(torch._foreach_norm(params, 2))
    l2_reg = norms.pow(2).sum() if l2_squared else norms.sum()
    return l1 * l1_reg + l2 * l2_reg


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def prox_l1_reference(params, threshold):
    """x <- sign(x) * max(|x| - t, 0), computed in float32/float64, rounded once."""
    for p in params:
        x = p.to(_compute_dtype(p))
        t = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)  # rounded like the kernel
        magnitude = x.abs()
        shrunk = torch.where(x < 0, t - magnitude, magnitude - t)  # sign(x) * (|x| - t)
        p.copy_(torch.where(magnitude <= t, torch.zeros_like(x), shrunk))


def group_shrink_scale_reference(sum_sq, threshold):
    """max(0, 1 - t / ||x||) from float64 sums of squares, elementwise; 1 (unchanged)
    where the norm is NaN (csrc/penalty_math.h, group_shrink_scale)."""
    norm = sum_sq.sqrt()
    scale = torch.where(norm <= threshold, torch.zeros_like(norm), 1.0 - threshold / norm)
    return torch.where(torch.isnan(norm), torch.ones_like(norm), scale)


def prox_group_l2_reference(params, threshold):
    """x <- x * max(0, 1 - t / ||x||), norm from a float64 sum of squares."""
    for p in params:
        if p.numel() == 0:
            continue
        sum_sq = p.to(torch.float64).pow(2).sum()
        scale = group_shrink_scale_reference(sum_sq, torch.as_tensor(threshold, dtype=torch.float64,
                                                                     device=sum_sq.device))
        product = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else torch.float64
        p.copy_(p.to(product) * scale.to(product))


def sqrt_float64(x):
    """Correctly rounded square roots of a float64 tensor, as the kernels' sqrt
    instructions give them: torch's vectorized CPU sqrt (Sleef) is 1 ulp off for
    about 1% of float64 inputs. NumPy's is the hardware's; without NumPy, Python's
    math.sqrt element by element. Any shape, 0-dim included."""
    try:
        import numpy as np
    except ImportError:
        values = [math.sqrt(v) if v >= 0 else math.nan for v in x.flatten().tolist()]
        return torch.tensor(values, dtype=torch.float64).reshape(x.shape).to(x.device)
    with np.errstate(invalid="ignore"):
        # np.sqrt of a 0-dim array is a NumPy scalar, which torch.from_numpy refuses.
        return torch.from_numpy(np.asarray(np.sqrt(x.detach().cpu().numpy()))).to(x.device)


def metric_denominator_reference(moment, mean, scale, eps):
    """d = sqrt(max(v - m², 0))·scale + eps in float64 (csrc/penalty_math.h,
    metric_denominator); `mean` None for none."""
    v = moment.to(torch.float64)
    if mean is not None:
        v = v - mean.to(torch.float64).pow(2)
        v = torch.where(v < 0, torch.zeros_like(v), v)  # NaN stays NaN
    return sqrt_float64(v) * scale + eps


def prox_metric_reference(params, moments, means, coefs):
    """x <- sign(x)·max(|x| - l1_step/d, 0) / (1 + ridge_step/d) per element, in
    float64, rounded once (through float32 for the half types); one row
    (l1_step, ridge_step, scale, eps) of `coefs` per tensor, in list order; a row
    whose two steps are 0 leaves its tensor as it is.

    The kernels give these bits for float64 parameters and with means; for float32
    and the half types without means they compute in float32 wherever that is
    provably within 5e-6 of this and makes the same zeros (csrc/penalty_math.h,
    metric_prox_float), so compare within that."""
    for t, p in enumerate(params):
        l1_step, ridge_step, scale, eps = (float(c) for c in coefs[t].cpu())
        if l1_step == 0 and ridge_step == 0:
            continue
        d = metric_denominator_reference(moments[t], means[t] if means else None, scale, eps)
        y = p.to(torch.float64)
        # torch.full_like(d, c) / d, not c / d: a number divided by a tensor is
        # computed as c * (1 / d) in torch, which rounds twice.
        if l1_step != 0:
            t1 = torch.full_like(d, l1_step) / d
            y = torch.where(y.abs() <= t1, torch.zeros_like(y), y - y.sign() * t1)
        if ridge_step != 0:
            y = y / (1.0 + torch.full_like(d, ridge_step) / d)
        p.copy_(y if p.dtype == torch.float64 else y.to(torch.float32))


def count_zeros_reference(params):
    """int64 [len(params)]: elements equal to +0 or -0 per tensor."""
    return torch.stack([(p == 0).sum() for p in params]).to(torch.int64)


def group_rows_reference(x, dim):
    """`x` in float64 as [groups, elements per group]: one row per slice along `dim`
    (0 or 1) for tensors of 2 or more dims, else (or for dim -1) one row."""
    x = x.to(torch.float64)
    if dim < 0 or x.dim() < 2:
        return x.reshape(1, -1)
    n = x.shape[dim]
    return x.movedim(dim, 0).reshape(n, x.numel() // n if n else 0)


def group_lasso_float64(params, group_dims, l1=0.0, l2=0.0, sqrt_size=False):
    """l1 * sum ||p||_1 + l2 * sum_g w_g ||g||_2 in float64 (differentiable), groups
    along group_dims[t]; w_g = sqrt(elements of g) with sqrt_size, else 1."""
    total = torch.zeros((), dtype=torch.float64)
    for p, dim in zip(params, group_dims):
        rows = group_rows_reference(p, dim)
        weight = rows.shape[1] ** 0.5 if sqrt_size else 1.0
        total = total + l1 * rows.abs().sum() + l2 * weight * torch.linalg.vector_norm(
            rows, dim=1).sum()
    return total


def prox_group_lasso_reference(params, group_dims, threshold, sqrt_size=False):
    """Each group g of each tensor, in list order: x_g <- x_g * max(0, 1 - t w_g / ||x_g||)
    (float64 norms; the product in float64, float32 for the half types)."""
    for p, dim in zip(params, group_dims):
        if p.numel() == 0:
            continue
        rows = group_rows_reference(p, dim)
        weight = rows.shape[1] ** 0.5 if sqrt_size else 1.0
        t = torch.as_tensor(threshold, dtype=torch.float64, device=rows.device) * weight
        scale = group_shrink_scale_reference(rows.pow(2).sum(dim=1, keepdim=True), t)
        product = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else torch.float64
        shape = p.movedim(dim, 0).shape if dim >= 0 and p.dim() >= 2 else p.shape
        scaled = (p.to(product).movedim(dim, 0) if dim >= 0 and p.dim() >= 2 else
                  p.to(product)).reshape(rows.shape) * scale.to(product)
        scaled = scaled.reshape(shape)
        p.copy_(scaled.movedim(0, dim) if dim >= 0 and p.dim() >= 2 else scaled)


def prox_group_metric_reference(params, moments, means, group_dims, coefs, sqrt_size=False):
    """The group lasso's proximal step in an optimizer's diagonal metric, in place, in
    list order (csrc/group_metric_math.h has the derivation): for each group g of
    params[t] (groups as prox_group_lasso_reference's), with d from moments[t] and
    means[t] (``means`` empty: none) and coefs[t] = (l1_step, 0, scale, eps) as
    prox_metric_reference's, lam = l1_step·w_g:
    ``u = argmin lam·‖u‖₂ + ½ Σ_i d_i (u_i − x_i)²``, float64, rounded once (through
    float32 for the half types). Groups holding NaN or inf, and rows with l1_step 0,
    are left as they are."""
    for t, p in enumerate(params):
        l1_step, _, scale, eps = (float(c) for c in coefs[t].cpu())
        if l1_step == 0 or p.numel() == 0:
            continue
        dim = group_dims[t]
        d = metric_denominator_reference(moments[t], means[t] if means else None, scale, eps)
        x = group_rows_reference(p, dim)
        rows_d = group_rows_reference(d, dim)
        weight = x.shape[1] ** 0.5 if sqrt_size else 1.0
        u = group_lasso_in_metric_reference(x, rows_d, torch.tensor(l1_step * weight,
                                                                    dtype=torch.float64))
        if p.dtype != torch.float64:
            u = u.to(torch.float32)
        grouped = dim >= 0 and p.dim() >= 2
        shape = p.movedim(dim, 0).shape if grouped else p.shape
        u = u.reshape(shape)
        p.copy_(u.movedim(0, dim) if grouped else u)


def group_lasso_in_metric_reference(x, d, lam, max_iterations=100):
    """argmin_u lam·‖u_g‖₂ + ½ Σ_i d_i (u_i − x_i)² for every row g of `x` (float64
    [groups, n]; `d` >= 0 of the same shape, `lam` a 0-dim float64 tensor >= 0), by
    Newton's method on τ = ‖u_g‖ (csrc/group_metric_math.h): u_i = x_i·τ/(τ + c_i)
    with c_i = lam/d_i, τ the root of Σ_i (x_i/(τ + c_i))² = 1 started from the
    lower bound max(‖x‖ − max c, max_i |x_i| − c_i, 0), and u = 0 iff ‖d ∘ x‖ ≤ lam.
    Rows holding NaN or inf, rows whose Σx² or Newton step leaves float64's range,
    and lam = 0 leave the row unchanged; a NaN d makes its row NaN."""
    finite = torch.isfinite(x).all(dim=1, keepdim=True)
    xs = torch.where(finite, x, 0.0)
    nonzero = xs != 0
    nan_d = (d.isnan() & finite).any(dim=1, keepdim=True)
    c = torch.full_like(d, float(lam)) / d  # +inf where d = 0, 0 where d = +inf
    sum_sq = xs.square().sum(dim=1, keepdim=True)
    keep = (lam == 0) | ~finite | (~nan_d & ~torch.isfinite(sum_sq))
    zero = torch.where(nonzero, d * xs, 0.0).square().sum(dim=1, keepdim=True) <= lam * lam
    c_nz = torch.where(nonzero & ~c.isnan(), c, 0.0)
    single = torch.where(nonzero, xs.abs() - c_nz, 0.0).amax(dim=1, keepdim=True)
    tau = torch.maximum(sum_sq.sqrt() - c_nz.amax(dim=1, keepdim=True), single).clamp_min(0.0)
    active = ~(zero | keep | nan_d)
    for _ in range(max_iterations):
        r = torch.where(nonzero, 1.0 / (c + tau), 0.0)
        q2 = (xs * r).square()
        phi = q2.sum(dim=1, keepdim=True)
        cubes = (q2 * r).sum(dim=1, keepdim=True)
        step = (phi * phi.sqrt() - phi) / torch.where(cubes > 0, cubes, 1.0)
        failed = active & ~torch.isfinite(step)
        keep = keep | failed
        active = active & ~failed
        moved = active & (step > tau * 2.0 ** -50)
        tau = torch.where(moved, tau + step, tau)
        if not bool(moved.any()):
            break
    u = torch.where(nonzero, (1.0 / (c + tau)) * tau * xs, xs)
    u = u.masked_fill(zero, 0.0).masked_fill(nan_d, math.nan)
    return torch.where(keep, x, u)
