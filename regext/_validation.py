"""Argument checks for the public API, run before anything is computed.

Errors name the argument, the tensor (its position in the list, or its parameter
name where the caller knows it) and the offending type, dtype or device, so a bad
entry in a 500-tensor list is found at once. Nothing is read or written until
every check has passed.
"""

import math
import numbers

import torch

from regext._dtensor import has_dtensor
from regext._engines import check_whole, distributed_active

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SUPPORTED_SET = frozenset(SUPPORTED_DTYPES)


def label(arg, i, names=None):
    """How an error names element i: its parameter name if known, else arg[i]."""
    return names[i] if names is not None else f"{arg}[{i}]"


def coefficient(func: str, name: str, value):
    """A coefficient or threshold as the operators take it: a 0-dim tensor.

    A Python number must be finite and >= 0 (ValueError); it becomes a 0-dim
    float64 CPU tensor. A tensor must be 0-dim and real floating point (TypeError)
    and is passed as it is, on the CPU or on the parameters' device; its value is
    not read here, which would synchronize with a GPU and break a compiled graph.
    The operators check a CPU tensor's value when they run; a value on the GPU is
    used as it is (see regext.fused_penalty).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype not in _SUPPORTED_SET:
            raise TypeError(f"{func}: {name} must be a number or a 0-dim floating-point "
                            f"tensor, got a tensor of shape {tuple(value.shape)} and dtype "
                            f"{value.dtype}")
        return value
    if torch.compiler.is_compiling():
        # Under torch.compile a float argument may be traced as a variable: made a
        # tensor by arithmetic it stays one (a new value reuses the graph, where
        # torch.scalar_tensor would specialize on it), and the operators check its
        # value when the compiled step runs.
        return torch.zeros((), dtype=torch.float64) + value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{func}: {name} must be a finite number >= 0 or a 0-dim tensor, "
                         f"got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{func}: {name} must be a finite number >= 0, got {value!r}")
    return torch.scalar_tensor(value, dtype=torch.float64)


def check_coefficient(func: str, name: str, value) -> float:
    """A Python number that must be finite and >= 0 (a learning rate); returns a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{func}: {name} must be a finite number >= 0, "
                         f"got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{func}: {name} must be a finite number >= 0, got {value!r}")
    return value


def materialize_params(func: str, params, arg: str = "params", names=None, *,
                       zero3=None) -> list:
    """Turns any iterable of tensors (generators included) into a checked list."""
    return materialize_params_and_device(func, params, arg, names, zero3=zero3)[0]


def materialize_params_and_device(func: str, params, arg: str = "params", names=None, *,
                                  zero3=None):
    """(checked list, whether every tensor is on the first one's device).

    One pass with the cheapest tests that accept a good tensor (it runs on every
    training step, ~0.2 us per tensor); an element that fails any of them is
    diagnosed by ``_raise_bad_element`` with the full message. `names`, when given,
    name the elements in errors. `zero3`: which DeepSpeed ZeRO-3 partitions the
    caller computes on (regext._engines.check_whole; None: refused).
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
            _raise_bad_element(func, label(arg, i, names), p)
        if same_device and p.device != device:
            same_device = False
    if not same_device:
        _check_meta_not_mixed(func, arg, items, names)
    if distributed_active():
        check_whole(func, items, lambda i: label(arg, i, names), zero3)
    return items, same_device


def _raise_bad_element(func, what, p):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{func}: {what} is a {type(p).__name__}, not a Tensor")
    if p.is_nested:
        raise TypeError(f"{func}: {what} is a nested tensor (dtype {p.dtype}, "
                        f"device {p.device}); only strided tensors are supported")
    if p.layout != torch.strided:
        raise TypeError(f"{func}: {what} has layout {p.layout} (dtype {p.dtype}, "
                        f"device {p.device}); only strided tensors are supported")
    raise TypeError(f"{func}: {what} has dtype {p.dtype} (device {p.device}); "
                    f"expected a real floating-point dtype "
                    f"(float16, bfloat16, float32 or float64)")


def _check_meta_not_mixed(func, arg, items, names):
    """Meta tensors (no data) cannot be summed with real ones: say so before any work.

    Checked here, not when the per-device results are summed: by then the real
    tensors would have been reduced already. Lists with DTensors are left to
    regext.distributed, which requires all local tensors on one device.
    """
    mixed = next((i for i, p in enumerate(items) if p.is_meta != items[0].is_meta), None)
    if mixed is None or has_dtensor(items):
        return
    p = items[mixed]
    raise TypeError(f"{func}: {label(arg, mixed, names)} is on {p.device} (dtype {p.dtype}) "
                    f"but {label(arg, 0, names)} is on {items[0].device}; meta tensors have "
                    f"no data and cannot be mixed with real ones")


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


def check_writable(func, params, names=None):
    """Every tensor can be updated in place: none has overlapping memory."""
    for i, p in enumerate(params):
        if not p.is_contiguous():
            check_no_self_overlap(func, label("params", i, names), p)
