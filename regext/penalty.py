"""fused_penalty: the public, differentiable entry point, and its autograd Function."""

import torch

from regext import distributed
from regext._dtensor import has_dtensor
from regext._grad import backward_grads
from regext._validation import check_coefficient, materialize_params_and_device


class _FusedPenalty(torch.autograd.Function):
    """Penalty over tensors that share one device (dtypes may differ).

    forward: one torch.ops.regext.penalty_forward call reads every tensor once
    and keeps per-tensor sums (`stats`, O(#tensors) floats) for the backward.
    backward: one penalty_backward call writes every needed gradient from
    `stats` (regext._grad), with no reduction and no host synchronization.
    A torch.autograd.Function rather than torch.library.register_autograd: the
    DTensor path (regext.distributed) must all_reduce `stats` between the
    operator and the total, which an operator's own autograd formula cannot.
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
        # Frozen parameters cost nothing: only the needed ones, each told its stats row.
        rows = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        grads = [None] * len(params)
        subset = backward_grads(grad_total, [params[i] for i in rows], stats,
                                None if len(rows) == len(params) else rows, *ctx.coefficients)
        for i, g in zip(rows, subset):
            grads[i] = g
        return (None, None, None, *grads)


def penalty_on_one_device(params, l1, l2, l2_squared):
    """fused_penalty for a checked, non-empty list of plain tensors on one device."""
    return _FusedPenalty.apply(l1, l2, l2_squared, *params)


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
    return penalty_of_checked(params, l1, l2, l2_squared, same_device)


def penalty_of_checked(params, l1, l2, l2_squared, same_device):
    """fused_penalty for a checked, non-empty list: DTensors, one device, or several."""
    if has_dtensor(params):
        # Sharded (FSDP2 / DTensor) parameters: local shards, one all_reduce.
        return distributed.fused_penalty_dtensor(params, l1, l2, l2_squared)
    if same_device:
        return penalty_on_one_device(params, l1, l2, l2_squared)
    first_device = params[0].device
    # Mixed devices: one fused call per device, summed on the first device.
    totals = [penalty_on_one_device(group, l1, l2, l2_squared).to(first_device)
              for group in _group_by_device(params)]
    total = totals[0]
    for t in totals[1:]:
        total = total + t
    return total
