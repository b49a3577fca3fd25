"""fused_penalty: the public, differentiable entry point."""

import torch

from regext._validation import check_coefficient, materialize_params_and_device
from regext.distributed import fused_penalty_dtensor, has_dtensor


class _FusedPenalty(torch.autograd.Function):
    """Penalty over tensors that share one device (dtypes may differ).

    forward: one torch.ops.regext.penalty_forward call reads every tensor once
    and keeps per-tensor sums (`stats`, O(#tensors) floats) for the backward.
    backward: one penalty_backward call writes every needed gradient from
    `stats`, with no reduction and no host synchronization.
    """

    @staticmethod
    def forward(ctx, l1, l2, l2_squared, *params):
        total, stats = torch.ops.regext.penalty_forward(params, l1, l2, l2_squared)
        ctx.save_for_backward(stats, *params)
        ctx.coefficients = (l1, l2, l2_squared)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        stats, *params = ctx.saved_tensors
        l1, l2, l2_squared = ctx.coefficients
        needed = ctx.needs_input_grad[3:]
        grads = [None] * len(params)
        if torch.is_grad_enabled():
            # create_graph=True: build the gradient from differentiable torch ops so a
            # second derivative (e.g. a gradient penalty on top) is exact, not dropped.
            for i, need in enumerate(needed):
                if need:
                    grads[i] = _differentiable_grad(grad_total, params[i], l1, l2, l2_squared)
        else:
            # Frozen parameters cost nothing: only the needed ones go to the kernel,
            # each told its stats row (host metadata, no device gather).
            rows = [i for i, need in enumerate(needed) if need]
            if rows:
                sub = torch.ops.regext.penalty_backward(
                    grad_total, [params[i] for i in rows], stats, l1, l2, l2_squared,
                    None if len(rows) == len(params) else rows)
                for i, g in zip(rows, sub):
                    grads[i] = g
        return (None, None, None, *grads)


def _differentiable_grad(grad_total, p, l1, l2, l2_squared):
    """d(penalty)/dp * grad_total as a differentiable expression (double backward)."""
    x = p.to(torch.float64 if p.dtype == torch.float64 else torch.float32)
    if l2_squared:
        linear = 2.0 * x
    else:
        norm = torch.linalg.vector_norm(x)
        # x / ||x||, and 0 for an all-zero tensor; the guarded denominator keeps
        # the second derivative free of 0/0 there. A NaN norm stays NaN.
        linear = x / torch.where(norm == 0, torch.ones_like(norm), norm)
    return (grad_total.to(x.dtype) * (l1 * torch.sign(x) + l2 * linear)).to(p.dtype)


def _group_by_device(params):
    groups = {}
    for p in params:
        groups.setdefault(p.device, []).append(p)
    return list(groups.values())


def fused_penalty(params, l1=0.0, l2=0.0, *, l2_squared=False):
    """``l1 * sum_p ||p||_1 + l2 * sum_p ||p||_2`` over all tensors, fused.

    Args:
        params: any iterable of floating-point tensors, e.g. ``model.parameters()``.
            float16/bfloat16 accumulate in float32 or better; every tensor may have
            any layout (non-contiguous views are fine). A tensor listed twice counts twice.
            DTensors (FSDP2 ``fully_shard``, tensor parallel) are accepted, alone or
            mixed with plain tensors: the penalty is the one of the full tensors, at
            the cost of one all_reduce for the whole list (see regext.distributed).
        l1: coefficient of the summed L1 norms (finite, >= 0).
        l2: coefficient of the summed L2 terms (finite, >= 0).
        l2_squared: if True the L2 term of each tensor is ``||p||_2 ** 2`` (ridge /
            weight-decay form) instead of the Euclidean norm ``||p||_2``.

    Returns:
        A 0-dim tensor on the first parameter's device; float64 if any parameter is
        float64, else float32. Differentiable with respect to every parameter that
        requires grad; its gradients match torch's autograd of the per-parameter loop
        (sign(0) = 0, zero gradient for a zero-norm tensor, NaN/inf propagate).
        An empty iterable gives ``tensor(0.)``.

    Raises:
        ValueError: ``l1`` or ``l2`` is not a finite number >= 0.
        TypeError: an element is not a tensor, or not a strided real floating-point
            tensor; the message names its position and dtype.
    """
    l1 = check_coefficient("fused_penalty", "l1", l1)
    l2 = check_coefficient("fused_penalty", "l2", l2)
    l2_squared = bool(l2_squared)
    params, same_device = materialize_params_and_device("fused_penalty", params)
    if not params:
        return torch.zeros(())
    if has_dtensor(params):
        # Sharded (FSDP2 / DTensor) parameters: local shards, one all_reduce.
        return fused_penalty_dtensor(params, l1, l2, l2_squared)
    if same_device:
        return _FusedPenalty.apply(l1, l2, l2_squared, *params)
    first_device = params[0].device
    # Mixed devices: one fused call per device, summed on the first device.
    totals = [_FusedPenalty.apply(l1, l2, l2_squared, *group).to(first_device)
              for group in _group_by_device(params)]
    total = totals[0]
    for t in totals[1:]:
        total = total + t
    return total
