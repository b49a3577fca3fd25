"""Groups of the group lasso: which slices of a tensor share one Euclidean norm.

``group="tensor"`` (one group per tensor: the original loop's ``torch.norm(p, 2)``),
``"row"`` (slices along dim 0: a Linear's output neurons, a Conv's filters) or
``"column"`` (slices along dim 1: a Linear's input features, a Conv's input
channels). A tensor with fewer than 2 dims is one group whatever ``group`` says.
``group_weight="sqrt_size"`` weights each group's norm by the square root of its
number of elements (Yuan & Lin 2006; torchao's ``ProxGroupLasso``), else by 1.

The kernels (csrc/groups.h) place the groups of a list in list order as rows of
their ``stats``; this module counts them the same way.
"""

import dataclasses
import math

import torch

GROUP_DIMS = {"tensor": -1, "row": 0, "column": 1}
GROUP_WEIGHTS = (None, "sqrt_size")


@dataclasses.dataclass(frozen=True)
class Grouping:
    """How every tensor of one call is grouped."""
    kind: str = "tensor"
    sqrt_size: bool = False

    @property
    def dim(self):
        return GROUP_DIMS[self.kind]

    @property
    def per_tensor(self):
        """Whether this is the plain per-tensor penalty (the per-tensor operators)."""
        return self.kind == "tensor" and not self.sqrt_size

    def dims(self, params):
        """The operators' group_dims argument for `params`."""
        return [self.dim] * len(params)

    def counts(self, params):
        """The number of groups of each tensor (its stats rows)."""
        return [count_groups(p, self.dim) for p in params]

    def first_rows(self, params):
        """The stats row of each tensor's group 0, for groups placed in list order."""
        rows, row = [], 0
        for n in self.counts(params):
            rows.append(row)
            row += n
        return rows

    def weights(self, params):
        """float64 [number of groups]: each group's weight w_g, in stats-row order."""
        ws = []
        for p, n in zip(params, self.counts(params)):
            size = p.numel() // n if n else 0
            ws.extend([math.sqrt(size) if self.sqrt_size else 1.0] * n)
        return torch.tensor(ws, dtype=torch.float64)

    def rows_of(self, x):
        """`x` as a 2-D [groups, elements per group] tensor (a copy when needed)."""
        if self.dim < 0 or x.dim() < 2:
            return x.reshape(1, -1)
        n = x.shape[self.dim]
        return x.movedim(self.dim, 0).reshape(n, x.numel() // n if n else 0)

    def from_rows(self, rows, like):
        """The inverse of rows_of: `rows` back in the shape of `like`."""
        if self.dim < 0 or like.dim() < 2:
            return rows.reshape(like.shape)
        return rows.reshape(like.movedim(self.dim, 0).shape).movedim(0, self.dim)


def count_groups(p, dim):
    return 1 if dim < 0 or p.dim() < 2 else p.shape[dim]


def grouping(func, group, group_weight, l2_squared=False):
    """The Grouping for a public call's ``group=`` and ``group_weight=``, checked."""
    if not isinstance(group, str) or group not in GROUP_DIMS:
        raise ValueError(f"{func}: group must be one of {tuple(GROUP_DIMS)}, got {group!r}")
    if group_weight not in GROUP_WEIGHTS:
        raise ValueError(f"{func}: group_weight must be None or 'sqrt_size', got {group_weight!r}")
    g = Grouping(group, group_weight == "sqrt_size")
    if l2_squared and not g.per_tensor:
        raise ValueError(
            f"{func}: group={group!r}, group_weight={group_weight!r} needs the Euclidean norm; "
            f"with l2_squared=True the squared norms of the groups add up to the tensor's "
            f"(use group='tensor')")
    return g


PER_TENSOR = Grouping()


def penalty_forward(params, l1, l2, l2_squared, grouping=PER_TENSOR):
    """(total, stats) from the per-tensor or the group operator."""
    if grouping.per_tensor:
        return torch.ops.regext.penalty_forward(params, l1, l2, l2_squared)
    return torch.ops.regext.group_penalty_forward(params, grouping.dims(params), l1, l2,
                                                  grouping.sqrt_size)


def penalty_backward(grad_total, params, stats, l1, l2, l2_squared, rows=None,
                     grouping=PER_TENSOR):
    """Gradients of `params`, which are the forward list's entries `rows` (None: all).
    For groups, `rows` holds each tensor's first stats row instead."""
    if grouping.per_tensor:
        return torch.ops.regext.penalty_backward(grad_total, params, stats, l1, l2, l2_squared,
                                                 rows)
    return torch.ops.regext.group_penalty_backward(grad_total, params, grouping.dims(params),
                                                   stats, l1, l2, grouping.sqrt_size, rows)


def penalty_grad_accumulate_(grads, params, stats, l1, l2, l2_squared, rows=None,
                             grouping=PER_TENSOR):
    """grads += gradients, with `rows` as in penalty_backward."""
    if grouping.per_tensor:
        torch.ops.regext.penalty_grad_accumulate_(grads, params, stats, l1, l2, l2_squared, rows)
        return
    torch.ops.regext.group_penalty_grad_accumulate_(grads, params, grouping.dims(params), stats,
                                                    l1, l2, grouping.sqrt_size, rows)


def stats_rows(grouping, all_params, indices):
    """The `rows` argument for the entries `indices` of the forward's list `all_params`
    (None when they are all of it, in order)."""
    if indices is None or len(indices) == len(all_params):
        return None
    if grouping.per_tensor:
        return list(indices)
    first = grouping.first_rows(all_params)
    return [first[i] for i in indices]
