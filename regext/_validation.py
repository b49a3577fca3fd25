"""Argument checks for the public API, run before anything is computed.

Errors name the argument, the position in the parameter list, and the
offending type, dtype or device, so a bad entry in a 500-tensor list is found
at once. Nothing is read or written until every check has passed.
"""

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_coefficient(func: str, name: str, value) -> float:
    """A penalty coefficient must be a finite real number >= 0; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{func}: {name} must be a finite number >= 0, "
                         f"got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{func}: {name} must be a finite number >= 0, got {value!r}")
    return value


def materialize_params(func: str, params, arg: str = "params") -> list:
    """Turns any iterable of tensors (generators included) into a checked list."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{func}: {arg} must be an iterable of tensors (e.g. "
                        f"model.parameters()), got a single Tensor; wrap it in a list")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"{func}: {arg} must be an iterable of tensors, "
                        f"got {type(params).__name__}") from None
    for i, p in enumerate(items):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{func}: {arg}[{i}] is a {type(p).__name__}, not a Tensor")
        if p.is_nested:
            raise TypeError(f"{func}: {arg}[{i}] is a nested tensor (dtype {p.dtype}, "
                            f"device {p.device}); only strided tensors are supported")
        if p.layout != torch.strided:
            raise TypeError(f"{func}: {arg}[{i}] has layout {p.layout} (dtype {p.dtype}, "
                            f"device {p.device}); only strided tensors are supported")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{func}: {arg}[{i}] has dtype {p.dtype} (device {p.device}); "
                            f"expected a real floating-point dtype "
                            f"(float16, bfloat16, float32 or float64)")
    _check_meta_not_mixed(func, arg, items)
    return items


def _check_meta_not_mixed(func, arg, items):
    """Meta tensors (no data) cannot be summed with real ones: say so before any work.

    Checked here, not when the per-device results are summed: by then the real
    tensors would have been reduced already. Lists with DTensors are left to
    regext.distributed, which requires all local tensors on one device.
    """
    mixed = next((i for i, p in enumerate(items) if p.is_meta != items[0].is_meta), None)
    if mixed is None:
        return
    from regext.distributed import has_dtensor  # lazy: it imports this module
    if has_dtensor(items):
        return
    p = items[mixed]
    raise TypeError(f"{func}: {arg}[{mixed}] is on {p.device} (dtype {p.dtype}) but "
                    f"{arg}[0] is on {items[0].device}; meta tensors have no data and cannot "
                    f"be mixed with real ones")
