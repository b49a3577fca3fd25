"""DTensor detection and local-shard access, without importing torch.distributed.

No DTensor can exist before ``torch.distributed.tensor`` is imported, so these
cost nothing (and import nothing) for users who never touch torch.distributed.
"""

import sys


def dtensor_type():
    """DTensor's class if torch.distributed.tensor was imported, else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(p) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(p, dtensor)


def has_dtensor(params) -> bool:
    """True if any element of the (materialized) list is a DTensor."""
    dtensor = dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


def local_of(p):
    """A DTensor's local tensor (this rank's shard); any other tensor itself."""
    return p.to_local() if is_dtensor(p) else p


def functorch_error(func):
    """The error for DTensors under a torch.func transform, which regext does not support
    (their local shards and the all_reduce of the penalty's sums are not batchable)."""
    return NotImplementedError(
        f"{func}: DTensor (FSDP2 / tensor-parallel) parameters are not supported under "
        f"torch.func transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap); use "
        f"torch.autograd (loss.backward()) for them")
