"""Proximal steps in place: soft-thresholding (L1), group shrinkage (per-tensor,
per-row or per-column L2: the group lasso) and multiplicative decay (squared L2, i.e. decoupled weight decay).

    optimizer.step()                              # gradient step on the data loss
    regext.prox_l1_(model.parameters(), lr * l1)  # then shrink: exact zeros

Each is the proximal operator of ``threshold`` times its penalty, so a gradient step
with step size ``lr`` followed by the prox with ``lr * coefficient`` is one step of
proximal gradient descent (ISTA; Parikh & Boyd, "Proximal Algorithms", 2014, §6.5).
"""

import torch

from regext import _groups, _metric, distributed, distributed_groups
from regext._dtensor import has_dtensor, is_dtensor, local_of
from regext._groups import PER_TENSOR
from regext._validation import check_writable, coefficient, indices_by_device, materialize_params


def prox_l1_(params, threshold, *, metric=None):
    """Soft-thresholding in place: ``x ← sign(x)·max(|x| − threshold, 0)``.

    The proximal step of ``threshold·‖x‖₁``: after a gradient step on the data loss
    with learning rate ``lr``, ``prox_l1_(params, lr * l1)`` completes one step of
    proximal gradient descent (ISTA) on ``loss + l1·Σ‖p‖₁``. Unlike a subgradient
    step, which leaves weights jittering around zero, it sets every ``|x| <= threshold``
    to exactly ``+0``. One fused pass over all tensors (per device).

    Args:
        params: any iterable of floating-point tensors; they may require grad (the
            update runs under ``torch.no_grad()`` and bumps their version counters)
            and may be non-contiguous views. float16/bfloat16 compute in float32.
            The list is processed in order, as one call per tensor would: a tensor
            listed twice is thresholded twice (≈ once with ``2·threshold``).
        threshold: a finite number >= 0, or a 0-dim floating-point tensor on the CPU
            or on the parameters' device (a GPU value is used unchecked, as in
            :func:`regext.fused_penalty`). NaN stays NaN, ±inf stays ±inf.
        metric: None (the Euclidean step above), or a torch.optim optimizer that holds
            these parameters and has just stepped: the step is then taken in that
            optimizer's own diagonal metric, read from its state (``Adam``, ``AdamW``,
            ``Adagrad``, ``RMSprop`` and their subclasses; ``SGD``'s metric is the
            Euclidean one, so the step is the one above). Parameters it holds no state
            for yet, or has not stepped yet, are left unchanged.

    In an optimizer's metric (``metric=optimizer``, after ``optimizer.step()``):
    ``x_i ← sign(x_i)·max(|x_i| − threshold·f/denom_i, 0)`` with the optimizer's
    ``denom`` (Adam: ``sqrt(v/(1 − β₂ᵗ)) + eps``) and ``f`` its step size over its lr
    (1; Adagrad: ``1/(1 + (t−1)·lr_decay)``): one fused pass that reads each parameter
    and its state tensor and writes the parameter. float64 parameters are computed in
    float64; float32 and the half types in float32 wherever that is provably within
    5e-6 of the float64 step with the same zeros, and in float64 for the coordinates
    near their threshold (about a third of the float64 cost per element). A
    coordinate whose second moment is 0 gets the threshold ``threshold/eps``, which
    zeroes it: the metric's answer (docs/training-loop.md, "When to use which
    metric").

    Raises:
        ValueError: ``threshold`` is not a finite number >= 0; a tensor has
            overlapping memory (stride 0); ``metric`` is an optimizer regext does not
            know the metric of (pass None) or does not hold one of the tensors.
            Like every error here, before anything is modified.
        TypeError: an element is not a strided real floating-point tensor; ``metric``
            is not an optimizer.
        NotImplementedError: ``prox_group_l2_`` with ``metric`` on DTensor parameters
            (``prox_l1_`` and ``prox_l2_squared_`` step each rank's local shards).
    """
    func = "prox_l1_"
    threshold = coefficient(func, "threshold", threshold)
    params = materialize_params(func, params)
    check_writable(func, params)
    metric = metric_of(func, metric)
    if metric is None:
        prox_l1_checked(params, threshold)
    else:
        prox_metric_checked(func, params, metric, threshold, zero_like(threshold))


def prox_l1_checked(params, threshold):
    """prox_l1_ for a checked, writable list and a threshold tensor."""
    with torch.no_grad():
        if has_dtensor(params):
            distributed.prox_l1_dtensor_(params, threshold)
            return
        for rows in indices_by_device(params):
            torch.ops.regext.prox_l1_([params[i] for i in rows], threshold)


def prox_group_l2_(params, threshold, *, group="tensor", group_weight=None, metric=None):
    """Group shrinkage in place: ``x_g ← x_g·max(0, 1 − threshold·w_g/‖x_g‖₂)`` per group.

    The proximal operator of ``threshold·Σ_g w_g‖x_g‖₂`` (block soft-thresholding;
    Parikh & Boyd, "Proximal Algorithms", 2014, §6.5.4), i.e. of the non-squared
    penalty ``fused_penalty(params, l2=..., group=..., group_weight=...)``: a group
    whose norm is at most ``threshold·w_g`` becomes all zeros (the whole group is
    switched off), every other group is scaled towards zero. With the default
    ``group="tensor"`` each tensor is one group; ``"row"`` and ``"column"`` zero
    whole neurons, filters or input channels (see :func:`regext.fused_penalty`; a
    tensor with fewer than 2 dims is one group). ``group_weight="sqrt_size"``:
    ``w_g = sqrt(elements of g)``, as torchao's ``ProxGroupLasso``. Norms are
    accumulated in float64, in one read of the parameters before the one
    read-and-write pass. A group whose norm is NaN or inf is left unchanged.

    Same arguments, list-order semantics and errors as :func:`prox_l1_`, plus
    ValueError for an unknown ``group`` or ``group_weight`` and NotImplementedError
    for either with DTensor parameters.

    In an optimizer's metric (``metric=optimizer``): the proximal map of
    ``λ·‖u_g‖₂`` in the metric ``diag(d)``, with ``λ = threshold·f·w_g`` and
    ``d = denom`` (as in :func:`prox_l1_`), group by group: a group becomes zero iff
    ``‖d ∘ x_g‖₂ ≤ λ``; otherwise ``u_i = d_i x_i / (d_i + λ/τ)`` where ``τ = ‖u‖₂``
    solves the scalar equation ``Σ_i (d_i x_i / (d_i τ + λ))² = 1`` (decreasing in
    τ), solved by Newton's method on ``φ(τ)^(-1/2) = 1`` from a lower bound (the
    function is concave, so the iterates increase to the root; float64 round-off).
    A group holding NaN or inf, or whose squares leave float64's range, is left
    unchanged; a coordinate whose second moment is +inf keeps its value (an infinite
    metric), and a NaN second moment (or mean) makes its group NaN, as
    :func:`prox_l1_` makes that coordinate NaN. One fused pass per device
    (``regext::prox_group_metric_``, csrc/group_metric_math.h): each group's elements
    and state are read once into float64, Newton's 4-6 iterations run there, and the
    group is written once; on CUDA one block per group, no host synchronization.
    ``metric`` and its errors as in :func:`prox_l1_`.
    """
    func = "prox_group_l2_"
    threshold = coefficient(func, "threshold", threshold)
    grouping = _groups.grouping(func, group, group_weight)
    params = materialize_params(func, params)
    check_writable(func, params)
    metric = metric_of(func, metric)
    if metric is None:
        prox_group_l2_checked(func, params, threshold, grouping=grouping)
    else:
        prox_group_l2_metric_checked(func, params, metric, threshold, grouping=grouping)


def prox_group_l2_checked(func, params, threshold, names=None, grouping=PER_TENSOR):
    """prox_group_l2_ for a checked, writable list and a threshold tensor."""
    with torch.no_grad():
        if has_dtensor(params):
            if grouping.per_tensor:
                distributed.prox_group_l2_dtensor_(params, threshold, func=func, names=names)
            else:
                distributed_groups.prox_group_lasso_dtensor_(params, threshold, grouping,
                                                             func=func, names=names)
            return
        for rows in indices_by_device(params):
            subset = [params[i] for i in rows]
            if grouping.per_tensor:
                torch.ops.regext.prox_group_l2_(subset, threshold)
            else:
                torch.ops.regext.prox_group_lasso_(subset, grouping.dims(subset), threshold,
                                                   grouping.sqrt_size)


def prox_l2_squared_(params, threshold, *, metric=None):
    """Multiplicative decay in place: ``x ← x / (1 + 2·threshold)``.

    The proximal step of ``threshold·‖x‖₂²``, i.e. of the squared (ridge, weight
    decay) form ``fused_penalty(params, l2=..., l2_squared=True)``: after a gradient
    step with learning rate ``lr``, ``prox_l2_squared_(params, lr * l2)`` is decoupled
    weight decay (Loshchilov & Hutter, 2019) in its proximal form, ``x / (1 + 2·lr·l2)``
    instead of AdamW's ``x · (1 − lr·wd)``; the two agree to first order. No element
    becomes exactly zero. One ``torch._foreach_mul_`` per device.
    Same arguments and errors as :func:`prox_l1_`.

    In an optimizer's metric (``metric=optimizer``): ``x_i ← x_i / (1 + 2·threshold·f/denom_i)``
    (as in :func:`prox_l1_`), one fused pass over each parameter and its state;
    ``metric`` and its errors as in :func:`prox_l1_`.
    """
    func = "prox_l2_squared_"
    threshold = coefficient(func, "threshold", threshold)
    params = materialize_params(func, params)
    check_writable(func, params)
    metric = metric_of(func, metric)
    if metric is None:
        prox_l2_squared_checked(params, threshold)
    else:
        prox_metric_checked(func, params, metric, zero_like(threshold), 2.0 * threshold)


def prox_l2_squared_checked(params, threshold):
    """prox_l2_squared_ for a checked, writable list and a threshold tensor."""
    with torch.no_grad():
        factor = 1.0 / (1.0 + 2.0 * threshold.to(torch.float64))  # where the threshold lies
        if has_dtensor(params):
            distributed.scale_dtensor_(params, factor)
            return
        for rows in indices_by_device(params):
            torch._foreach_mul_([params[i] for i in rows], factor)


# ---- in an optimizer's metric ---------------------------------------------------

def metric_of(func, metric):
    """None for the Euclidean step, else the _metric.OptimizerMetric of `metric` (an
    optimizer, a wrapper holding one, or an OptimizerMetric already built)."""
    if metric is None:
        return None
    if not isinstance(metric, _metric.OptimizerMetric):
        try:
            optimizer = _metric.unwrap_optimizer(func, metric)
        except TypeError:
            raise TypeError(f"{func}: metric must be None or a torch.optim optimizer (the one "
                            f"that has just stepped these parameters), got "
                            f"{type(metric).__name__}") from None
        metric = _metric.OptimizerMetric(func, optimizer, remedy="metric=None")
    return None if metric.family == _metric.SGD else metric


def zero_like(threshold):
    return torch.zeros((), dtype=torch.float64, device=threshold.device)


def check_no_dtensor_groups(func, params):
    if has_dtensor(params):
        raise NotImplementedError(
            f"{func}: the group lasso's proximal step in an optimizer's metric is not "
            f"implemented for DTensor (FSDP2 / tensor-parallel) parameters; use the Euclidean "
            f"step (metric=None, or metric=\"euclidean\" in Penalty.attach)")


def _local_state(func, what, params, state):
    """The local shards of `state` (an optimizer's per-parameter tensors), which must
    be laid out as their parameters: the metric step is elementwise, so each rank steps
    its own shard with no communication."""
    out = []
    for i, (p, s) in enumerate(zip(params, state)):
        if is_dtensor(p) != is_dtensor(s) or (is_dtensor(p) and (
                p.placements != s.placements or p.device_mesh != s.device_mesh)):
            raise ValueError(f"{func}: the optimizer's {what} of params[{i}] is not sharded "
                             f"as the parameter is; the metric step needs them alike")
        out.append(local_of(s))
    return out


def prox_metric_checked(func, params, metric, l1_step, ridge_step, names=None):
    """L1 soft-thresholding by ``l1_step`` and the squared-L2 factor of ``ridge_step``
    (2·lr·l2), both in `metric` (a _metric.OptimizerMetric): one regext::prox_metric_
    call per device (and per centered / plain RMSprop state). DTensors: each rank
    steps its local shards with their state's local shards."""
    with torch.no_grad():
        for terms in metric.terms(func, params, names):
            ps = terms.params
            moments, means = terms.moments, terms.means or []
            if has_dtensor(ps):
                moments = _local_state(func, "second moment", ps, moments)
                means = _local_state(func, "mean gradient", ps, means) if means else []
                ps = [local_of(p) for p in ps]
            torch.ops.regext.prox_metric_(ps, moments, means, terms.coefs(l1_step, ridge_step))


def prox_group_l2_metric_checked(func, params, metric, threshold, names=None,
                                 grouping=PER_TENSOR):
    """The group lasso's proximal step in `metric` (see prox_group_l2_'s docstring):
    one regext::prox_group_metric_ call per device (and centered or not)."""
    check_no_dtensor_groups(func, params)
    zero = None
    with torch.no_grad():
        for terms in metric.terms(func, params, names):
            if zero is None or zero.device != threshold.device:
                zero = zero_like(threshold)
            means = terms.means or []
            torch.ops.regext.prox_group_metric_(
                terms.params, terms.moments, means, grouping.dims(terms.params),
                terms.coefs(threshold, zero), grouping.sqrt_size)
