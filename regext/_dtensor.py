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
