"""add_penalty_grad_: the penalty's gradient added straight into ``p.grad``, without autograd.

    loss.backward()
    regext.add_penalty_grad_(model.parameters(), l1, l2)   # p.grad += d(penalty)/dp
    optimizer.step()
"""

import enum

import torch

from regext import distributed, distributed_groups
from regext import _fastpath, _groups, _nonfinite
from regext._dtensor import has_dtensor
from regext._engines import distributed_active, zero3_in
from regext._groups import PER_TENSOR
from regext._validation import (check_no_self_overlap, coefficient, indices_by_device, label,
                                materialize_params)


def _bad_grad(func, i, p, g, names):
    """The error for an existing .grad that cannot be updated in place, if any."""
    param = label("params", i, names)
    where = f"{func}: {param}.grad"
    if g.layout != torch.strided:
        return TypeError(f"{where} has layout {g.layout} (dtype {g.dtype}, device {g.device}); "
                         f"only strided gradients are supported (a sparse gradient, e.g. from "
                         f"nn.Embedding(sparse=True), is not)")
    if g.dtype != p.dtype:
        return TypeError(f"{where} has dtype {g.dtype} but {param} has dtype {p.dtype}")
    if g.device != p.device:
        return ValueError(f"{where} is on {g.device} but {param} is on {p.device}")
    if g.shape != p.shape:
        return ValueError(f"{where} has shape {tuple(g.shape)} but {param} has shape "
                          f"{tuple(p.shape)}")
    try:
        check_no_self_overlap(func, f"{param}.grad", g)
    except ValueError as e:
        return e
    return None


class GradAction(enum.IntEnum):
    """What add_penalty_grad_ does with each parameter."""
    SKIP = 0        # it does not require grad
    ACCUMULATE = 1  # add into its existing .grad
    CREATE = 2      # create its .grad
    REPEAT = 3      # add into the .grad created for an earlier entry of the same tensor


def plan_actions(func, params, names=None):
    """Checks every existing .grad and decides a GradAction per parameter, before
    anything is written."""
    plan = []
    creating = set()
    for i, p in enumerate(params):
        if not p.requires_grad:
            plan.append(GradAction.SKIP)
            continue
        g = p.grad
        if g is None:
            if id(p) in creating:
                plan.append(GradAction.REPEAT)
            else:
                creating.add(id(p))
                plan.append(GradAction.CREATE)
            continue
        # The common case costs a few attribute reads; messages are built only on failure.
        if not (g.layout is torch.strided and g.dtype is p.dtype and g.shape == p.shape
                and g.device == p.device and g.is_contiguous()):
            error = _bad_grad(func, i, p, g, names)
            if error is not None:
                raise error
        plan.append(GradAction.ACCUMULATE)
    return plan


def _add_grads_one_device(params, plan, stats, total, l1, l2, l2_squared, grouping=PER_TENSOR):
    """p.grad += d(penalty)/dp for the parameters of one device, following `plan`."""

    def stats_rows(rows):  # where each listed parameter's stats are; None: all, in order
        return _groups.stats_rows(grouping, params, rows)

    def rows_of(kind):
        return [i for i, k in enumerate(plan) if k == kind]

    def accumulate(rows):
        if rows:
            ps = [params[i] for i in rows]
            _groups.penalty_grad_accumulate_([p.grad for p in ps], ps, stats, l1, l2, l2_squared,
                                             stats_rows(rows), grouping)

    # Existing gradients first: the operator checks them all before writing any.
    accumulate(rows_of(GradAction.ACCUMULATE))
    created = rows_of(GradAction.CREATE)
    if created:
        ps = [params[i] for i in created]
        # Out of place, straight into new tensors: no zeros-then-add pass.
        ones = torch.ones((), dtype=total.dtype, device=total.device)
        grads = _groups.penalty_backward(ones, ps, stats, l1, l2, l2_squared,
                                         stats_rows(created), grouping)
        for p, g in zip(ps, grads):
            p.grad = g
    accumulate(rows_of(GradAction.REPEAT))


def add_penalty_grad_(params, l1=0.0, l2=0.0, *, l2_squared=False, group="tensor",
                      group_weight=None, error_if_nonfinite=False):
    """Adds the gradient of ``l1·Σ‖p‖₁ + l2·Σ‖p‖₂`` into every ``p.grad``, in place.

    Call it after ``loss.backward()`` instead of adding ``fused_penalty`` to the loss:
    the gradients are the same, but no autograd graph is built and no
    gradient-sized temporary is made. One read of the parameters computes the
    norms, one more pass adds the gradient (one fused call each per device).

    Args:
        params: any iterable of floating-point tensors, e.g. ``model.parameters()``.
            Tensors that do not require grad count in the returned value but their
            ``.grad`` is left alone. A ``.grad`` that is ``None`` is created (with
            the parameter's dtype and memory layout). A tensor listed twice gets
            twice the gradient, as with ``fused_penalty``.
        l1, l2, l2_squared, group, group_weight, error_if_nonfinite: as in
            :func:`regext.fused_penalty` (``error_if_nonfinite`` raises before any
            gradient is touched).

    Returns:
        The penalty value, a detached 0-dim tensor with ``fused_penalty``'s dtype and
        device rules (float64 if any parameter is float64, else float32; on the
        first parameter's device). An empty iterable gives ``tensor(0.)``.

    Raises:
        ValueError: a bad ``l1``/``l2``, ``group`` or ``group_weight``; an existing
            ``.grad`` with the wrong shape or device, or with overlapping memory.
            Like every error here, before any gradient is touched.
        TypeError: an element that is not a strided real floating-point tensor; an
            existing ``.grad`` that is sparse or of another dtype.
        RuntimeError: with ``error_if_nonfinite=True``, a NaN or infinite penalty.
    """
    if (group == "tensor" and group_weight is None and not error_if_nonfinite
            and _fastpath.open_now()):
        total, params = _fast_add(params, l1, l2, bool(l2_squared))
        if total is not None:
            return total
    func = "add_penalty_grad_"
    l1 = coefficient(func, "l1", l1)
    l2 = coefficient(func, "l2", l2)
    grouping = _groups.grouping(func, group, group_weight, bool(l2_squared))
    params = materialize_params(func, params, zero3="partitions" if grouping.per_tensor else None)
    if grouping.per_tensor and distributed_active() and zero3_in(params, partitioned_only=False):
        # DeepSpeed ZeRO-3: into the gradient partitions, one all_reduce (regext._zero3).
        from regext import _zero3
        return _zero3.add_penalty_grad_(params, l1, l2, bool(l2_squared),
                                        error_if_nonfinite=error_if_nonfinite, func=func)
    return add_penalty_grad_checked(func, params, l1, l2, bool(l2_squared),
                                    error_if_nonfinite=error_if_nonfinite, grouping=grouping)


def _fast_add(params, l1, l2, l2_squared):
    """add_penalty_grad_'s usual step (every .grad present) in one operator call,
    without the per-gradient planning (regext._fastpath): (the value, or None for the
    general path; what `params` yielded)."""
    ps, l1t, l2t = _fastpath.checked_list_and_coefficients("add_penalty_grad_", params, l1, l2)
    if l1t is None:
        return None, ps
    grads = _fastpath.existing_grads(ps)
    if grads is None:
        return None, ps
    return _fastpath.accumulate_penalty_grad(ps, grads, l1t, l2t, l2_squared), ps


def add_penalty_grad_checked(func, params, l1, l2, l2_squared, *, names=None,
                             error_if_nonfinite=False, grouping=PER_TENSOR):
    """add_penalty_grad_ for a checked list and coefficient tensors (Penalty's path);
    `names` name the parameters in errors."""
    check = None
    if error_if_nonfinite:
        def check(total):  # before any gradient is touched; compiled: the zero to add
            return _nonfinite.check_in_graph(func, total, params, l1, l2, l2_squared, names)
    if has_dtensor(params) and not grouping.per_tensor:
        return distributed_groups.add_group_penalty_grad_dtensor_(params, l1, l2, grouping,
                                                                  func=func, names=names,
                                                                  check=check)
    if has_dtensor(params):
        # Sharded parameters (FSDP2 / DTensor): local shards, one all_reduce of the
        # per-tensor sums, gradients as DTensors with the parameters' placements.
        return distributed.add_penalty_grad_dtensor_(params, l1, l2, l2_squared, func=func,
                                                     names=names, check=check)
    plan = plan_actions(func, params, names)
    if not params:
        return torch.zeros(())
    with torch.no_grad():
        groups = []
        for rows in indices_by_device(params):
            if len(rows) == len(params):
                groups.append((params, plan))
            else:
                groups.append(([params[i] for i in rows], [plan[i] for i in rows]))
        if check is None and grouping.per_tensor and all(
                k == GradAction.ACCUMULATE for k in plan):
            # The usual step (every .grad exists): one operator per device; in the
            # squared form it reads each parameter once, computing sums and gradient
            # together.
            totals = [torch.ops.regext.penalty_forward_accumulate_(
                [p.grad for p in group], group, l1, l2, l2_squared)[0] for group, _ in groups]
        else:
            forwards = [_groups.penalty_forward(group, l1, l2, l2_squared, grouping)
                        for group, _ in groups]
            totals = [total for total, _ in forwards]
            if check is not None:
                zero = check(_sum_on_first(totals))
                if zero is not None:  # compiled: the gradients depend on the check
                    l1, l2 = l1 + zero.to(l1.device), l2 + zero.to(l2.device)
            for (group, group_plan), (total, stats) in zip(groups, forwards):
                _add_grads_one_device(group, group_plan, stats, total, l1, l2, l2_squared,
                                      grouping)
    return _sum_on_first(totals)


def _sum_on_first(totals):
    result = totals[0]
    for t in totals[1:]:
        result = result + t.to(result.device)
    return result
