"""DeepSpeed ZeRO-3 partitions: the exact penalty and its gradient with one all_reduce.

Outside ``deepspeed.zero.GatheredParameters`` (and the forward) a ZeRO-3 parameter
is a 0-element placeholder; this rank's piece of it is ``p.ds_tensor``. DeepSpeed
lays it out (runtime/zero/partition_parameters.py, ``_partition_param``) as a 1-D
tensor of ``partition_size = ceil-aligned numel / world`` elements: rank ``r`` of
``p.ds_process_group`` holds the flattened elements ``[r * partition_size, (r + 1) *
partition_size)``, and only the first ``p.ds_numel`` elements over all ranks are the
parameter's (the tail of the last partitions is uninitialized padding). So this
rank's real elements are ``ds_tensor[:max(0, min(partition_size, ds_numel - r *
partition_size))]``: disjoint contiguous pieces that together are the parameter.

That is the problem regext.distributed solves for DTensor shards, and its helpers
do the work: the kernels' per-tensor ``(sum|x|, sum x^2)`` rows of the local pieces
(float64), the rows of every ZeRO-3 parameter summed over their process group with
**one** ``all_reduce``, the total from the global rows, and each local piece's
gradient ``l1 sign(x) + l2 x / ||x||_2`` from the global norms by the in-place
kernel ``penalty_grad_accumulate_`` (same zero-norm, NaN and dtype rules).

Gradients go where ZeRO-3 expects them: this rank's gradient partition, read and
written with DeepSpeed's public ``deepspeed.utils.safe_get_local_grad`` /
``safe_set_local_grad`` between ``engine.backward(loss)`` and ``engine.step()``
(DeepSpeed has already reduce-scattered and averaged the loss gradients there; the
penalty gradient is the same on every rank and is added once, after averaging,
as the single-process loop adds it to the averaged loss gradient). Every ZeRO-3
parameter of the list goes through its partition then, gathered ones too (after
``engine.backward`` some stay gathered, their ``.grad`` already moved into the
partitions; a ``.grad`` written on them would never reach the optimizer).

Refused (ValueError naming the parameter, dtype and what to do): autograd through
placeholders (fused_penalty with grad), fp16 loss scaling (the gradient partitions
hold loss-scaled values), partitions swapped out to NVMe, ZeRO-3 parameters with
several process groups in one call, DTensors in the same list, and plain tensors
that require grad in add_penalty_grad_ (call it separately for them: the
per-tensor penalty adds up over tensors).

deepspeed is imported only here, and this module only when a ZeRO-3 parameter is
in a list while a process group exists.
"""

import torch

from regext import distributed
from regext._dtensor import is_dtensor
from regext._meta import result_dtype
from regext._validation import SUPPORTED_DTYPES, label


def _accelerator_device():
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def is_zero3(p) -> bool:
    return p.__dict__.get("ds_status") is not None


def _piece(func, what, p, ranks):
    """This rank's real elements of ZeRO-3 parameter `p` (a 1-D view of ds_tensor)."""
    part = p.__dict__.get("ds_tensor")
    if part is None or part.dim() != 1 or part.dtype not in SUPPORTED_DTYPES:
        got = ("no ds_tensor" if part is None else
               f"a ds_tensor of shape {tuple(part.shape)} and dtype {part.dtype}")
        raise ValueError(
            f"{func}: {what} is a DeepSpeed ZeRO-3 parameter (dtype {p.dtype}) with {got}, not "
            f"a 1-D floating-point partition (quantized weights?); compute inside "
            f"deepspeed.zero.GatheredParameters(params)")
    status = getattr(getattr(part, "status", None), "name", "AVAILABLE")
    if status != "AVAILABLE":
        raise ValueError(
            f"{func}: {what} is a DeepSpeed ZeRO-3 parameter (dtype {p.dtype}) whose partition "
            f"is not in memory (ds_tensor.status {status}: offloaded to NVMe); compute inside "
            f"deepspeed.zero.GatheredParameters(params), or offload parameters to the CPU")
    group = p.ds_process_group
    key = id(group)
    if key not in ranks:
        import torch.distributed as dist
        ranks[key] = dist.get_rank(group=group)
    size = part.numel()
    real = max(0, min(size, int(p.ds_numel) - ranks[key] * size))
    return part.detach().narrow(0, 0, real), group


def make_plan(func, params, names=None):
    """A regext.distributed.Plan over the ZeRO-3 pieces and plain tensors of
    `params` (checked, non-empty): the ZeRO-3 rows first (summed over their process
    group), then the plain ones (whole on every rank, not sent). No communication."""
    device = _accelerator_device()
    local = [None] * len(params)
    zero3, plain = [], []
    group, first, ranks = None, None, {}
    for i, p in enumerate(params):
        if not is_zero3(p):
            if is_dtensor(p):
                raise ValueError(
                    f"{func}: {label('params', i, names)} is a DTensor (dtype {p.dtype}) in "
                    f"the same call as DeepSpeed ZeRO-3 parameters; call regext separately "
                    f"for each engine's parameters (the per-tensor penalty adds up)")
            if p.device != device:
                raise ValueError(
                    f"{func}: {label('params', i, names)} (dtype {p.dtype}) is on {p.device} "
                    f"but DeepSpeed ZeRO-3 partitions are computed on {device}; move it "
                    f"there or call regext separately for it")
            local[i] = p
            plain.append(i)
            continue
        piece, g = _piece(func, label("params", i, names), p, ranks)
        if group is None:
            group, first = g, i
        elif g is not group:
            raise ValueError(
                f"{func}: {label('params', i, names)} (dtype {p.dtype}) is partitioned over "
                f"another process group than {label('params', first, names)}; one all_reduce "
                f"covers one group: call regext separately for each group's parameters")
        local[i] = piece if piece.device == device else piece.to(device)
        zero3.append(i)
    order = zero3 + plain
    return distributed.Plan(local=[local[i] for i in order], order=order,
                            num_reduced=len(zero3), zero_ranges=[], group=group,
                            layouts=[None] * len(params))


def _global_stats(plan, l1, l2, l2_squared):
    """The kernels' rows of the local pieces, the ZeRO-3 ones summed across ranks."""
    _, stats = torch.ops.regext.penalty_forward(plan.local, l1, l2, l2_squared)
    return distributed.reduce_rows(plan, stats)


def _raise_if_nonfinite(func, total, stats, plan, params, l1, l2, names):
    """error_if_nonfinite from the global rows (identical on every rank, so every
    rank raises the same error)."""
    if bool(torch.isfinite(total)):
        return
    finite = torch.isfinite(stats).all(dim=1).tolist()
    for j, ok in enumerate(finite):
        if not ok:
            i = plan.order[j]
            p = params[i]
            raise RuntimeError(
                f"{func}: the penalty is {total.item()} because {label('params', i, names)} "
                f"(shape {tuple(p.ds_shape) if is_zero3(p) else tuple(p.shape)}, dtype "
                f"{p.dtype}) has a non-finite norm: it holds NaN or inf values or values "
                f"whose sum of squares overflows")
    raise RuntimeError(
        f"{func}: the penalty is {total.item()} although every tensor's norms are finite: "
        f"l1 * sum of L1 norms + l2 * sum of L2 terms overflows the result dtype "
        f"{total.dtype} (l1={float(l1)}, l2={float(l2)})")


def fused_penalty_value(params, l1, l2, l2_squared, *, error_if_nonfinite=False,
                        func="fused_penalty", names=None):
    """fused_penalty's value on a checked list holding ZeRO-3 partitions: one
    all_reduce; the same 0-dim tensor on every rank, with no autograd graph."""
    if torch.is_grad_enabled() and (l1.requires_grad or l2.requires_grad):
        raise ValueError(
            f"{func}: a coefficient requires grad but the parameters are DeepSpeed ZeRO-3 "
            f"partitions, on which fused_penalty gives the value only; call it under "
            f"torch.no_grad(), or inside deepspeed.zero.GatheredParameters(params)")
    plan = make_plan(func, params, names)
    with torch.no_grad():
        stats = _global_stats(plan, l1, l2, l2_squared)
        total = distributed.total_from_stats(stats, l1, l2, l2_squared, result_dtype(params))
    if error_if_nonfinite:
        _raise_if_nonfinite(func, total, stats, plan, params, l1, l2, names)
    return total


def add_penalty_grad_(params, l1, l2, l2_squared=False, *, error_if_nonfinite=False,
                      func="add_penalty_grad_", names=None):
    """add_penalty_grad_ on a checked list holding ZeRO-3 parameters: the penalty
    gradient of this rank's real elements is added into its gradient partition
    (safe_get_local_grad / safe_set_local_grad). One all_reduce. Returns the
    value. Every check runs before any gradient is read or written."""
    plan = make_plan(func, params, names)
    rows, owners = [], {}
    for j, i in enumerate(plan.order):
        p = params[i]
        if not p.requires_grad:
            continue
        what = label("params", i, names)
        if j >= plan.num_reduced:
            raise ValueError(
                f"{func}: {what} (shape {tuple(p.shape)}, dtype {p.dtype}) is a plain tensor "
                f"that requires grad in a call on DeepSpeed ZeRO-3 parameters, whose "
                f"gradients go to ZeRO-3's partitions; call add_penalty_grad_ separately "
                f"for it (the per-tensor penalty adds up over tensors)")
        optimizer = p.__dict__.get("_z3_optimizer")
        if optimizer is None:
            raise ValueError(
                f"{func}: {what} (dtype {p.dtype}) is a DeepSpeed ZeRO-3 parameter without a "
                f"ZeRO-3 optimizer, so it has no gradient partition; build the engine with "
                f"deepspeed.initialize(model=..., optimizer=...)")
        scale = getattr(optimizer, "loss_scale", 1.0)
        if p.dtype == torch.float16 or float(scale) != 1.0:
            raise ValueError(
                f"{func}: {what} (dtype {p.dtype}) is a DeepSpeed ZeRO-3 parameter trained "
                f"with fp16 loss scaling (scale {float(scale)}): its gradient partition "
                f"holds loss-scaled values, which DeepSpeed's public API does not expose "
                f"unscaled; use bf16 or fp32, or add fused_penalty to the loss inside "
                f"deepspeed.zero.GatheredParameters(params)")
        if plan.local[j].numel():  # ranks past the parameter's end hold only padding
            rows.append(j)
            owners.setdefault(id(p), p)
    with torch.no_grad():
        stats = _global_stats(plan, l1, l2, l2_squared)
        total = distributed.total_from_stats(stats, l1, l2, l2_squared, result_dtype(params))
        if error_if_nonfinite:
            _raise_if_nonfinite(func, total, stats, plan, params, l1, l2, names)
        if not rows:
            return total
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad
        grads = {}
        for key, p in owners.items():
            g = safe_get_local_grad(p)
            if g is None or g.dim() != 1 or g.numel() != p.ds_tensor.numel():
                got = "None" if g is None else f"shape {tuple(g.shape)}"
                raise ValueError(
                    f"{func}: the ZeRO-3 gradient partition of a parameter of shape "
                    f"{tuple(p.ds_shape)} (dtype {p.dtype}) is {got}, not "
                    f"{p.ds_tensor.numel()} elements; call add_penalty_grad_ between "
                    f"engine.backward(loss) and engine.step()")
            grads[key] = g
        entries = [params[plan.order[j]] for j in rows]
        targets = [grads[id(p)].narrow(0, 0, plan.local[j].numel()) for p, j in zip(entries, rows)]
        pieces = [plan.local[j].to(t.device, t.dtype) for t, j in zip(targets, rows)]
        # A tensor listed twice gets twice the gradient: runs without repeats, in order.
        for start, end in distributed.distinct_runs(entries):
            torch.ops.regext.penalty_grad_accumulate_(
                targets[start:end], pieces[start:end],
                distributed.select_rows(stats, rows[start:end]), l1, l2, l2_squared)
        for key, p in owners.items():
            safe_set_local_grad(p, grads[key])
    return total


def whole_shape(p) -> tuple:
    """The shape of the whole parameter: ds_shape for a ZeRO-3 placeholder."""
    status = p.__dict__.get("ds_status")
    if status is not None and getattr(status, "name", None) != "AVAILABLE":
        return tuple(p.ds_shape)
    return tuple(p.shape)


def zero_counts(tensors, *, func="sparsity"):
    """Exact zeros per tensor (ints) over whole ZeRO-3 parameters: counted on the
    real elements of the partitions, added across ranks (one all_reduce)."""
    plan = make_plan(func, tensors)
    local_counts = torch.ops.regext.count_zeros(plan.local)
    rows = torch.zeros((len(tensors), 2), dtype=torch.float64, device=local_counts.device)
    rows[:, 0] = local_counts  # exact in float64 below 2**53
    rows = distributed.unpermute_rows(plan, distributed.reduce_rows(plan, rows))
    return [int(c) for c in rows[:, 0].tolist()]
