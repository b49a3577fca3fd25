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


def functorch_or_forward_ad():
    """Whether a torch.func transform or a torch.autograd.forward_ad level is active:
    the autograd Functions' torch.func variants are needed (their setup_context style
    costs plain calls an inspect.signature binding in Function.apply)."""
    return (torch._C._are_functorch_transforms_active()
            or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0)


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
        function = (PenaltyGradFunc if not torch.compiler.is_compiling()
                    and functorch_or_forward_ad() else PenaltyGrad)
        return list(function.apply(l1, l2, l2_squared, rows, reduce_dots, grad_total, stats,
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


def _safe_divide(num, norms):
    """num / norms, 0 where the norm is 0 (the L2 term's derivative there), NaN
    where it is NaN."""
    zero = norms == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, 1.0, norms))


def penalty_jvp(params, tangents, stats, l1, l2, l1_tangent, l2_tangent, l2_squared,
                grouping=PER_TENSOR):
    """Forward-mode derivative of the penalty (float64, 0-dim) along `tangents`
    (None: 0) and the coefficients' tangents:
        l1 <sign x, v> + l2 <x, v> / ||x||   (or 2 l2 <x, v> squared; per group
        w_g <x_g, v_g> / ||x_g|| for groups) + dl1 sum ||x||_1 + dl2 sum L2 terms,
    0 for the L2 part of a zero-norm tensor or group (as its gradient), NaN for a
    NaN one. Torch operations only, so it runs under every torch.func transform."""
    device = stats.device
    out = torch.zeros((), dtype=torch.float64, device=device)
    l1_64, l2_64 = l1.to(device, torch.float64), l2.to(device, torch.float64)
    for i, (x, v) in enumerate(zip(params, tangents)):
        if v is None:
            continue
        x64, v64 = x.to(torch.float64), v.to(torch.float64)
        out = out + l1_64 * (x64.sign() * v64).sum()
        if grouping.per_tensor:
            dot = (x64 * v64).sum()
            linear = 2.0 * dot if l2_squared else _safe_divide(dot, stats[i, 1].sqrt())
        else:
            rows, v_rows = grouping.rows_of(x64), grouping.rows_of(v64)
            norms = torch.linalg.vector_norm(rows, dim=1)
            linear = _safe_divide((rows * v_rows).sum(1), norms).sum()
            if grouping.sqrt_size:
                linear = linear * rows.shape[1] ** 0.5
        out = out + l2_64 * linear
    if l1_tangent is not None:
        out = out + l1_tangent.to(device, torch.float64) * stats[:, 0].sum()
    if l2_tangent is not None:
        if grouping.per_tensor:
            terms = stats[:, 1] if l2_squared else stats[:, 1].sqrt()
        else:
            terms = stats[:, 1].sqrt() * grouping.weights(params).to(device)
        out = out + l2_tangent.to(device, torch.float64) * terms.sum()
    return out


def _norms(stats, rows):
    """The norms of the tensors whose sums are `stats` rows `rows` (None: all),
    gathered by views (a list index would copy it to the device from the host)."""
    return (stats[:, 1] if rows is None else torch.stack([stats[r, 1] for r in rows])).sqrt()


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
    PenaltyGradFunc is the same for torch.func and forward-mode AD.
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
        norms = _norms(stats, ctx.rows)
        # Per tensor: <sign x, v> and <x, v>, in float64 (stacked, not written in
        # place: under vmap each row may be batched).
        no_dots = torch.zeros(2, dtype=torch.float64, device=stats.device)
        dots = torch.stack([
            no_dots if v is None else torch.stack([
                (x.to(torch.float64).sign() * v.to(torch.float64)).sum(),
                (x.to(torch.float64) * v.to(torch.float64)).sum()])
            for x, v in zip(params, vs)])
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


class PenaltyGradFunc(PenaltyGrad):
    """PenaltyGrad for torch.func transforms and torch.autograd.forward_ad: forward
    without ctx, setup_context, generate_vmap_rule (regext._batching batches the
    operator) and jvp (jacfwd(jacrev(...)), hessian). Kept apart as
    regext.penalty's _FusedPenaltyFunc is."""

    generate_vmap_rule = True

    @staticmethod
    def forward(l1, l2, l2_squared, rows, reduce_dots, grad_total, stats, *params):
        return tuple(torch.ops.regext.penalty_backward(grad_total, list(params), stats, l1, l2,
                                                       l2_squared, rows))

    @staticmethod
    def setup_context(ctx, inputs, output):
        l1, l2, l2_squared, rows, reduce_dots, grad_total, stats, *params = inputs
        ctx.save_for_backward(grad_total, stats, l1, l2, *params)
        ctx.save_for_forward(grad_total, stats, l1, l2, *params)
        ctx.l2_squared, ctx.rows, ctx.reduce_dots = l2_squared, rows, reduce_dots

    @staticmethod
    def jvp(ctx, l1_t, l2_t, _l2_squared, _rows, _reduce_dots, grad_total_t, _stats_t, *vs):
        """d/dt of grad_total * (l1 sign(x) + l2 L(x)), L(x) = x / ||x|| (or 2x), along
        (grad_total_t, l1_t, l2_t, vs): the backward's Hessian-vector product plus the
        coefficients' terms. `stats` is a function of the params, taken into account
        through them (its own tangent is ignored)."""
        if ctx.reduce_dots is not None:
            raise NotImplementedError(
                "fused_penalty: forward-mode AD (jvp, jacfwd, hessian) of the gradient of "
                "DTensor (sharded) parameters is not supported")
        grad_total, stats, l1, l2, *params = ctx.saved_tensors
        norms = _norms(stats, ctx.rows)
        g = grad_total.to(torch.float64)
        l1_64, l2_64 = l1.to(stats.device, torch.float64), l2.to(stats.device, torch.float64)
        out = []
        for i, (x, v) in enumerate(zip(params, vs)):
            x64 = x.to(torch.float64)
            norm = norms[i]
            if ctx.l2_squared:
                linear = 2.0 * x64
            else:
                linear = _safe_divide(x64, norm)       # u, 0 where ||x|| = 0
            t = torch.zeros_like(x64)
            if grad_total_t is not None:
                t = t + grad_total_t.to(torch.float64) * (l1_64 * x64.sign() + l2_64 * linear)
            if l1_t is not None:
                t = t + g * l1_t.to(stats.device, torch.float64) * x64.sign()
            if l2_t is not None:
                t = t + g * l2_t.to(stats.device, torch.float64) * linear
            if v is not None:
                v64 = v.to(torch.float64)
                if ctx.l2_squared:
                    hv = 2.0 * v64
                else:
                    hv = _safe_divide(v64 - linear * (linear * v64).sum(), norm)
                t = t + g * l2_64 * hv
            out.append(t.to(x.dtype))
        return tuple(out)
