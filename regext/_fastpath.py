"""The per-call fast path of the common case (issue 24): one device, plain tensors,
numbers or tensors as coefficients, no compile, no torch.func, no process group.

On a small model regext's time is its fixed cost per call, not its kernels'. The
fast path keeps the general path's checks of every tensor (in Python, with their
messages, before any operator runs: the hostile-input tests assert that no regext
operator starts on a bad list) and drops what is not needed in the common case:
new coefficient tensors for numbers at every call (cached here), the Python
wrapper of ``torch.autograd.Function.apply`` and its per-argument generator
(~0.3 us per tensor; ``apply_function``), the autograd Function itself when grad
mode is off, and the per-gradient planning of ``add_penalty_grad_`` when every
``.grad`` exists. What the operators still refuse (a negative coefficient tensor,
a freed storage, a bad ``.grad``) they refuse before reading or writing anything;
the general path then runs on the same list and raises its own message.
"""

import math

import torch

from regext._engines import distributed_active
from regext._validation import materialize_params_and_device

# Errors the operators (or the dispatcher parsing a list) raise for input the
# general path must look at.
REFUSED = (TypeError, ValueError, RuntimeError, NotImplementedError, IndexError)

_COEFFICIENTS = {}
_MAX_CACHED = 256


def number_coefficient(value):
    """A valid Python number as a cached 0-dim float64 CPU tensor (the operators read
    it and never write it; nothing else sees it), a tensor as it is, or None: the
    general path decides (bool, NaN, negative, other types)."""
    kind = type(value)
    if kind is torch.Tensor:
        return value
    if kind is not float and kind is not int:
        return None
    cached = _COEFFICIENTS.get(value)
    if cached is None:
        if not (0.0 <= value < math.inf):
            return None
        if len(_COEFFICIENTS) >= _MAX_CACHED:  # a schedule's many values: keep it bounded
            _COEFFICIENTS.clear()
        cached = _COEFFICIENTS[value] = torch.scalar_tensor(float(value), dtype=torch.float64)
    return cached


def checked_list_and_coefficients(func, params, l1, l2):
    """(checked list, l1, l2 tensors) for the fast path, or (what `params` yielded,
    None, None) when the general path must run: a coefficient it must judge, an
    empty list, tensors on several devices. The list is checked with the general
    path's checks and messages (regext._validation), before any operator runs."""
    l1t, l2t = number_coefficient(l1), number_coefficient(l2)
    if l1t is None or l2t is None:
        return params, None, None
    ps, same_device = materialize_params_and_device(func, params)
    if not ps or not same_device:
        return ps, None, None
    return ps, l1t, l2t


def open_now():
    """Whether the fast path may run: not while torch.compile traces (coefficients
    are traced values there), not under torch.func or forward-mode AD (their own
    autograd Functions), not in a process group (FSDP1 / ZeRO-3 checks, DTensors)."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
                or distributed_active())


_C_APPLY = torch._C._FunctionBase.__dict__["apply"]
# The overloads themselves: calling the packet (torch.ops.regext.x) first resolves
# the overload in Python, about 0.6 us per call.
FORWARD = torch.ops.regext.penalty_forward.default
_ACCUMULATE = torch.ops.regext.penalty_forward_accumulate_.default
_UNWRAP = torch._C._functorch.unwrap_if_dead


def apply_function(function, leading, tensors):
    """``function.apply(*leading, *tensors)`` without the Python wrapper's
    per-argument generator: the same C entry point, after the same unwrapping of dead
    torch.func wrappers (map over a C function; `leading` are the coefficient tensors
    and flags, never wrapped). Only for Functions without setup_context, with no
    torch.func transform active (open_now). A non-tensor in `tensors` raises
    TypeError (REFUSED)."""
    return _C_APPLY.__get__(None, function)(*leading, *map(_UNWRAP, tensors))


def existing_grads(params):
    """[p.grad for p in params] when every tensor requires grad and has a .grad (the
    usual training step), else None (the general path plans creation and skips)."""
    grads = [p.grad if p.requires_grad else None for p in params]
    for g in grads:
        if g is None:
            return None
    return grads


def accumulate_penalty_grad(params, grads, l1, l2, l2_squared):
    """``grads += d(penalty)/d(params)`` with the per-tensor penalty, one operator call
    (it checks every tensor and gradient before writing any); the value, or None if
    the operator refused the input (nothing was written then)."""
    try:
        return _ACCUMULATE(grads, params, l1, l2, l2_squared)[0]
    except REFUSED:
        return None
