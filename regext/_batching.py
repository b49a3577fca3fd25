"""Batching rules (``torch.func.vmap``) for the differentiable regext operators.

Under vmap a tensor of logical shape S is held as a physical tensor with one more
dimension, the batch, at its ``in_dim`` d; sample b's tensor is the view
``p.select(d, b)``. The operators accept any strided view, so each rule runs its
operator **once**, on the views of every sample in sample-major order
(``[x0[0], x1[0], ..., x0[1], x1[1], ...]``): the stats rows come out as
``[B, rows per sample, 2]``, which is the batched stats, and each sample's total is
formed from its own rows with the kernels' formula (csrc/penalty_math.h):
``l1 * sum(sum|x|) + l2 * sum(w_g * L2 term)``, in float64, then the result dtype.
A tensor that is not batched (shared by every sample) is listed once per sample.

Coefficients and the incoming gradient may be batched too (one per sample: per-model
``l2`` in an ensemble; the seed of ``vmap(grad(...))``). The forward forms the totals
from the stats, so batched coefficients cost nothing there. A backward with a
batched ``grad_total`` runs the operator once with ``grad_total = 1`` and scales each
sample's gradients; only batched ``l1``/``l2`` need one operator call per sample
(each over all of that sample's tensors).

The autograd Functions (regext.penalty, regext._grad) use ``generate_vmap_rule``:
vmap runs their forward, backward and jvp on batched tensors, which reach these rules.
"""

import math

import torch

from regext._dtensor import functorch_error, has_dtensor
from regext._groups import count_groups
from regext._meta import result_dtype

_F64 = torch.float64


def _views(params, dims, samples):
    """Sample-major views: sample b's tensor of every parameter, for b < samples."""
    return [p if d is None else p.select(d, b)
            for b in range(samples) for p, d in zip(params, dims)]


def _sample(params, dims):
    """Sample 0's tensors (views), or meta tensors of their shapes for a batch of 0."""
    return [p if d is None else p.select(d, 0) if p.shape[d] else
            torch.empty(p.shape[:d] + p.shape[d + 1:], dtype=p.dtype, device="meta")
            for p, d in zip(params, dims)]


def _check_batched_coefficient(op, name, c):
    """What the operators check of a CPU coefficient, for one value per sample (not
    for values batched by an outer vmap too, which cannot be read here)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(c):
        return
    if c.device.type == "cpu" and c.numel() and not bool(
            (torch.isfinite(c) & (c >= 0)).all()):
        raise ValueError(f"{op}: {name} must be finite numbers >= 0 (one per vmapped sample), "
                         f"got {c.tolist()}")


def _coefficient_column(op, name, c, dim, device):
    """A coefficient for the per-sample totals: as it is if not batched (a 0-dim CPU
    tensor multiplies a device tensor without a copy), else float64 [B] on `device`."""
    if dim is None:
        return c
    c = c.movedim(dim, 0)
    _check_batched_coefficient(op, name, c)
    return c.to(device=device, dtype=_F64)


def _forward_rule(op, batch_size, params, p_dims, l1, l1_dim, l2, l2_dim, run, counts, l2_terms):
    """(total, stats) of every sample. run(views, l1, l2) calls the operator;
    counts(views) gives each view's number of stats rows; l2_terms(sums of squares
    [..., R], views of one sample) gives each row's weighted L2 term."""
    if has_dtensor(params):
        raise functorch_error(op)
    batched = any(d is not None for d in p_dims)
    samples = batch_size if batched else 1
    views = _views(params, p_dims, samples)
    sample = _sample(params, p_dims)
    rdtype = result_dtype(params)
    if not views:  # a batch of 0 samples
        device = params[0].device
        rows = sum(counts(sample))
        return ((torch.zeros((0,), dtype=rdtype, device=device),
                 torch.zeros((0, rows, 2), dtype=_F64, device=device)), (0, 0))
    zero = torch.zeros((), dtype=_F64)
    # Unbatched coefficients go to the operator, which checks their values; the
    # total it forms over all samples together is not used.
    _, stats = run(views, l1 if l1_dim is None else zero, l2 if l2_dim is None else zero)
    if batched:
        stats = stats.view(samples, stats.shape[0] // samples, 2)
    c1 = _coefficient_column(op, "l1", l1, l1_dim, stats.device)
    c2 = _coefficient_column(op, "l2", l2, l2_dim, stats.device)
    total = c1 * stats[..., 0].sum(-1) + c2 * l2_terms(stats[..., 1], sample).sum(-1)
    return (total.to(rdtype), stats), (0, 0 if batched else None)


def _backward_rule(op, batch_size, grad_total, gt_dim, params, p_dims, stats, st_dim, l1,
                   l1_dim, l2, l2_dim, rows, run):
    """Gradients of every sample, [B, *shape] each. run(grad_total, views, stats,
    l1, l2, rows) calls the operator; `rows` are the logical rows of params (the
    stats_rows / first_rows argument, filled in)."""
    if has_dtensor(params):
        raise functorch_error(op)
    n = len(params)
    per_sample = st_dim is not None or any(d is not None for d in p_dims)
    if st_dim is not None:
        stats = stats.movedim(st_dim, 0)            # [B, R, 2]
    if batch_size == 0:
        return [p.new_empty((0, *s.shape)) for p, s in zip(params, _sample(params, p_dims))], \
            [0] * n
    if l1_dim is None and l2_dim is None:
        # One operator call for every sample; a batched grad_total scales it afterwards.
        unit = grad_total if gt_dim is None else torch.ones(
            (), dtype=grad_total.dtype, device=grad_total.device)
        if per_sample:
            per_rows = stats.shape[1] if st_dim is not None else 0
            flat = stats.reshape(-1, 2).contiguous() if st_dim is not None else stats
            grads = run(unit, _views(params, p_dims, batch_size), flat, l1, l2,
                        [b * per_rows + r for b in range(batch_size) for r in rows])
            grads = [torch.stack(grads[j::n]) for j in range(n)]
        else:
            grads = [g.unsqueeze(0) for g in run(unit, params, stats, l1, l2, rows)]
        if gt_dim is not None:
            scale = grad_total.movedim(gt_dim, 0)
            # Out of place: under nested vmaps `scale` may be batched at an outer level.
            grads = [(g * scale.view(-1, *[1] * (g.dim() - 1))).to(g.dtype) for g in grads]
        return grads, [0] * n
    # One coefficient per sample: one operator call per sample, over all its tensors.
    out = []
    for b in range(batch_size):
        def pick(t, d):
            return t if d is None else t.select(d, b)
        views = [pick(p, d) for p, d in zip(params, p_dims)]
        out.append(run(pick(grad_total, gt_dim), views,
                       stats[b].contiguous() if st_dim is not None else stats,
                       pick(l1, l1_dim), pick(l2, l2_dim), rows))
    return [torch.stack([g[j] for g in out]) for j in range(n)], [0] * n


# ---------------------------------------------------------------- per-tensor operators

@torch.library.register_vmap("regext::penalty_forward")
def _penalty_forward_vmap(info, in_dims, params, l1, l2, l2_squared):
    p_dims, l1_dim, l2_dim, _ = in_dims
    return _forward_rule(
        "penalty_forward", info.batch_size, params, p_dims, l1, l1_dim, l2, l2_dim,
        lambda views, c1, c2: torch.ops.regext.penalty_forward(views, c1, c2, l2_squared),
        lambda views: [1] * len(views),
        lambda sq, sample: sq if l2_squared else sq.sqrt())


@torch.library.register_vmap("regext::penalty_backward")
def _penalty_backward_vmap(info, in_dims, grad_total, params, stats, l1, l2, l2_squared,
                           stats_rows=None):
    gt_dim, p_dims, st_dim, l1_dim, l2_dim = in_dims[:5]
    rows = list(stats_rows) if stats_rows is not None else list(range(len(params)))
    return _backward_rule(
        "penalty_backward", info.batch_size, grad_total, gt_dim, params, p_dims, stats, st_dim,
        l1, l1_dim, l2, l2_dim, rows,
        lambda gt, views, st, c1, c2, r: torch.ops.regext.penalty_backward(
            gt, views, st, c1, c2, l2_squared, r))


# ---------------------------------------------------------------- group operators

def _group_weights(views, group_dims, sqrt_size, device):
    """float64 [groups of one sample]: w_g per stats row (made on the device: no copy)."""
    parts = []
    for p, d in zip(views, group_dims):
        g = count_groups(p, d)
        w = math.sqrt(p.numel() // g) if (sqrt_size and g) else 1.0
        parts.append(torch.full((g,), w, dtype=_F64, device=device))
    return torch.cat(parts)


def _first_rows(params, group_dims):
    rows, row = [], 0
    for p, d in zip(params, group_dims):
        rows.append(row)
        row += count_groups(p, d)
    return rows


@torch.library.register_vmap("regext::group_penalty_forward")
def _group_penalty_forward_vmap(info, in_dims, params, group_dims, l1, l2, sqrt_size):
    p_dims, _, l1_dim, l2_dim, _ = in_dims
    group_dims = list(group_dims)

    def run(views, c1, c2):
        return torch.ops.regext.group_penalty_forward(
            views, group_dims * (len(views) // len(params)), c1, c2, sqrt_size)

    def l2_terms(sq, sample):
        norms = sq.sqrt()
        return norms * _group_weights(sample, group_dims, True, sq.device) if sqrt_size else norms

    return _forward_rule("group_penalty_forward", info.batch_size, params, p_dims, l1, l1_dim,
                         l2, l2_dim, run,
                         lambda sample: [count_groups(p, d) for p, d in zip(sample, group_dims)],
                         l2_terms)


@torch.library.register_vmap("regext::group_penalty_backward")
def _group_penalty_backward_vmap(info, in_dims, grad_total, params, group_dims, stats, l1, l2,
                                 sqrt_size, first_rows=None):
    gt_dim, p_dims, _, st_dim, l1_dim, l2_dim = in_dims[:6]
    group_dims = list(group_dims)
    rows = (list(first_rows) if first_rows is not None
            else _first_rows(_sample(params, p_dims), group_dims))

    def run(gt, views, st, c1, c2, r):
        return torch.ops.regext.group_penalty_backward(
            gt, views, group_dims * (len(views) // len(params)), st, c1, c2, sqrt_size, r)

    return _backward_rule("group_penalty_backward", info.batch_size, grad_total, gt_dim, params,
                          p_dims, stats, st_dim, l1, l1_dim, l2, l2_dim, rows, run)
