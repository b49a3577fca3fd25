"""DTensor parameters (FSDP2, tensor parallel): the exact global penalty with one all_reduce.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a DTensor
whose local tensor is one rank's shard. The penalty of a parameter depends on the
whole tensor (its L2 norm is not a sum of per-shard norms), so the regext kernels
run on each rank's local shards and only their partial sums travel:

1. ``penalty_forward`` over the local tensors gives per-tensor ``(sum|x|, sum x^2)``
   rows (float64) on each rank;
2. the rows of all sharded tensors are summed across ranks with a **single**
   ``torch.distributed.all_reduce`` (2 float64 per sharded tensor);
3. each rank finishes the norms and the total from those global rows, identically;
4. ``penalty_backward`` on the local shards with the global rows gives each shard
   its part of the true gradient (the L2 term divides by the whole tensor's norm),
   returned as a DTensor with the parameter's own placements.

Which ranks contribute which rows. A parameter's placement on each mesh dimension
is ``Replicate`` (every rank along it holds the same data) or a shard
(``Shard(d)``, or FSDP2 + TP's ``_StridedShard``: each rank holds a disjoint piece).
The rows are summed over one process group ``G``:

* one mesh, and every sharded parameter sharded on the same single mesh dimension
  ``d`` (FSDP2 on a 1-D mesh; HSDP's (replicate, shard) mesh): ``G`` is that mesh
  dimension's group. Replicated dimensions are simply not part of ``G``.
* otherwise (sharded over several mesh dimensions, e.g. FSDP2 + TP, or several
  meshes): ``G`` is the default (world) group, which requires every mesh involved
  to span all of its ranks. A rank then contributes a parameter's row only if its
  coordinate is 0 on each mesh dimension where that parameter is replicated; the
  other ranks send zeros. Each distinct piece is thus counted exactly once, with no
  division (exact), and replicated copies are never double-counted.
* meshes that do not span the world group in that second case, ``Partial``
  placements (a parameter is never a pending sum) and ranks outside a parameter's
  mesh raise ``NotImplementedError`` / ``ValueError`` with the parameter's position.

Plain tensors and fully replicated DTensors need no communication: their rows are
already complete on every rank. With no sharded parameter at all, nothing is sent.

Gradient scaling under FSDP2: none. The penalty gradient of a sharded parameter is
accumulated straight into ``param.grad`` (a DTensor shard) by autograd; it never
passes through FSDP2's reduce-scatter, which averages only the data-loss gradient.
So ``param.grad = mean_r grad(loss_r) + grad(penalty)``, the gradient of
``mean_r (loss_r + penalty)``, exactly what one process computes for the full batch.
Parameters that FSDP2 has left unsharded (plain tensors, e.g. the root module's
after its forward) get the identical penalty gradient on every rank, and FSDP2's
average of identical values is that value again: both routes agree.

Nothing here synchronizes the host with a GPU: the plan is built from metadata, the
rows never leave the device, and the collective is the only communication.
"""

import torch

from regext._dtensor import dtensor_type, functorch_error, has_dtensor, local_of
from regext._grad import backward_grads, coefficient_grads
from regext._meta import result_dtype
from regext._validation import coefficient, label
from regext.reference import group_shrink_scale_reference

__all__ = [
    "has_dtensor",
    "global_stats",
    "total_from_stats",
    "fused_penalty_dtensor",
    "add_penalty_grad_dtensor_",
    "prox_l1_dtensor_",
    "prox_group_l2_dtensor_",
    "scale_dtensor_",
    "zero_counts_dtensor",
    "as_param_grad",
    "distinct_runs",
    "make_plan",
    "reduce_rows",
    "unpermute_rows",
]


class Plan:
    """How the stats rows of a parameter list are computed and combined.

    ``order`` permutes the parameters so that the rows summed across ranks come
    first, then the rows that stay local; the kernels run on ``local`` (the local
    tensors, in that order), so the send buffer is the contiguous prefix
    ``stats[:num_reduced]``: no index tensor, no copy, no host-device traffic.
    The permutation is the same on every rank (all_reduce adds row j to row j):
    it depends on the placements only, never on this rank's coordinates.
    ``zero_ranges`` are the row ranges this rank sends as zeros (replicated copies
    that another rank contributes); rows with the same mesh and replicated mesh
    dimensions are adjacent, so there are few ranges.
    """

    def __init__(self, local, order, num_reduced, zero_ranges, group, layouts):
        self.local = local              # local tensors, permuted by `order`
        self.order = order              # order[j] = position in the caller's list
        self.num_reduced = num_reduced  # rows [0, num_reduced) go through all_reduce
        self.zero_ranges = zero_ranges  # [(start, end)): rows this rank sends as 0
        self.group = group              # the process group of the all_reduce
        self.layouts = layouts          # per caller position: (mesh, placements, shape, stride) or None


def _shard_dims(func, what, p):
    """Mesh dimensions along which DTensor `p` (the caller's `what`) is split."""
    dims = []
    for d, placement in enumerate(p.placements):
        if placement.is_replicate():
            continue
        if placement.is_partial():
            raise NotImplementedError(
                f"{func}: {what} has placement {placement} on mesh dimension {d}: "
                f"a Partial DTensor holds pending sums, not values, and its norm cannot be "
                f"computed from local shards; redistribute it (e.g. to Replicate) first")
        # Shard(d), _StridedShard (FSDP2 + TP) and any other split of the data.
        dims.append(d)
    return tuple(dims)


def _world_spanning(mesh) -> bool:
    import torch.distributed as dist
    return mesh.mesh.numel() == dist.get_world_size()


def _locals_and_layouts(func, params, names):
    """Each parameter's local tensor and layout, and which are sharded."""
    dtensor = dtensor_type()
    local, layouts, kept = [], [], []
    sharded = []  # (position, mesh, coordinate, shard dims)
    for i, p in enumerate(params):
        if dtensor is not None and isinstance(p, dtensor):
            mesh = p.device_mesh
            coordinate = mesh.get_coordinate()
            if coordinate is None:
                raise ValueError(f"{func}: {label('params', i, names)} lives on a device mesh "
                                 f"that does "
                                 f"not include this rank ({mesh}); call the penalty on "
                                 f"the ranks of the parameter's mesh only")
            dims = _shard_dims(func, label("params", i, names), p)
            with torch.no_grad():  # the local tensor itself, no autograd view
                local.append(p.to_local())
            layouts.append((mesh, tuple(p.placements), p.shape, p.stride()))
            if dims:
                sharded.append((i, mesh, coordinate, dims))
            else:
                kept.append(i)
        else:
            local.append(p)
            layouts.append(None)
            kept.append(i)
    devices = {t.device for t in local}
    if len(devices) > 1:
        raise ValueError(f"{func}: with DTensor parameters every local tensor must be on "
                         f"one device, got {sorted(str(d) for d in devices)}")
    return local, layouts, sharded, kept


def _world_reduction(func, sharded, meshes):
    """Sharded rows summed over the world group: (order of the reduced rows, the row
    ranges this rank sends as zeros). Each distinct piece is counted once: along a
    mesh dimension where a parameter is replicated, only the rank at coordinate 0
    sends its row. Rows are grouped by (mesh, replicated dims), the same on every
    rank; each group is sent whole or zeroed whole."""
    bad = [m for m in meshes if not _world_spanning(m)]
    if bad:
        raise NotImplementedError(
            f"{func}: parameters sharded over several mesh dimensions or on "
            f"different meshes are combined over the default process group, "
            f"which needs every mesh to span all of its ranks; mesh {bad[0]} does "
            f"not. Call the penalty separately for each mesh's parameters (and "
            f"add the results)")

    def key(entry):
        _, mesh, coordinate, dims = entry
        mesh_index = next(k for k, m in enumerate(meshes) if m == mesh)
        return mesh_index, tuple(d for d in range(len(coordinate)) if d not in dims)

    keyed = sorted(((key(e), e) for e in sharded), key=lambda ke: ke[0])  # stable
    zero_ranges, start = [], 0
    for end in range(1, len(keyed) + 1):
        if end < len(keyed) and keyed[end][0] == keyed[start][0]:
            continue
        (_, replicated), (_, _, coordinate, _) = keyed[start]
        if any(coordinate[d] != 0 for d in replicated):
            zero_ranges.append((start, end))
        start = end
    return [e[0] for _, e in keyed], zero_ranges


def make_plan(func, params, names=None) -> Plan:
    """The Plan of a list of tensors and DTensors (see Plan); no communication.
    `names` name the parameters in errors."""
    local, layouts, sharded, kept = _locals_and_layouts(func, params, names)
    group, reduced, zero_ranges = None, [], []
    if sharded:
        meshes = []
        for _, mesh, _, _ in sharded:
            if not any(mesh == m for m in meshes):
                meshes.append(mesh)
        all_dims = {d for _, _, _, dims in sharded for d in dims}
        if len(meshes) == 1 and len(all_dims) == 1:
            # FSDP2 / HSDP: one mesh dimension carries every shard. Its group sums
            # the pieces; ranks along the other (replicated) dimensions each do the
            # same sum independently.
            group = meshes[0].get_group(next(iter(all_dims)))
            reduced = [i for i, _, _, _ in sharded]
        else:
            import torch.distributed as dist
            group = dist.group.WORLD
            reduced, zero_ranges = _world_reduction(func, sharded, meshes)
    order = reduced + kept
    return Plan(local=[local[i] for i in order], order=order, num_reduced=len(reduced),
                zero_ranges=zero_ranges, group=group, layouts=layouts)


def reduce_rows(plan: Plan, stats: torch.Tensor) -> torch.Tensor:
    """Sums the rows of sharded tensors across ranks, in place: one all_reduce."""
    if plan.num_reduced == 0:
        return stats
    import torch.distributed as dist
    send = stats[:plan.num_reduced]  # a contiguous prefix view: reduced in place
    for start, end in plan.zero_ranges:
        send[start:end].zero_()
    dist.all_reduce(send, op=dist.ReduceOp.SUM, group=plan.group)
    return stats


def _plan_stats(plan: Plan, l1, l2, l2_squared: bool) -> torch.Tensor:
    """Global stats rows in plan order (float64 [n, 2] on the local device)."""
    _, stats = torch.ops.regext.penalty_forward(plan.local, l1, l2, l2_squared)
    return reduce_rows(plan, stats)


def total_from_stats(stats, l1, l2, l2_squared=False, dtype=torch.float32):
    """``l1 * sum(sum|x|) + l2 * sum(L2 term)`` from stats rows, in float64, then `dtype`.

    The same formula as the kernels (csrc/penalty_math.h): coefficients of 0 still
    multiply, so NaN/inf propagate. Device ops only: no host synchronization.
    """
    l2_terms = stats[:, 1] if l2_squared else stats[:, 1].sqrt()
    return (l1 * stats[:, 0].sum() + l2 * l2_terms.sum()).to(dtype)


def global_stats(params, *, func="regext", names=None):
    """Per-tensor global ``(sum|x|, sum x^2)`` of a list of tensors and DTensors.

    Returns ``(local, stats)``: ``local[i]`` is params[i]'s local tensor (the
    tensor itself for a plain tensor) and ``stats`` a float64 ``[len(params), 2]``
    tensor on the local device whose row i covers the *whole* params[i], across
    ranks, identical on every rank. Issues exactly one all_reduce if any
    parameter is sharded, none otherwise. Feed ``local`` and ``stats`` to
    ``torch.ops.regext.penalty_backward`` / ``penalty_grad_accumulate_`` to get
    each rank's part of the global gradient.
    """
    params = list(params)
    if not params:
        return [], torch.zeros((0, 2), dtype=torch.float64)
    plan = make_plan(func, params, names)
    zero = torch.zeros((), dtype=torch.float64)
    stats = _plan_stats(plan, zero, zero, False)
    return _unpermute_local(plan), unpermute_rows(plan, stats)


def _unpermute_local(plan):
    out = [None] * len(plan.order)
    for j, i in enumerate(plan.order):
        out[i] = plan.local[j]
    return out


def unpermute_rows(plan, stats):
    inverse = [0] * len(plan.order)
    for j, i in enumerate(plan.order):
        inverse[i] = j
    return select_rows(stats, inverse)


def select_rows(stats, rows):
    """stats[rows] from slices of consecutive rows: no index tensor to copy to the
    device (a host-to-device copy would synchronize a GPU), one cat at most."""
    if rows == list(range(stats.shape[0])):
        return stats
    runs, start = [], 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or rows[k] != rows[k - 1] + 1:
            runs.append(stats[rows[start]:rows[k - 1] + 1])
            start = k
    return runs[0] if len(runs) == 1 else torch.cat(runs)


def as_param_grad(local_grad, layout):
    """A local gradient as the parameter's kind: a DTensor with its placements."""
    if layout is None:
        return local_grad
    from torch.distributed.tensor import DTensor
    mesh, placements, shape, stride = layout
    # run_check=False: no collective. shape/stride: uneven shards stay exact.
    return DTensor.from_local(local_grad, mesh, placements, run_check=False, shape=shape,
                              stride=stride)


class _ShardedPenalty(torch.autograd.Function):
    """fused_penalty over a list holding DTensors (and possibly plain tensors).

    forward: penalty_forward on the local tensors, one all_reduce of the sharded
    rows, the total from the global rows. Returns a plain 0-dim tensor, the same
    on every rank: it adds to a per-rank loss as it is (FSDP2 losses are plain).
    backward: penalty_backward on the local tensors with the global rows; the
    gradients of DTensor parameters are DTensors with the parameter's placements.
    """

    @staticmethod
    def forward(ctx, plan, l1, l2, l2_squared, *params):
        stats = _plan_stats(plan, l1, l2, l2_squared)
        total = total_from_stats(stats, l1, l2, l2_squared, result_dtype(params))
        plan.local = None  # not kept alive by the graph; backward re-reads the params
        ctx.plan = plan
        ctx.l2_squared = l2_squared
        ctx.save_for_backward(stats, l1, l2, *params)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        stats, l1, l2, *params = ctx.saved_tensors
        plan = ctx.plan
        needed = ctx.needs_input_grad[4:]
        grads = [None] * len(params)
        if torch.is_grad_enabled():
            # create_graph=True: the kernel's gradient of every local tensor, reached
            # differentiably (to_local, from_local), whose second derivative sums its
            # dot products across ranks with the forward's plan.
            local = [p.to_local() if layout is not None else p
                     for p, layout in ((params[i], plan.layouts[i]) for i in plan.order)]
            subset = backward_grads(grad_total, local, stats, None, l1, l2, ctx.l2_squared,
                                    reduce_dots=lambda dots: reduce_rows(plan, dots))
            chosen = list(enumerate(plan.order))
        else:
            # The local tensors again from the saved parameters (not kept from the
            # forward), so autograd's saved-tensor checks cover them.
            rows = [j for j, i in enumerate(plan.order) if needed[i]]
            subset = backward_grads(grad_total, [local_of(params[plan.order[j]]) for j in rows],
                                    select_rows(stats, rows), None, l1, l2, ctx.l2_squared)
            chosen = [(j, plan.order[j]) for j in rows]
        for (j, i), g in zip(chosen, subset):
            if needed[i]:
                grads[i] = as_param_grad(g, plan.layouts[i])
        d_l1, d_l2 = coefficient_grads(ctx.needs_input_grad[1:3], grad_total, stats, None,
                                       ctx.l2_squared)
        if d_l1 is not None:
            d_l1 = d_l1.to(l1.device, l1.dtype)
        if d_l2 is not None:
            d_l2 = d_l2.to(l2.device, l2.dtype)
        return (None, d_l1, d_l2, None, *grads)


def fused_penalty_dtensor(params, l1, l2, l2_squared, *, func="fused_penalty", names=None):
    """fused_penalty for a checked, non-empty list containing DTensors."""
    if torch._C._are_functorch_transforms_active():
        raise functorch_error(func)
    l1, l2 = coefficient(func, "l1", l1), coefficient(func, "l2", l2)
    plan = make_plan(func, params, names)
    return _ShardedPenalty.apply(plan, l1, l2, l2_squared, *params)


def add_penalty_grad_dtensor_(params, l1, l2, l2_squared=False, *,
                              func="add_penalty_grad_", names=None, check=None):
    """``p.grad += d(penalty)/dp`` for every parameter that requires grad; DTensors allowed.

    For the public ``add_penalty_grad_`` to call on a checked list that holds
    DTensors. A missing gradient is created (a DTensor with the parameter's
    placements for a DTensor parameter); an existing DTensor gradient must have its
    parameter's placements (FSDP2's do) and is updated in its local tensor.
    One all_reduce if any parameter is sharded. Returns the penalty value (a plain
    0-dim tensor, no autograd graph), the same on every rank. `names` name the
    parameters in errors; check(total), if given, runs before any gradient is touched.
    """
    params = list(params)
    if not params:
        return torch.zeros(())
    l1, l2 = coefficient(func, "l1", l1), coefficient(func, "l2", l2)
    plan = make_plan(func, params, names)
    rows = [j for j, i in enumerate(plan.order) if params[i].requires_grad]
    dtensor = dtensor_type()
    for j in rows:  # every check before anything is sent or written
        i = plan.order[j]
        grad, layout = params[i].grad, plan.layouts[i]
        if grad is None:
            continue
        if layout is None:
            if dtensor is not None and isinstance(grad, dtensor):
                raise ValueError(f"{func}: {label('params', i, names)} is a plain tensor but "
                                 f"its .grad is a DTensor")
        elif (not isinstance(grad, dtensor) or tuple(grad.placements) != layout[1]
              or grad.device_mesh != layout[0]):
            got = (f"placements {tuple(grad.placements)} on {grad.device_mesh}"
                   if isinstance(grad, dtensor) else f"a plain {type(grad).__name__}")
            raise ValueError(f"{func}: {label('params', i, names)}.grad must be a DTensor with "
                             f"the parameter's placements {layout[1]} on {layout[0]}, got {got}")
    with torch.no_grad():
        stats = _plan_stats(plan, l1, l2, l2_squared)
        total = total_from_stats(stats, l1, l2, l2_squared, result_dtype(params))
        if check is not None:
            check(total)
        if not rows:
            return total
        local_grads = []
        for j in rows:
            i = plan.order[j]
            p, layout = params[i], plan.layouts[i]
            if p.grad is None:
                p.grad = as_param_grad(torch.zeros_like(plan.local[j]), layout)
            local_grads.append(p.grad.to_local() if layout is not None else p.grad)
        torch.ops.regext.penalty_grad_accumulate_(
            local_grads, [plan.local[j] for j in rows], select_rows(stats, rows), l1, l2,
            l2_squared)
    return total


def prox_l1_dtensor_(params, threshold):
    """prox_l1_ for a checked list holding DTensors. Elementwise: every rank thresholds
    its own shard (and its replicated copies, identically) where it lies. No
    communication."""
    local = [local_of(p) for p in params]
    for device_list in _by_device(local):
        torch.ops.regext.prox_l1_(device_list, threshold)


def _by_device(tensors):
    groups = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return list(groups.values())


def distinct_runs(params):
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


def prox_group_l2_dtensor_(params, threshold, *, func="prox_group_l2_", names=None):
    """prox_group_l2_ for a checked list holding DTensors: the norms are those of the
    whole tensors (global_stats: one all_reduce if any is sharded), the scaling is
    applied to each rank's local shard. List order as in the operator: a tensor
    listed again starts a new run, which sees the first shrinkage."""
    for start, end in distinct_runs(params):
        local, stats = global_stats(params[start:end], func=func,
                                    names=None if names is None else names[start:end])
        scales = group_shrink_scale_reference(stats[:, 1], threshold)
        for x, scale in zip(local, scales):
            if x.numel():
                product = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) \
                    else torch.float64
                x.copy_(x.to(product) * scale.to(product))


def scale_dtensor_(params, factor):
    """x <- x * factor on every rank's local tensors (elementwise: no communication)."""
    torch._foreach_mul_([local_of(p) for p in params], factor)


def zero_counts_dtensor(tensors, *, func="sparsity"):
    """Exact zeros per tensor (ints) over whole DTensors: counted on the local shards,
    then added across ranks with the penalty's plan (one all_reduce; replicated
    copies counted once)."""
    plan = make_plan(func, tensors)
    local_counts = torch.ops.regext.count_zeros(plan.local)
    rows = torch.zeros((len(tensors), 2), dtype=torch.float64, device=local_counts.device)
    rows[:, 0] = local_counts  # exact in float64 below 2**53
    rows = unpermute_rows(plan, reduce_rows(plan, rows))
    return [int(c) for c in rows[:, 0].tolist()]
