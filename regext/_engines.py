"""Sharding engines whose parameters are not whole tensors: FSDP1 and DeepSpeed
ZeRO-3. regext is exact on plain tensors, DDP and FSDP2 (DTensors, see
regext.distributed); on these two engines ``model.parameters()`` can hold each
rank's piece of a parameter, or a placeholder, and a penalty over them would be a
silently wrong number (issue 21: 29.29 and 23.00 on two FSDP1 ranks for a true
51.56; 0.0 under ZeRO-3 for 17.00). This module recognizes such parameters before
anything is computed and raises an error that names the engine, the parameter and
what to do. Whole parameters of those engines pass:

* FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) marks the tensors it
  manages with ``_fsdp_flattened``. A ``FlatParameter`` (``use_orig_params=False``)
  concatenates several parameters (and padding): never one parameter, whole or not.
  With ``use_orig_params=True`` an original parameter is, while sharded, a 1-D view
  of this rank's piece (or a 0-element tensor); while unsharded (inside
  ``FSDP.summon_full_params`` or the forward) it has its own shape. So an
  original parameter with 2 or more dims is whole; a 0-element one is a piece; a
  1-D one is whole when it shares storage with a whole 2+-dim parameter of the same
  call (one FSDP unit is sharded or unsharded as a whole), and undecidable otherwise.
* DeepSpeed ZeRO-3 gives every parameter ``ds_status``: ``AVAILABLE`` inside
  ``deepspeed.zero.GatheredParameters`` (and the forward), when the tensor is whole;
  otherwise it is a 0-element placeholder and this rank's partition is ``ds_tensor``.
  Those partitions are computed on exactly, with one all_reduce, by regext._zero3
  where the engine's public API lets gradients reach them: ``add_penalty_grad_``
  (into ZeRO-3's gradient partitions, between ``engine.backward`` and
  ``engine.step``; every ZeRO-3 parameter of its list, gathered or not, goes that
  way), ``fused_penalty``'s value without autograd, and the sparsity counts. The
  callers say so with ``check_whole(..., zero3=...)`` and route with ``zero3_in``;
  autograd through placeholders, the prox operators, Penalty and the group lasso
  keep the error.

The checks run only when torch.distributed is initialized (both engines need it),
and cost a dict lookup per tensor then: the single-process path is unchanged.
"""

import torch

_FSDP1_WHAT_TO_DO = (
    "shard with FSDP2's fully_shard (regext is exact on its DTensors), or compute inside "
    "FSDP.summon_full_params(model) (whole parameters: exact; pass every parameter of a "
    "module, not only its 1-D ones)")
_ZERO3_WHAT_TO_DO = (
    "compute it inside deepspeed.zero.GatheredParameters(params) (whole parameters: "
    "exact), or use ZeRO stage 1 or 2 (whole parameters on every rank) or FSDP2's "
    "fully_shard")
_ZERO3_VALUE_ONLY = (
    "on ZeRO-3 partitions fused_penalty gives the value only (under torch.no_grad(), or "
    "with no tensor requiring grad): autograd cannot carry gradients of placeholders to "
    "the partitions. For the gradient call regext.add_penalty_grad_(model.parameters(), "
    "l1, l2) between engine.backward(loss) and engine.step() (exact, into ZeRO-3's "
    "gradient partitions); or ")


def zero3_in(items, partitioned_only=True) -> bool:
    """Whether `items` holds a DeepSpeed ZeRO-3 parameter (partitioned_only: one
    that is not gathered). One dict lookup per tensor; call it only when
    distributed_active()."""
    for p in items:
        status = p.__dict__.get("ds_status")
        if status is not None and not (
                partitioned_only and getattr(status, "name", None) == "AVAILABLE"):
            return True
    return False


def distributed_active() -> bool:
    """Whether a process group exists (else no engine can shard anything)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def check_whole(func, items, label_of, zero3=None):
    """Raises for an FSDP1 or ZeRO-3 tensor among `items` that is not a whole
    parameter (module docstring); `label_of(i)` names item i in the message.
    Call it only when distributed_active().

    `zero3` says what the caller does with ZeRO-3 partitions (regext._zero3):
    None, refuse them; "partitions" (add_penalty_grad_, sparsity), accept them;
    "value" (fused_penalty), accept them unless an autograd graph would be built
    (grad mode on and a tensor of the list requires grad)."""
    undecided = None
    for i, p in enumerate(items):
        attrs = p.__dict__
        if not attrs:
            continue  # the usual tensor: no engine attribute
        status = attrs.get("ds_status")
        if status is not None and getattr(status, "name", None) != "AVAILABLE":
            if zero3 == "value" and not (torch.is_grad_enabled()
                                         and any(t.requires_grad for t in items)):
                zero3 = "partitions"  # no autograd graph: the value alone is sound
            if zero3 == "partitions":
                continue
            raise ValueError(
                f"{func}: {label_of(i)} is a DeepSpeed ZeRO-3 parameter that is not gathered "
                f"(ds_status {getattr(status, 'name', status)}, shape {tuple(p.shape)}, dtype "
                f"{p.dtype}): it holds a placeholder and this rank's partition is in "
                f"ds_tensor, so its penalty would silently be wrong; "
                f"{_ZERO3_VALUE_ONLY if zero3 == 'value' else ''}{_ZERO3_WHAT_TO_DO}")
        if not attrs.get("_fsdp_flattened", False):
            continue
        if attrs.get("_is_flat_param", False):
            raise ValueError(
                f"{func}: {label_of(i)} is an FSDP1 FlatParameter (use_orig_params=False; "
                f"shape {tuple(p.shape)}, dtype {p.dtype}): several parameters flattened "
                f"together, sharded and padded, so per-parameter norms cannot be computed "
                f"from it; {_FSDP1_WHAT_TO_DO} (with use_orig_params=False, summon_full_params "
                f"gives the module's own parameters)")
        if p.dim() >= 2:
            if not _storage_holds(p):
                raise ValueError(
                    f"{func}: {label_of(i)} is an FSDP1 parameter (use_orig_params=True, shape "
                    f"{tuple(p.shape)}, dtype {p.dtype}) whose unsharded storage FSDP has freed "
                    f"(a view left from summon_full_params or the forward): its values are "
                    f"gone; {_FSDP1_WHAT_TO_DO}")
            continue
        if p.numel() == 0:
            raise ValueError(
                f"{func}: {label_of(i)} is an FSDP1 parameter with no elements on this rank "
                f"(use_orig_params=True, sharded: each rank holds a 1-D piece or nothing), "
                f"so the penalty would silently cover part of the model; {_FSDP1_WHAT_TO_DO}")
        if undecided is None:
            undecided = []
        undecided.append(i)
    if undecided:
        whole_storages = {items[i].untyped_storage().data_ptr() for i, p in enumerate(items)
                          if p.__dict__.get("_fsdp_flattened", False) and p.dim() >= 2}
        for i in undecided:
            if items[i].untyped_storage().data_ptr() not in whole_storages:
                p = items[i]
                raise ValueError(
                    f"{func}: {label_of(i)} is a 1-D FSDP1 parameter (use_orig_params=True, "
                    f"shape {tuple(p.shape)}, dtype {p.dtype}) whose unit has no 2+-dim "
                    f"parameter in this call, so regext cannot tell this rank's piece from "
                    f"the whole parameter; {_FSDP1_WHAT_TO_DO}")


def _storage_holds(p) -> bool:
    """Whether `p`'s storage is large enough for its elements: FSDP1 frees an
    unsharded parameter by resizing its storage to 0 bytes, and a view that kept its
    shape would then read freed memory."""
    if p.numel() == 0:
        return True
    last = p.storage_offset() + sum((n - 1) * abs(s) for n, s in zip(p.shape, p.stride()))
    return p.untyped_storage().nbytes() >= (last + 1) * p.element_size()
