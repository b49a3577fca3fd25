"""In-place training-loop helpers: the penalty gradient without autograd,
proximal steps that make L1 produce exact zeros, and sparsity counts.

    loss.backward()
    regext.add_penalty_grad_(model.parameters(), l1, l2)   # p.grad += d(penalty)/dp
    optimizer.step()

    optimizer.step()                                        # gradient step on the data loss
    regext.prox_l1_(model.parameters(), lr * l1)            # then shrink: exact zeros

All of them validate every argument before anything is read or written, run
under ``torch.no_grad()``, and make one fused operator call per device.
"""

from dataclasses import dataclass, field

import torch

from regext import distributed
from regext._fallback import group_shrink_scale_reference
from regext._named import named_tensors
from regext._validation import check_coefficient, materialize_params


def _indices_by_device(params):
    """Positions of the tensors on each device, in order of first appearance."""
    if not params:
        return []
    first = params[0].device
    if all(p.device == first for p in params):
        return [range(len(params))]
    groups = {}
    for i, p in enumerate(params):
        groups.setdefault(p.device, []).append(i)
    return list(groups.values())


def _check_no_self_overlap(func, what, t):
    """An in-place update needs each element to own its memory (no stride-0 dims)."""
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        raise ValueError(f"{func}: {what} has overlapping memory (an expanded tensor, shape "
                         f"{tuple(t.shape)}, stride {t.stride()}); it cannot be updated in place")


def _check_writable(func, params):
    for i, p in enumerate(params):
        if not p.is_contiguous():
            _check_no_self_overlap(func, f"params[{i}]", p)


def _bad_grad(func, i, p, g):
    """The error for an existing .grad that cannot be updated in place, if any."""
    where = f"{func}: params[{i}].grad"
    if g.layout != torch.strided:
        return TypeError(f"{where} has layout {g.layout} (dtype {g.dtype}, device {g.device}); "
                         f"only strided gradients are supported (a sparse gradient, e.g. from "
                         f"nn.Embedding(sparse=True), is not)")
    if g.dtype != p.dtype:
        return TypeError(f"{where} has dtype {g.dtype} but params[{i}] has dtype {p.dtype}")
    if g.device != p.device:
        return ValueError(f"{where} is on {g.device} but params[{i}] is on {p.device}")
    if g.shape != p.shape:
        return ValueError(f"{where} has shape {tuple(g.shape)} but params[{i}] has shape "
                          f"{tuple(p.shape)}")
    try:
        _check_no_self_overlap(func, f"params[{i}].grad", g)
    except ValueError as e:
        return e
    return None


# What add_penalty_grad_ does with each parameter.
_SKIP, _ACCUMULATE, _CREATE, _REPEAT = range(4)


def _plan(func, params):
    """Checks every existing .grad and decides, per parameter, before anything is written:
    skip (no grad required), accumulate into the existing .grad, create the .grad, or
    accumulate into the .grad created for an earlier entry of the same tensor."""
    plan = []
    creating = set()
    for i, p in enumerate(params):
        if not p.requires_grad:
            plan.append(_SKIP)
            continue
        g = p.grad
        if g is None:
            if id(p) in creating:
                plan.append(_REPEAT)
            else:
                creating.add(id(p))
                plan.append(_CREATE)
            continue
        # The common case costs a few attribute reads; messages are built only on failure.
        if not (g.layout is torch.strided and g.dtype is p.dtype and g.shape == p.shape
                and g.device == p.device and g.is_contiguous()):
            error = _bad_grad(func, i, p, g)
            if error is not None:
                raise error
        plan.append(_ACCUMULATE)
    return plan


def _add_grads_one_device(params, plan, stats, total, l1, l2, l2_squared):
    """p.grad += d(penalty)/dp for the parameters of one device, following `plan`."""
    n = len(params)

    def stats_rows(rows):  # which stats row each listed parameter uses; None: all, in order
        return None if len(rows) == n else rows

    def rows_of(kind):
        return [i for i, k in enumerate(plan) if k == kind]

    def accumulate(rows):
        if rows:
            ps = [params[i] for i in rows]
            torch.ops.regext.penalty_grad_accumulate_(
                [p.grad for p in ps], ps, stats, l1, l2, l2_squared, stats_rows(rows))

    # Existing gradients first: the operator checks them all before writing any.
    accumulate(rows_of(_ACCUMULATE))
    created = rows_of(_CREATE)
    if created:
        ps = [params[i] for i in created]
        # Out of place, straight into new tensors: no zeros-then-add pass.
        ones = torch.ones((), dtype=total.dtype, device=total.device)
        grads = torch.ops.regext.penalty_backward(ones, ps, stats, l1, l2, l2_squared,
                                                  stats_rows(created))
        for p, g in zip(ps, grads):
            p.grad = g
    accumulate(rows_of(_REPEAT))


def add_penalty_grad_(params, l1=0.0, l2=0.0, *, l2_squared=False):
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
        l1, l2, l2_squared: as in :func:`regext.fused_penalty`.

    Returns:
        The penalty value, a detached 0-dim tensor with ``fused_penalty``'s dtype and
        device rules (float64 if any parameter is float64, else float32; on the
        first parameter's device). An empty iterable gives ``tensor(0.)``.

    Raises:
        ValueError: a bad ``l1``/``l2``; an existing ``.grad`` with the wrong shape or
            device, or with overlapping memory.
        TypeError: an element that is not a strided real floating-point tensor; an
            existing ``.grad`` that is sparse or of another dtype.
        All are raised before any gradient is touched.
    """
    func = "add_penalty_grad_"
    l1 = check_coefficient(func, "l1", l1)
    l2 = check_coefficient(func, "l2", l2)
    params = materialize_params(func, params)
    return _add_penalty_grad(func, params, l1, l2, bool(l2_squared))


def _add_penalty_grad(func, params, l1, l2, l2_squared):
    """add_penalty_grad_ for an already checked list and coefficients (Penalty caches them)."""
    if distributed.has_dtensor(params):
        # Sharded parameters (FSDP2 / DTensor): local shards, one all_reduce of the
        # per-tensor sums, gradients as DTensors with the parameters' placements.
        return distributed.add_penalty_grad_dtensor_(params, l1, l2, l2_squared, func=func)
    plan = _plan(func, params)
    if not params:
        return torch.zeros(())
    with torch.no_grad():
        result = None
        for rows in _indices_by_device(params):
            if len(rows) == len(params):
                group, group_plan = params, plan
            else:
                group, group_plan = [params[i] for i in rows], [plan[i] for i in rows]
            if all(k == _ACCUMULATE for k in group_plan):
                # The usual step (every .grad exists): one operator; in the squared
                # form it reads each parameter once, computing sums and gradient together.
                total, _ = torch.ops.regext.penalty_forward_accumulate_(
                    [p.grad for p in group], group, l1, l2, l2_squared)
            else:
                total, stats = torch.ops.regext.penalty_forward(group, l1, l2, l2_squared)
                _add_grads_one_device(group, group_plan, stats, total, l1, l2, l2_squared)
            result = total if result is None else result + total.to(result.device)
    return result


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
        threshold: a finite number >= 0. NaN stays NaN, ±inf stays ±inf.

    Raises:
        ValueError: ``threshold`` is not a finite number >= 0; a tensor has
            overlapping memory (stride 0).
        TypeError: an element is not a strided real floating-point tensor.
        All before anything is modified.
    """
    func = "prox_l1_"
    threshold = check_coefficient(func, "threshold", threshold)
    params = materialize_params(func, params)
    _check_writable(func, params)
    if distributed.has_dtensor(params):
        # Elementwise: every rank thresholds its own shard (and its replicated copies,
        # identically) where it lies. No communication.
        params = [distributed._local_of(p) for p in params]
    with torch.no_grad():
        for rows in _indices_by_device(params):
            torch.ops.regext.prox_l1_([params[i] for i in rows], threshold)


def prox_group_l2_(params, threshold):
    """Per-tensor group shrinkage in place: ``x ← x·max(0, 1 − threshold/‖x‖₂)``.

    The proximal step of ``threshold·‖x‖₂`` for each tensor, i.e. of the
    per-tensor-norm penalty ``fused_penalty(params, l2=...)`` (non-squared): a
    tensor whose norm is at most ``threshold`` becomes all zeros (the whole group
    is switched off), every other tensor is scaled towards zero. Norms are
    accumulated in float64. A tensor whose norm is NaN or inf is left unchanged.
    Same arguments, list-order semantics and errors as :func:`prox_l1_`.
    """
    func = "prox_group_l2_"
    threshold = check_coefficient(func, "threshold", threshold)
    params = materialize_params(func, params)
    _check_writable(func, params)
    if distributed.has_dtensor(params):
        _prox_group_l2_dtensor(func, params, threshold)
        return
    with torch.no_grad():
        for rows in _indices_by_device(params):
            torch.ops.regext.prox_group_l2_([params[i] for i in rows], threshold)


def _distinct_runs(params):
    """[start, end) runs of the list in which no tensor object repeats."""
    runs, start, seen = [], 0, set()
    for i, p in enumerate(params):
        if id(p) in seen:
            runs.append((start, i))
            start, seen = i, set()
        seen.add(id(p))
    if params:
        runs.append((start, len(params)))
    return runs


def _prox_group_l2_dtensor(func, params, threshold):
    """prox_group_l2_ for a list holding DTensors: the norms are those of the whole
    tensors (regext.distributed.global_stats: one all_reduce if any is sharded), the
    scaling is applied to each rank's local shard. List order as in the operator: a
    tensor listed again starts a new run, which sees the first shrinkage."""
    with torch.no_grad():
        for start, end in _distinct_runs(params):
            local, stats = distributed.global_stats(params[start:end], func=func)
            scales = group_shrink_scale_reference(stats[:, 1], threshold)
            for x, scale in zip(local, scales):
                if x.numel():
                    product = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) \
                        else torch.float64
                    x.copy_(x.to(product) * scale.to(product))


def _zero_counts(func, tensors):
    """Exact zeros per tensor (ints), over whole DTensors when there are any."""
    counts = [0] * len(tensors)
    if not tensors:
        return counts
    with torch.no_grad():
        if distributed.has_dtensor(tensors):
            # Count on the local shards, then add the shards' counts across ranks with
            # the plan of the penalty (one all_reduce; replicated copies counted once).
            plan = distributed._make_plan(func, tensors)
            local_counts = torch.ops.regext.count_zeros(plan.local)
            rows = torch.zeros((len(tensors), 2), dtype=torch.float64,
                               device=local_counts.device)
            rows[:, 0] = local_counts  # exact in float64 below 2**53
            rows = distributed._unpermute_rows(plan, distributed._reduce_rows(plan, rows))
            return [int(c) for c in rows[:, 0].tolist()]
        for rows in _indices_by_device(tensors):
            got = torch.ops.regext.count_zeros([tensors[i] for i in rows]).tolist()
            for i, c in zip(rows, got):
                counts[i] = c
    return counts


@dataclass(frozen=True)
class TensorSparsity:
    """Exact zeros of one tensor."""
    name: str
    shape: tuple
    zeros: int
    numel: int

    @property
    def fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Exact zeros over a list of tensors and per tensor.

    ``fraction`` is the overall fraction of exactly-zero elements; ``per_tensor``
    lists a :class:`TensorSparsity` (``name``, ``shape``, ``zeros``, ``numel``,
    ``fraction``) per tensor, in input order; ``as_dict()`` maps names to
    fractions; ``str(report)`` is a printable table.
    """
    zeros: int
    numel: int
    per_tensor: tuple = field(default=())

    @property
    def fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def as_dict(self) -> dict:
        return {t.name: t.fraction for t in self.per_tensor}

    def __str__(self) -> str:
        width = max([len("tensor")] + [len(t.name) for t in self.per_tensor])
        lines = [f"{'tensor':<{width}}  {'shape':>18}  {'zeros':>12}  {'numel':>12}  zero %"]
        for t in self.per_tensor:
            lines.append(f"{t.name:<{width}}  {str(tuple(t.shape)):>18}  {t.zeros:>12}  "
                         f"{t.numel:>12}  {100 * t.fraction:6.2f}")
        lines.append(f"{'total':<{width}}  {'':>18}  {self.zeros:>12}  {self.numel:>12}  "
                     f"{100 * self.fraction:6.2f}")
        return "\n".join(lines)


def sparsity_report(params) -> SparsityReport:
    """Counts exact zeros (+0 and -0; NaN is not zero) per tensor and overall.

    Args:
        params: an ``nn.Module`` (its named parameters), an iterable of
            ``(name, tensor)`` pairs such as ``model.named_parameters()``, or an
            iterable of tensors (named ``"0"``, ``"1"``, ...). A tensor listed
            twice counts twice.

    Returns:
        A :class:`SparsityReport`. One fused counting pass per device and one
        device-to-host copy of the counts.
    """
    return _report("sparsity_report", params)


def _report(func, params) -> SparsityReport:
    named = named_tensors(func, params)
    counts = _zero_counts(func, [p for _, p in named])
    per_tensor = tuple(TensorSparsity(name, tuple(p.shape), c, p.numel())
                       for (name, p), c in zip(named, counts))
    return SparsityReport(zeros=sum(counts), numel=sum(t.numel for t in per_tensor),
                          per_tensor=per_tensor)


def sparsity(params) -> float:
    """The fraction of exactly-zero elements over all tensors, a float in [0, 1].

    ``params`` as in :func:`sparsity_report` (which also gives the per-tensor
    breakdown). 0.0 when there are no elements at all.
    """
    return _report("sparsity", params).fraction
