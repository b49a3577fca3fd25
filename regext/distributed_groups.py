"""The group lasso on DTensor parameters (FSDP2, tensor parallel): exact, with one
all_reduce of per-group partial sums for the whole list (issue 21, item 4).

A group is a row (``p[i]``, slices along dim 0) or a column (``p[:, j]``, along dim 1)
of the *whole* parameter. Each rank's local shard holds a block of the whole tensor
(``Shard(d)`` placements: a contiguous range along d): its local rows (or columns)
are pieces of the global groups ``offset .. offset + n`` along the group dimension.
Under FSDP2's ``Shard(0)``, rows are whole on one rank and columns are split across
ranks; under ``Shard(1)`` the reverse. Either way:

1. the group kernel (``group_penalty_forward``) gives per-local-group float64
   ``(sum|x|, sum x^2)`` of every local tensor, in one call;
2. each sharded tensor owns a segment of one float64 buffer, ``[global groups, 2]``;
   a rank writes its local groups' sums at their global positions (zeros
   elsewhere), and **one** ``all_reduce`` (SUM) over the plan's process group
   (regext.distributed.make_plan: the shard dimension's group, or the world with
   replicated copies sent once) gives every rank the sums of the whole groups.
   That is 16 bytes per group of a sharded tensor (a GPT-2 small has about 110,000
   row groups: 1.8 MB). Plain and fully replicated tensors are complete on every
   rank and are not sent;
3. the value ``l1·Σ|x| + l2·Σ_g w_g·‖g‖₂`` follows from the global sums, with
   ``w_g = sqrt(elements of the whole group)`` for ``group_weight="sqrt_size"``;
4. gradients (``group_penalty_backward`` on each local shard, with its groups'
   global sums) and the proximal step (block soft-thresholding of each local piece
   of a group by the global group's factor ``max(0, 1 - t·w_g/‖g‖₂)``) need no
   more communication.

``_StridedShard`` (FSDP2 + TP on one dim) holds non-contiguous pieces along a dim:
NotImplementedError naming the parameter. Nothing here synchronizes with a GPU.
"""

import math

import torch

from regext import _groups
from regext._dtensor import dtensor_type, functorch_error, local_of
from regext._meta import result_dtype
from regext._validation import coefficient, label
from regext.distributed import as_param_grad, distinct_runs, make_plan
from regext.reference import group_shrink_scale_reference


class GroupPlan:
    """Where every tensor's local groups sit among the global groups.

    For tensor i: ``local[i]`` (its local tensor), ``counts[i]`` (its global number
    of groups), ``offsets[i]`` (the global index of its local group 0) and
    ``weights[i]`` (w_g, the same for all its groups). ``segment[i]`` is the start
    of its global groups in the all_reduce buffer, or None for a tensor complete on
    this rank (plain, replicated: its local groups are its global groups)."""

    def __init__(self, func, params, grouping, names):
        self.plan = make_plan(func, params, names)  # checks placements, picks the group
        self.grouping = grouping
        dtensor = dtensor_type()
        zeroed = {self.plan.order[j] for start, end in self.plan.zero_ranges
                  for j in range(start, end)}
        sharded = set(self.plan.order[:self.plan.num_reduced])
        self.local, self.counts, self.offsets, self.weights = [], [], [], []
        self.segment, self.sends = [], []
        size = 0
        for i, p in enumerate(params):
            local = local_of(p)
            count = _groups.count_groups(p, grouping.dim)
            offset = 0
            if dtensor is not None and isinstance(p, dtensor) and i in sharded:
                offset = _group_offset(func, label("params", i, names), p, grouping)
                self.segment.append(size)
                size += count
            else:
                self.segment.append(None)
            self.local.append(local)
            self.counts.append(count)
            self.offsets.append(offset)
            group_size = p.numel() // count if count else 0
            self.weights.append(math.sqrt(group_size) if grouping.sqrt_size else 1.0)
            self.sends.append(i not in zeroed)
        self.buffer_rows = size

    def global_stats(self):
        """(per tensor, float64 [its global groups, 2] sums of the whole groups;
        per tensor, the rows of its local groups): one all_reduce if anything is
        sharded."""
        zero = torch.zeros((), dtype=torch.float64)
        _, local_stats = _groups.penalty_forward(self.local, zero, zero, False, self.grouping)
        first = self.grouping.first_rows(self.local)
        local_counts = self.grouping.counts(self.local)
        local_rows = [local_stats[f:f + n] for f, n in zip(first, local_counts)]
        whole = list(local_rows)
        if self.buffer_rows:
            import torch.distributed as dist
            buffer = torch.zeros((self.buffer_rows, 2), dtype=torch.float64,
                                 device=local_stats.device)
            for i, rows in enumerate(local_rows):
                start = self.segment[i]
                if start is not None and self.sends[i] and rows.shape[0]:
                    begin = start + self.offsets[i]
                    buffer[begin:begin + rows.shape[0]] = rows
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.plan.group)
            for i, start in enumerate(self.segment):
                if start is not None:
                    whole[i] = buffer[start:start + self.counts[i]]
                    begin = start + self.offsets[i]
                    local_rows[i] = buffer[begin:begin + local_rows[i].shape[0]]
        return whole, local_rows

    def total(self, whole, l1, l2, dtype):
        """l1·Σ|x| + l2·Σ_g w_g ‖g‖₂ in float64 from the whole groups' sums, as `dtype`."""
        device = whole[0].device
        l1_term = torch.zeros((), dtype=torch.float64, device=device)
        l2_term = torch.zeros((), dtype=torch.float64, device=device)
        for rows, weight in zip(whole, self.weights):
            l1_term = l1_term + rows[:, 0].sum()
            l2_term = l2_term + rows[:, 1].sqrt().sum() * weight
        return (l1 * l1_term + l2 * l2_term).to(dtype)

    def kernel_rows(self, local_rows):
        """The local groups' sums as the group kernels take them, in one float64
        [local groups, 2] tensor. With group_weight="sqrt_size" the kernels weigh a
        group by sqrt(its *local* size); a group split across ranks must weigh by
        its whole size, so its sum of squares is scaled by (w_local / w_whole)^2:
        then l2·w_local·x / sqrt(scaled) = l2·w_whole·x / ‖g‖ exactly in the ratio
        (a zero or NaN sum stays zero or NaN)."""
        rows = []
        for i, r in enumerate(local_rows):
            if self.grouping.sqrt_size and self.segment[i] is not None and r.shape[0]:
                local_count = _groups.count_groups(self.local[i], self.grouping.dim)
                local_size = self.local[i].numel() // local_count if local_count else 0
                ratio = local_size / (self.weights[i] ** 2) if self.weights[i] else 1.0
                r = torch.stack([r[:, 0], r[:, 1] * ratio], dim=1)
            rows.append(r)
        return torch.cat(rows) if rows else torch.zeros((0, 2), dtype=torch.float64)


def _group_offset(func, what, p, grouping):
    """The global index of `p`'s local group 0 (0 when the group dim is not split)."""
    if grouping.dim < 0 or p.dim() < 2:
        return 0
    for placement in p.placements:
        if placement.is_shard() and type(placement).__name__ != "Shard":
            raise NotImplementedError(
                f"{func}: {what} has placement {placement}: its local rows are not one "
                f"contiguous block of the whole tensor, so groups cannot be placed; "
                f"group={grouping.kind!r} supports Shard(d) and Replicate placements")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[grouping.dim]


class _ShardedGroupPenalty(torch.autograd.Function):
    """The group lasso over a list holding DTensors; see the module docstring."""

    @staticmethod
    def forward(ctx, group_plan, l1, l2, *params):
        whole, local_rows = group_plan.global_stats()
        ctx.group_plan = group_plan
        ctx.save_for_backward(l1, l2, group_plan.kernel_rows(local_rows), *params)
        total = group_plan.total(whole, l1, l2, result_dtype(params))
        group_plan.local = None  # backward re-reads the parameters
        return total

    @staticmethod
    def backward(ctx, grad_total):
        l1, l2, rows, *params = ctx.saved_tensors
        gp = ctx.group_plan
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "fused_penalty: second derivatives (create_graph=True) of the group lasso on "
                "DTensor parameters are not supported")
        needed = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        local = [local_of(p) for p in params]
        first = gp.grouping.first_rows(local)
        grads = [None] * len(params)
        if needed:
            subset = _groups.penalty_backward(grad_total, [local[i] for i in needed], rows, l1, l2,
                                              False, [first[i] for i in needed], gp.grouping)
            for i, g in zip(needed, subset):
                grads[i] = as_param_grad(g, gp.plan.layouts[i])
        return (None, None, None, *grads)


def group_penalty_dtensor(params, l1, l2, grouping, *, func="fused_penalty", names=None):
    """fused_penalty with group= / group_weight= for a checked list holding DTensors.
    Differentiable with respect to the parameters (not to l1, l2)."""
    if torch._C._are_functorch_transforms_active():
        raise functorch_error(func)
    l1, l2 = coefficient(func, "l1", l1), coefficient(func, "l2", l2)
    if l1.requires_grad or l2.requires_grad:
        raise NotImplementedError(f"{func}: gradients with respect to l1 or l2 of the group "
                                  f"lasso on DTensor parameters are not supported")
    return _ShardedGroupPenalty.apply(GroupPlan(func, params, grouping, names), l1, l2, *params)


def add_group_penalty_grad_dtensor_(params, l1, l2, grouping, *, func="add_penalty_grad_",
                                    names=None, check=None):
    """``p.grad += d(group lasso)/dp`` for a checked list holding DTensors (missing
    gradients created with the parameter's placements); returns the value."""
    l1, l2 = coefficient(func, "l1", l1), coefficient(func, "l2", l2)
    gp = GroupPlan(func, params, grouping, names)
    dtensor = dtensor_type()
    for i, p in enumerate(params):  # every check before anything is sent or written
        layout = gp.plan.layouts[i]
        if p.requires_grad and p.grad is not None and layout is not None and (
                not isinstance(p.grad, dtensor) or tuple(p.grad.placements) != layout[1]):
            raise ValueError(f"{func}: {label('params', i, names)}.grad must be a DTensor with "
                             f"the parameter's placements {layout[1]}")
    with torch.no_grad():
        whole, local_rows = gp.global_stats()
        total = gp.total(whole, l1, l2, result_dtype(params))
        if check is not None:
            check(total)
        rows = gp.kernel_rows(local_rows)
        first = grouping.first_rows(gp.local)
        chosen = [i for i, p in enumerate(params) if p.requires_grad]
        grads = []
        for i in chosen:
            p, layout = params[i], gp.plan.layouts[i]
            if p.grad is None:
                p.grad = as_param_grad(torch.zeros_like(gp.local[i]), layout)
            grads.append(local_of(p.grad))
        if chosen:
            _groups.penalty_grad_accumulate_(grads, [gp.local[i] for i in chosen], rows, l1, l2,
                                             False, [first[i] for i in chosen], grouping)
    return total


def prox_group_lasso_dtensor_(params, threshold, grouping, *, func="prox_group_l2_",
                              names=None):
    """The group-lasso proximal step of a checked list holding DTensors: each local
    piece of a group is scaled by the whole group's factor ``max(0, 1 - t·w_g/‖g‖₂)``
    (1 where the norm is NaN). A tensor listed again starts a new pass, which sees
    the first shrinkage (the operator's list order)."""
    for start, end in distinct_runs(params):
        part = params[start:end]
        gp = GroupPlan(func, part, grouping, None if names is None else names[start:end])
        _, local_rows = gp.global_stats()
        for i, rows in enumerate(local_rows):
            x = gp.local[i]
            if x.numel() == 0:
                continue
            t = threshold.to(rows.device, torch.float64) * gp.weights[i]
            scale = group_shrink_scale_reference(rows[:, 1], t)
            product = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) \
                else torch.float64
            if grouping.dim < 0 or x.dim() < 2:
                x.copy_(x.to(product) * scale.to(product).reshape(()))
            else:
                shape = [1] * x.dim()
                shape[grouping.dim] = -1
                x.copy_(x.to(product) * scale.to(product).reshape(shape))
