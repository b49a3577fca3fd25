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


def distributed_active() -> bool:
    """Whether a process group exists (else no engine can shard anything)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def check_whole(func, items, label_of):
    """Raises for an FSDP1 or ZeRO-3 tensor among `items` that is not a whole
    parameter (module docstring); `label_of(i)` names item i in the message.
    Call it only when distributed_active()."""
    undecided = None
    for i, p in enumerate(items):
        attrs = p.__dict__
        if not attrs:
            continue  # the usual tensor: no engine attribute
        status = attrs.get("ds_status")
        if status is not None and getattr(status, "name", None) != "AVAILABLE":
            raise ValueError(
                f"{func}: {label_of(i)} is a DeepSpeed ZeRO-3 parameter that is not gathered "
                f"(ds_status {getattr(status, 'name', status)}, shape {tuple(p.shape)}, dtype "
                f"{p.dtype}): it holds a placeholder and this rank's partition is in "
                f"ds_tensor, so its penalty would silently be wrong; {_ZERO3_WHAT_TO_DO}")
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
