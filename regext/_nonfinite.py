"""error_if_nonfinite: a NaN or infinite penalty raises, naming the tensor.

Eager code reads the total on the host (one synchronization with a GPU) and raises
before anything else happens. Compiled code cannot branch on a tensor's value
(Dynamo calls that a data-dependent expression and refuses it under
``fullgraph=True``), so there the same check is an operator of the graph,
``regext_py::check_finite_penalty``: it raises the same RuntimeError when the compiled
step runs, and returns a zero that the caller adds to what must come after the
check (the total, or the coefficients of the gradients it is about to write), so
the graph can neither drop it nor move it later.
"""

from typing import List

import torch

from regext._dtensor import local_of
from regext._validation import label


def raise_if_nonfinite(func, total, params, l1, l2, l2_squared, names=None):
    """RuntimeError if `total` is NaN or inf, naming the first tensor whose norms are
    not finite. Reads `total` on the host: one synchronization with a GPU."""
    if bool(torch.isfinite(total)):
        return
    zero = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i, p in enumerate(params):
            local = local_of(p)
            if local.numel() == 0:
                continue
            _, stats = torch.ops.regext.penalty_forward([local], zero, zero, l2_squared)
            if not bool(torch.isfinite(stats).all()):
                kind = "NaN" if bool(torch.isnan(local).any()) else "inf"
                raise RuntimeError(
                    f"{func}: the penalty is {total.item()} because {label('params', i, names)} "
                    f"(shape {tuple(p.shape)}, dtype {p.dtype}) has a non-finite norm: it holds "
                    f"{kind} values or values whose sum of squares overflows")
    raise RuntimeError(
        f"{func}: the penalty is {total.item()} although every tensor's norms are finite: "
        f"l1 * sum of L1 norms + l2 * sum of L2 terms overflows the result dtype "
        f"{total.dtype} (l1={float(l1)}, l2={float(l2)})")


# In its own namespace: ``regext::`` holds the C++ kernels, each with CPU, CUDA and
# Meta kernels and an entry in tests/op_samples.py (tests/test_op_registry.py); this
# one is Python, device-agnostic, and only checks.
@torch.library.custom_op("regext_py::check_finite_penalty", mutates_args=())
def _check_finite_penalty(total: torch.Tensor, params: List[torch.Tensor], l1: torch.Tensor,
                          l2: torch.Tensor, l2_squared: bool, func: str,
                          names: str) -> torch.Tensor:
    # names: the parameters' names joined by newlines ("" for none): an operator
    # schema has no list of strings.
    raise_if_nonfinite(func, total, params, l1, l2, l2_squared,
                       names.split("\n") if names else None)
    return l1.new_zeros(())


@_check_finite_penalty.register_fake
def _(total, params, l1, l2, l2_squared, func, names):
    return l1.new_zeros(())


def check_in_graph(func, total, params, l1, l2, l2_squared, names=None):
    """A zero shaped like `l1` (0-dim, its dtype and device) that depends on the
    check: in eager code the check runs now (and None is returned); under
    torch.compile the operator is returned for the caller to add."""
    if not torch.compiler.is_compiling():
        raise_if_nonfinite(func, total, params, l1, l2, l2_squared, names)
        return None
    return torch.ops.regext_py.check_finite_penalty(
        total.detach(), [local_of(p).detach() for p in params], l1.detach(), l2.detach(),
        bool(l2_squared), func, "\n".join(names) if names is not None else "")


def checked_total(func, total, params, l1, l2, l2_squared, names=None):
    """`total`, after the check (eager: raised or passed; compiled: in the graph)."""
    zero = check_in_graph(func, total, params, l1, l2, l2_squared, names)
    return total if zero is None else total + zero.to(total.device, total.dtype)
