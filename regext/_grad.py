"""The gradient of the penalty for autograd, shared by both autograd Functions
(regext.penalty for plain tensors, regext.distributed for DTensor shards).

A plain backward is one penalty_backward call, from the forward's float64 sums.
With ``create_graph=True`` (gradient penalties, Hessian-vector products) it is the
same call wrapped in PenaltyGrad, whose own backward is the exact second
derivative: the first derivative keeps the plain backward's accuracy and range,
and differentiating it again is exact too.
"""

import torch

from regext import _groups
from regext._groups import PER_TENSOR


def backward_grads(grad_total, params, stats, rows, l1, l2, l2_squared, reduce_dots=None, *,
                   grouping=PER_TENSOR):
    """``grad_total * d(penalty)/d(params[i])`` for every tensor of `params`, whose
    sums are row ``rows[i]`` of `stats` (rows None: row i; for groups, the row of
    the tensor's group 0, regext._groups.stats_rows).

    `reduce_dots`, for shards of larger tensors (regext.distributed), sums a float64
    [len(params), 2] tensor of per-tensor dot products across ranks, in place; the
    second derivative needs them over the whole tensors.
    """
    if not params:
        return []
    if not grouping.per_tensor:
        if torch.is_grad_enabled():
            return group_grads_differentiable(grad_total, params, l1, l2, grouping)
        return list(_groups.penalty_backward(grad_total, params, stats, l1, l2, False, rows,
                                             grouping))
    if torch.is_grad_enabled():
        return list(PenaltyGrad.apply(l1, l2, l2_squared, rows, reduce_dots, grad_total, stats,
                                      *params))
    return list(torch.ops.regext.penalty_backward(grad_total, params, stats, l1, l2, l2_squared,
                                                  rows))


def group_grads_differentiable(grad_total, params, l1, l2, grouping):
    """The group lasso's gradient as float64 torch operations (for create_graph=True):
    ``grad_total * (l1 sign(x) + l2 w_g x / ||x_g||)``, 0 where ``||x_g|| = 0`` (where
    the second derivative is 0 too), NaN where the norm is NaN; torch differentiates it
    again. Slower than the kernel (several passes per tensor)."""
    g = grad_total.to(torch.float64)
    l1_64, l2_64 = l1.to(g.device, torch.float64), l2.to(g.device, torch.float64)
    grads = []
    for p in params:
        x = p.to(torch.float64)
        rows = grouping.rows_of(x)
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        zero = norms == 0
        unit = torch.where(zero, torch.zeros_like(rows), rows / torch.where(zero, 1.0, norms))
        weight = rows.shape[1] ** 0.5 if grouping.sqrt_size else 1.0
        grad_rows = g * (l1_64 * rows.sign() + (l2_64 * weight) * unit)
        grads.append(grouping.from_rows(grad_rows, x).to(p.dtype))
    return grads


def coefficient_grads(ctx_needs, grad_total, stats, params, l2_squared, grouping=PER_TENSOR):
    """Gradients of the penalty with respect to l1 and l2 (None where not needed):
    the summed L1 norms and the summed L2 terms, times grad_total. From the float64
    stats, or, with grad mode on and plain `params` given, recomputed
    differentiably from them."""
    need_l1, need_l2 = ctx_needs
    if not (need_l1 or need_l2):
        return None, None
    if torch.is_grad_enabled() and params is not None:
        xs = [p.to(torch.float64) for p in params]
        sum_l1 = sum((x.abs().sum() for x in xs), torch.zeros((), dtype=torch.float64))
        if grouping.per_tensor:
            terms = (x.pow(2).sum() if l2_squared else torch.linalg.vector_norm(x) for x in xs)
        else:
            terms = (torch.linalg.vector_norm(rows, dim=1).sum()
                     * (rows.shape[1] ** 0.5 if grouping.sqrt_size else 1.0)
                     for rows in map(grouping.rows_of, xs))
        sum_l2 = sum(terms, torch.zeros((), dtype=torch.float64))
    elif grouping.per_tensor:
        sum_l1 = stats[:, 0].sum()
        sum_l2 = (stats[:, 1] if l2_squared else stats[:, 1].sqrt()).sum()
    else:
        sum_l1 = stats[:, 0].sum()
        sum_l2 = (stats[:, 1].sqrt() * grouping.weights(params).to(stats.device)).sum()
    g = grad_total.to(torch.float64)
    return (g * sum_l1 if need_l1 else None), (g * sum_l2 if need_l2 else None)


class PenaltyGrad(torch.autograd.Function):
    """The penalty's gradient (penalty_backward) as a differentiable function.

    forward: the kernel's gradients, ``grad_total * (l1 sign(x) + l2 x / ||x||)``
    (or ``+ 2 l2 x``), from the float64 norms in `stats`.
    backward: for each tensor and incoming v, the Hessian-vector product
        grad_total * l2 * (v - u <u, v>) / ||x||,   u = x / ||x||   (Euclidean)
        grad_total * 2 * l2 * v                                     (squared)
    (sign(x) is flat), 0 where ||x|| = 0 (the norm has no second derivative
    there; 0 matches the zero first derivative), NaN where the norm is NaN; and
    for grad_total, l1 and l2 the dot products of v with their derivatives. The
    dot products are float64 sums over the whole tensors (reduce_dots, for shards).
    """

    @staticmethod
    def forward(ctx, l1, l2, l2_squared, rows, reduce_dots, grad_total, stats, *params):
        grads = torch.ops.regext.penalty_backward(grad_total, list(params), stats, l1, l2,
                                                  l2_squared, rows)
        ctx.save_for_backward(grad_total, stats, l1, l2, *params)
        ctx.l2_squared, ctx.rows, ctx.reduce_dots = l2_squared, rows, reduce_dots
        return tuple(grads)

    @staticmethod
    def backward(ctx, *vs):
        grad_total, stats, l1, l2, *params = ctx.saved_tensors
        # The norms of these tensors, gathered by views (a list index would copy it to
        # the device from the host).
        norms = (stats[:, 1] if ctx.rows is None
                 else torch.stack([stats[r, 1] for r in ctx.rows])).sqrt()
        # Per tensor: <sign x, v> and <x, v>, in float64.
        dots = torch.zeros((len(params), 2), dtype=torch.float64, device=stats.device)
        for i, (x, v) in enumerate(zip(params, vs)):
            if v is not None:
                x64, v64 = x.to(torch.float64), v.to(torch.float64)
                dots[i, 0] = (x64.sign() * v64).sum()
                dots[i, 1] = (x64 * v64).sum()
        if ctx.reduce_dots is not None:
            dots = ctx.reduce_dots(dots)
        g = grad_total.to(torch.float64)
        l1_64, l2_64 = l1.to(stats.device, torch.float64), l2.to(stats.device, torch.float64)
        positive = norms > 0
        safe = torch.where(positive, norms, torch.ones_like(norms))
        if ctx.l2_squared:
            linear_dots = 2.0 * dots[:, 1]
        else:
            linear_dots = torch.where(positive, dots[:, 1] / safe, torch.zeros_like(norms))
        hvps = []
        for i, (x, v) in enumerate(zip(params, vs)):
            if v is None or not ctx.needs_input_grad[7 + i]:
                hvps.append(None)
                continue
            v64 = v.to(torch.float64)
            if ctx.l2_squared:
                hv = g * (2.0 * l2_64) * v64
            else:
                u = x.to(torch.float64) / safe[i]              # |u| <= 1: no overflow
                hv = g * l2_64 * (v64 - u * (dots[i, 1] / safe[i])) / safe[i]
                hv = torch.where(positive[i], hv, torch.zeros_like(hv))  # NaN norms stay NaN
                hv = torch.where(norms[i].isnan(), torch.full_like(hv, float("nan")), hv)
            hvps.append(hv.to(x.dtype))
        d_grad_total = d_l1 = d_l2 = None
        if ctx.needs_input_grad[5]:
            d_grad_total = (l1_64 * dots[:, 0].sum() + l2_64 * linear_dots.sum()).to(
                grad_total.dtype)
        if ctx.needs_input_grad[0]:
            d_l1 = (g * dots[:, 0].sum()).to(l1.device, l1.dtype)
        if ctx.needs_input_grad[1]:
            d_l2 = (g * linear_dots.sum()).to(l2.device, l2.dtype)
        return (d_l1, d_l2, None, None, None, d_grad_total, None, *hvps)
