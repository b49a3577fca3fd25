"""fused_penalty: the public, differentiable entry point, and its autograd Function."""

import torch

from regext import _batching  # noqa: F401  (vmap rules of the operators)
from regext import _fastpath, _groups, _nonfinite, distributed, distributed_groups
from regext._dtensor import functorch_error, has_dtensor
from regext._engines import distributed_active, zero3_in
from regext._groups import PER_TENSOR
from regext._grad import (backward_grads, coefficient_grads, functorch_or_forward_ad,
                          penalty_jvp)
from regext._validation import coefficient, materialize_params_and_device


class _FusedPenalty(torch.autograd.Function):
    """Penalty over tensors that share one device (dtypes may differ).

    forward: one torch.ops.regext.penalty_forward call (group_penalty_forward for
    groups) reads every tensor once and keeps per-tensor (per-group) sums (`stats`,
    O(#groups) floats) for the backward.
    backward: one penalty_backward call writes every needed gradient from
    `stats` (regext._grad), with no reduction and no host synchronization.
    A torch.autograd.Function rather than torch.library.register_autograd: the
    DTensor path (regext.distributed) must all_reduce `stats` between the
    operator and the total, which an operator's own autograd formula cannot.

    This class (forward with ctx, no jvp) serves plain autograd and torch.compile;
    _FusedPenaltyFunc, the same computation, serves torch.func and forward-mode AD.
    """

    @staticmethod
    def forward(ctx, l1, l2, l2_squared, grouping, *params):
        total, stats = _groups.penalty_forward(list(params), l1, l2, l2_squared, grouping)
        ctx.save_for_backward(stats, l1, l2, *params)
        ctx.l2_squared, ctx.grouping = l2_squared, grouping
        return total

    @staticmethod
    def backward(ctx, grad_total):
        stats, l1, l2, *params = ctx.saved_tensors
        # Frozen parameters cost nothing: only the needed ones, each told its stats row.
        rows = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        grads = [None] * len(params)
        subset = backward_grads(grad_total, [params[i] for i in rows], stats,
                                _groups.stats_rows(ctx.grouping, params, rows), l1, l2,
                                ctx.l2_squared, grouping=ctx.grouping)
        for i, g in zip(rows, subset):
            grads[i] = g
        d_l1, d_l2 = coefficient_grads(ctx.needs_input_grad[:2], grad_total, stats, params,
                                       ctx.l2_squared, ctx.grouping)
        if d_l1 is not None:
            d_l1 = d_l1.to(l1.device, l1.dtype)
        if d_l2 is not None:
            d_l2 = d_l2.to(l2.device, l2.dtype)
        return (d_l1, d_l2, None, None, *grads)


class _FusedPenaltyFunc(_FusedPenalty):
    """_FusedPenalty for torch.func transforms (grad, vjp, jvp, jacrev, jacfwd,
    hessian, vmap) and torch.autograd.forward_ad.

    torch.func needs forward without ctx and a separate setup_context, so `stats`
    is an output here (returned with the total); generate_vmap_rule runs forward,
    backward and jvp on batched tensors, whose operators have batching rules
    (regext._batching). jvp: float64 dot products of the tangents
    (regext._grad.penalty_jvp). Kept apart from _FusedPenalty because that style
    costs plain calls an inspect.signature binding of the arguments in
    Function.apply, and torch.compile (dynamo) cannot trace a Function with a jvp.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(l1, l2, l2_squared, grouping, *params):
        if has_dtensor(params):
            # Plain calls route DTensors to regext.distributed; one gets here only
            # wrapped by a torch.func transform (grad, vmap, ...), which hid it.
            raise functorch_error("fused_penalty")
        return _groups.penalty_forward(list(params), l1, l2, l2_squared, grouping)

    @staticmethod
    def setup_context(ctx, inputs, output):
        l1, l2, l2_squared, grouping, *params = inputs
        total, stats = output
        # `stats` never leaves regext (the caller keeps the total only), so it is not
        # marked non-differentiable: under jacfwd(vmap(...)) torch's generated vmap rule
        # fails on a non-differentiable output (torch 2.13). Its gradient arrives as
        # None (no materialized zeros) and its tangent is 0.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(stats, l1, l2, *params)
        ctx.save_for_forward(stats, l1, l2, *params)
        ctx.l2_squared, ctx.grouping, ctx.total_dtype = l2_squared, grouping, total.dtype

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        if grad_total is None:
            # Reached through `stats` only (an outer transform differentiating the
            # backward, whose PenaltyGrad gives stats no gradient): nothing flows.
            return (None,) * (1 + len(ctx.saved_tensors))  # l1, l2, 2 flags, params
        return _FusedPenalty.backward(ctx, grad_total)

    @staticmethod
    def jvp(ctx, l1_tangent, l2_tangent, _l2_squared, _grouping, *tangents):
        stats, l1, l2, *params = ctx.saved_tensors
        total_tangent = penalty_jvp(params, tangents, stats, l1, l2, l1_tangent, l2_tangent,
                                    ctx.l2_squared, ctx.grouping)
        return total_tangent.to(ctx.total_dtype), torch.zeros_like(stats)


def penalty_on_one_device(params, l1, l2, l2_squared, grouping=PER_TENSOR):
    """fused_penalty for a checked, non-empty list of plain tensors on one device;
    l1 and l2 are coefficient tensors (regext._validation.coefficient)."""
    if not torch.compiler.is_compiling() and functorch_or_forward_ad():
        return _FusedPenaltyFunc.apply(l1, l2, l2_squared, grouping, *params)[0]
    return _FusedPenalty.apply(l1, l2, l2_squared, grouping, *params)


def _group_by_device(params):
    groups = {}
    for p in params:
        groups.setdefault(p.device, []).append(p)
    return list(groups.values())


def fused_penalty(params, l1=0.0, l2=0.0, *, l2_squared=False, group="tensor",
                  group_weight=None, error_if_nonfinite=False):
    """``l1 * sum_p ||p||_1 + l2 * sum_p ||p||_2`` over all tensors, fused.

    Args:
        params: any iterable of floating-point tensors, e.g. ``model.parameters()``.
            float16/bfloat16 accumulate in float32 or better; every tensor may have
            any layout (non-contiguous views are fine). A tensor listed twice counts twice.
            DTensors (FSDP2 ``fully_shard``, tensor parallel) are accepted, alone or
            mixed with plain tensors: the penalty is the one of the full tensors, at
            the cost of one all_reduce for the whole list (see regext.distributed).
            Every tensor counts, frozen (``requires_grad=False``) ones included, as in
            the loop; :class:`regext.Penalty` leaves frozen parameters out.
        l1: coefficient of the summed L1 norms: a finite number >= 0, or a 0-dim
            floating-point tensor on the CPU or on the parameters' device (so that a
            schedule can change it without recompiling a ``torch.compile`` step, and a
            CUDA graph can replay it: update the tensor in place). A number or a CPU
            tensor that is negative, NaN or inf raises ValueError; a value on the GPU
            is not checked (that would synchronize with the GPU) and is used as it is:
            a NaN coefficient makes the penalty and its gradients NaN, a negative one
            rewards large weights.
        l2: coefficient of the summed L2 terms, as ``l1``.
        l2_squared: if True the L2 term of each tensor is ``||p||_2 ** 2`` (ridge /
            weight-decay form) instead of the Euclidean norm ``||p||_2``.
        group: what one Euclidean norm covers (the group lasso; Yuan & Lin 2006,
            Wen et al. 2016): ``"tensor"`` (default: the whole tensor, the loop's
            ``torch.norm(p, 2)``), ``"row"`` (each slice ``p[i]`` along dim 0: the
            output neurons of a Linear, the filters of a Conv) or ``"column"`` (each
            slice ``p[:, j]`` along dim 1: input features, input channels). The L2 term
            is then ``sum_g w_g * ||g||_2`` over the groups, which drives whole rows or
            columns to zero. A tensor with fewer than 2 dims (a bias) is one group. The
            L1 term is unchanged. Not with ``l2_squared`` (squared group norms add up to
            the tensor's). On DTensors (FSDP2) the groups are those of the whole
            tensors: exact, with one all_reduce of per-group sums
            (regext.distributed_groups).
        group_weight: ``None`` (w_g = 1) or ``"sqrt_size"``: w_g = sqrt(number of
            elements of the group), the usual group-lasso scaling (torchao's
            ``ProxGroupLasso``); also applies with ``group="tensor"``.
        error_if_nonfinite: if True, a NaN or infinite penalty raises RuntimeError naming
            the first tensor whose norms are not finite (as
            ``torch.nn.utils.clip_grad_norm_`` does). This reads the value on the host:
            one synchronization with the GPU per call (not CUDA-graph capturable). Off
            by default. Under ``torch.compile`` (``fullgraph=True`` too) the check is an
            operator of the graph (``regext_py::check_finite_penalty``) and raises the same
            error when the compiled step runs.

    Returns:
        A 0-dim tensor on the first parameter's device; float64 if any parameter is
        float64, else float32. Differentiable with respect to every parameter that
        requires grad (and to a coefficient tensor that requires grad); its gradients
        match torch's autograd of the per-parameter loop (sign(0) = 0, zero gradient
        for a zero-norm tensor, NaN/inf propagate), with float64 norms. Second
        derivatives (``create_graph=True``) are exact; at an all-zero tensor the
        Euclidean norm has none, and its second derivative is taken as 0.
        An empty iterable gives ``tensor(0.)``.

    Raises:
        ValueError: ``l1`` or ``l2`` is not a finite number >= 0; an unknown ``group`` or
            ``group_weight``, or either one with ``l2_squared=True``.
        NotImplementedError: ``group`` or ``group_weight`` on DTensors with a
            ``_StridedShard`` placement, or their second derivatives.
        TypeError: an element is not a tensor, or not a strided real floating-point
            tensor; the message names its position and dtype. A coefficient tensor that
            is not 0-dim floating point.
        RuntimeError: with ``error_if_nonfinite=True``, a NaN or infinite penalty.
    """
    if (group == "tensor" and group_weight is None and not error_if_nonfinite
            and _fastpath.open_now()):
        fast, params = _fast_penalty(params, l1, l2, bool(l2_squared))
        if fast is not None:
            return fast
    func = "fused_penalty"
    l1 = coefficient(func, "l1", l1)
    l2 = coefficient(func, "l2", l2)
    l2_squared = bool(l2_squared)
    grouping = _groups.grouping(func, group, group_weight, l2_squared)
    params, same_device = materialize_params_and_device(
        func, params, zero3="value" if grouping.per_tensor else None)
    if not params:
        return torch.zeros(())
    if distributed_active() and zero3_in(params):
        # DeepSpeed ZeRO-3 partitions: the value only, one all_reduce (regext._zero3).
        from regext import _zero3
        return _zero3.fused_penalty_value(params, l1, l2, l2_squared,
                                          error_if_nonfinite=error_if_nonfinite, func=func)
    total = penalty_of_checked(params, l1, l2, l2_squared, same_device, grouping, func=func)
    if error_if_nonfinite:
        total = _nonfinite.checked_total(func, total, params, l1, l2, l2_squared)
    return total


def _fast_penalty(params, l1, l2, l2_squared):
    """fused_penalty's common case without Python per-tensor work (regext._fastpath):
    (the penalty, or None for the general path; what `params` yielded, for it)."""
    ps, l1t, l2t = _fastpath.checked_list_and_coefficients("fused_penalty", params, l1, l2)
    if l1t is None:
        return None, ps
    return penalty_fast(ps, l1t, l2t, l2_squared), ps


def penalty_fast(params, l1, l2, l2_squared):
    """The per-tensor penalty of a non-empty list with coefficient tensors, handed
    straight to the operator (regext._fastpath; only where open_now()): the value,
    or None if the operator refused the list (the general path then checks it,
    names the problem, or computes it)."""
    try:
        if torch.is_grad_enabled():
            return _fastpath.apply_function(_FusedPenalty, (l1, l2, l2_squared, PER_TENSOR),
                                            params)
        return _fastpath.FORWARD(params, l1, l2, l2_squared)[0]
    except _fastpath.REFUSED:
        return None


def penalty_of_checked(params, l1, l2, l2_squared, same_device, grouping=PER_TENSOR, *,
                       func="fused_penalty", names=None):
    """fused_penalty for a checked, non-empty list: DTensors, one device, or several.
    `names` (parallel to params, or None) name the parameters in DTensor errors."""
    if has_dtensor(params):
        # Sharded (FSDP2 / DTensor) parameters: local shards, one all_reduce.
        if not grouping.per_tensor:
            return distributed_groups.group_penalty_dtensor(params, l1, l2, grouping, func=func,
                                                            names=names)
        return distributed.fused_penalty_dtensor(params, l1, l2, l2_squared, func=func,
                                                 names=names)
    if same_device:
        return penalty_on_one_device(params, l1, l2, l2_squared, grouping)
    first_device = params[0].device
    # Mixed devices: one fused call per device, summed on the first device.
    totals = [penalty_on_one_device(group, l1, l2, l2_squared, grouping).to(first_device)
              for group in _group_by_device(params)]
    total = totals[0]
    for t in totals[1:]:
        total = total + t
    return total
