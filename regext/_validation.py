"""Argument checks for the public API, run before anything is computed.

Errors name the argument, the position in the parameter list, and the
offending type, dtype or device, so a bad entry in a 500-tensor list is found
at once. Nothing is read or written until every check has passed.
"""

import math
import numbers

import torch

from regext._dtensor import has_dtensor

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
    return materialize_params_and_device(func, params, arg)[0]


def materialize_params_and_device(func: str, params, arg: str = "params"):
    """(checked list, whether every tensor is on the first one's device).

    One pass with the cheapest tests that accept a good tensor (it runs on every
    training step, ~0.2 us per tensor); an element that fails any of them is
    diagnosed by ``_raise_bad_element`` with the full message.
    """
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{func}: {arg} must be an iterable of tensors (e.g. "
                        f"model.parameters()), got a single Tensor; wrap it in a list")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"{func}: {arg} must be an iterable of tensors, "
                        f"got {type(params).__name__}") from None
    if not items:
        return items, True
    tensor, strided, supported = torch.Tensor, torch.strided, _SUPPORTED_SET
    device = items[0].device if isinstance(items[0], tensor) else None
    same_device = True
    for i, p in enumerate(items):
        if (not isinstance(p, tensor) or p.dtype not in supported
                or p.layout is not strided or p.is_nested):
            _raise_bad_element(func, arg, i, p)
        if same_device and p.device != device:
            same_device = False
    if not same_device:
        _check_meta_not_mixed(func, arg, items)
    return items, same_device


_SUPPORTED_SET = frozenset(SUPPORTED_DTYPES)


def _raise_bad_element(func, arg, i, p):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{func}: {arg}[{i}] is a {type(p).__name__}, not a Tensor")
    if p.is_nested:
        raise TypeError(f"{func}: {arg}[{i}] is a nested tensor (dtype {p.dtype}, "
                        f"device {p.device}); only strided tensors are supported")
    if p.layout != torch.strided:
        raise TypeError(f"{func}: {arg}[{i}] has layout {p.layout} (dtype {p.dtype}, "
                        f"device {p.device}); only strided tensors are supported")
    raise TypeError(f"{func}: {arg}[{i}] has dtype {p.dtype} (device {p.device}); "
                    f"expected a real floating-point dtype "
                    f"(float16, bfloat16, float32 or float64)")


def _check_meta_not_mixed(func, arg, items):
    """Meta tensors (no data) cannot be summed with real ones: say so before any work.

    Checked here, not when the per-device results are summed: by then the real
    tensors would have been reduced already. Lists with DTensors are left to
    regext.distributed, which requires all local tensors on one device.
    """
    mixed = next((i for i, p in enumerate(items) if p.is_meta != items[0].is_meta), None)
    if mixed is None:
        return
    if has_dtensor(items):
        return
    p = items[mixed]
    raise TypeError(f"{func}: {arg}[{mixed}] is on {p.device} (dtype {p.dtype}) but "
                    f"{arg}[0] is on {items[0].device}; meta tensors have no data and cannot "
                    f"be mixed with real ones")


def indices_by_device(params):
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


def check_no_self_overlap(func, what, t):
    """An in-place update needs each element to own its memory (no stride-0 dims)."""
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        raise ValueError(f"{func}: {what} has overlapping memory (an expanded tensor, shape "
                         f"{tuple(t.shape)}, stride {t.stride()}); it cannot be updated in place")


def _check_writable(func, params):
    for i, p in enumerate(params):
        if not p.is_contiguous():
            _check_no_self_overlap(func, f"params[{i}]", p)


def check_writable(func, params):
    """Every tensor can be updated in place: none has overlapping memory."""
    for i, p in enumerate(params):
        if not p.is_contiguous():
            check_no_self_overlap(func, f"params[{i}]", p)
