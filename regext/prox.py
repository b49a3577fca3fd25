"""Proximal steps in place: soft-thresholding (L1), group shrinkage (per-tensor,
per-row or per-column L2: the group lasso) and multiplicative decay (squared L2, i.e. decoupled weight decay).

    optimizer.step()                              # gradient step on the data loss
    regext.prox_l1_(model.parameters(), lr * l1)  # then shrink: exact zeros

Each is the proximal operator of ``threshold`` times its penalty, so a gradient step
with step size ``lr`` followed by the prox with ``lr * coefficient`` is one step of
proximal gradient descent (ISTA; Parikh & Boyd, "Proximal Algorithms", 2014, §6.5).
"""

import torch

from regext import _groups, distributed, distributed_groups
from regext._dtensor import has_dtensor
from regext._groups import PER_TENSOR
from regext._validation import check_writable, coefficient, indices_by_device, materialize_params


def prox_l1_(params, threshold):
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

    Raises:
        ValueError: ``threshold`` is not a finite number >= 0; a tensor has
            overlapping memory (stride 0).
        TypeError: an element is not a strided real floating-point tensor.
        All before anything is modified.
    """
    func = "prox_l1_"
    threshold = coefficient(func, "threshold", threshold)
    params = materialize_params(func, params)
    check_writable(func, params)
    prox_l1_checked(params, threshold)


def prox_l1_checked(params, threshold):
    """prox_l1_ for a checked, writable list and a threshold tensor."""
    with torch.no_grad():
        if has_dtensor(params):
            distributed.prox_l1_dtensor_(params, threshold)
            return
        for rows in indices_by_device(params):
            torch.ops.regext.prox_l1_([params[i] for i in rows], threshold)


def prox_group_l2_(params, threshold, *, group="tensor", group_weight=None):
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
    """
    func = "prox_group_l2_"
    threshold = coefficient(func, "threshold", threshold)
    grouping = _groups.grouping(func, group, group_weight)
    params = materialize_params(func, params)
    check_writable(func, params)
    prox_group_l2_checked(func, params, threshold, grouping=grouping)


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


def prox_l2_squared_(params, threshold):
    """Multiplicative decay in place: ``x ← x / (1 + 2·threshold)``.

    The proximal step of ``threshold·‖x‖₂²``, i.e. of the squared (ridge, weight
    decay) form ``fused_penalty(params, l2=..., l2_squared=True)``: after a gradient
    step with learning rate ``lr``, ``prox_l2_squared_(params, lr * l2)`` is decoupled
    weight decay (Loshchilov & Hutter, 2019) in its proximal form, ``x / (1 + 2·lr·l2)``
    instead of AdamW's ``x · (1 − lr·wd)``; the two agree to first order. No element
    becomes exactly zero. One ``torch._foreach_mul_`` per device.
    Same arguments and errors as :func:`prox_l1_`.
    """
    func = "prox_l2_squared_"
    threshold = coefficient(func, "threshold", threshold)
    params = materialize_params(func, params)
    check_writable(func, params)
    prox_l2_squared_checked(params, threshold)


def prox_l2_squared_checked(params, threshold):
    """prox_l2_squared_ for a checked, writable list and a threshold tensor."""
    with torch.no_grad():
        factor = 1.0 / (1.0 + 2.0 * threshold.to(torch.float64))  # where the threshold lies
        if has_dtensor(params):
            distributed.scale_dtensor_(params, factor)
            return
        for rows in indices_by_device(params):
            torch._foreach_mul_([params[i] for i in rows], factor)
