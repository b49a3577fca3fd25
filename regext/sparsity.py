"""Sparsity reports: exact zeros per tensor and overall, and the all-zero rows and
columns (neurons, filters, input channels that can be removed); fused passes per device."""

import math
from dataclasses import dataclass, field

import torch

from regext import _groups, distributed
from regext._dtensor import has_dtensor
from regext._engines import distributed_active, zero3_in
from regext._named import named_tensors
from regext._validation import indices_by_device


def _zero_counts(func, tensors):
    """Exact zeros per tensor (ints), over whole DTensors when there are any."""
    counts = [0] * len(tensors)
    if not tensors:
        return counts
    with torch.no_grad():
        if has_dtensor(tensors):
            return distributed.zero_counts_dtensor(tensors, func=func)
        if distributed_active() and zero3_in(tensors):
            from regext import _zero3  # DeepSpeed ZeRO-3 partitions: one all_reduce
            return _zero3.zero_counts(tensors, func=func)
        for rows in indices_by_device(tensors):
            got = torch.ops.regext.count_zeros([tensors[i] for i in rows]).tolist()
            for i, c in zip(rows, got):
                counts[i] = c
    return counts


def _zero_slices(tensors, kind):
    """Per tensor, the indices of its all-zero slices along dim 0 (kind "row") or 1
    ("column"): a tuple of ints, or None for tensors with fewer than 2 dims, for
    DTensors and for ZeRO-3 placeholders. A slice is all zero when its float64 sum of
    |x| is 0 (NaN is not zero)."""
    out = [None] * len(tensors)
    grouping = _groups.Grouping(kind)
    plain = [i for i, t in enumerate(tensors) if t.dim() >= 2 and not has_dtensor([t])]
    if not plain:
        return out
    zero = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for rows in indices_by_device([tensors[i] for i in plain]):
            subset = [tensors[plain[i]] for i in rows]
            _, stats = _groups.penalty_forward(subset, zero, zero, False, grouping)
            is_zero = (stats[:, 0] == 0).tolist()  # one copy to the host per device
            for i, first, n in zip(rows, grouping.first_rows(subset), grouping.counts(subset)):
                out[plain[i]] = tuple(j for j in range(n) if is_zero[first + j])
    return out


@dataclass(frozen=True)
class TensorSparsity:
    """Exact zeros of one tensor, and its all-zero rows and columns.

    ``zero_rows`` are the indices ``i`` with ``p[i]`` all zero (output neurons of a
    Linear, filters of a Conv), ``zero_columns`` those with ``p[:, j]`` all zero
    (input features, input channels); both None for tensors with fewer than 2
    dims, for DTensors and for DeepSpeed ZeRO-3 parameters that are not gathered.
    """
    name: str
    shape: tuple
    zeros: int
    numel: int
    zero_rows: tuple = None
    zero_columns: tuple = None

    @property
    def fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Exact zeros over a list of tensors and per tensor.

    ``fraction`` is the overall fraction of exactly-zero elements; ``per_tensor``
    lists a :class:`TensorSparsity` (``name``, ``shape``, ``zeros``, ``numel``,
    ``fraction``) per tensor, in input order; ``as_dict()`` maps names to
    fractions; ``str(report)`` is a printable table.
    """
    zeros: int
    numel: int
    per_tensor: tuple = field(default=())

    @property
    def fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def as_dict(self) -> dict:
        return {t.name: t.fraction for t in self.per_tensor}

    def __str__(self) -> str:
        width = max([len("tensor")] + [len(t.name) for t in self.per_tensor])
        lines = [f"{'tensor':<{width}}  {'shape':>18}  {'zeros':>12}  {'numel':>12}  zero %"
                 f"  {'zero rows':>11}  {'zero cols':>11}"]

        def slices(found, dim, shape):
            return "" if found is None else f"{len(found)}/{shape[dim]}"
        for t in self.per_tensor:
            lines.append(f"{t.name:<{width}}  {str(tuple(t.shape)):>18}  {t.zeros:>12}  "
                         f"{t.numel:>12}  {100 * t.fraction:6.2f}  "
                         f"{slices(t.zero_rows, 0, t.shape):>11}  "
                         f"{slices(t.zero_columns, 1, t.shape):>11}")
        lines.append(f"{'total':<{width}}  {'':>18}  {self.zeros:>12}  {self.numel:>12}  "
                     f"{100 * self.fraction:6.2f}")
        return "\n".join(lines)


def sparsity_report(params) -> SparsityReport:
    """Counts exact zeros (+0 and -0; NaN is not zero) per tensor and overall, and
    finds each tensor's all-zero rows and columns: what structured pruning (group
    lasso with ``group="row"`` / ``"column"``) makes removable.

    Args:
        params: an ``nn.Module`` (its named parameters), an iterable of
            ``(name, tensor)`` pairs such as ``model.named_parameters()``, or an
            iterable of tensors (named ``"0"``, ``"1"``, ...). A tensor listed
            twice counts twice.

    Returns:
        A :class:`SparsityReport`. Three fused passes per device (counts, row sums,
        column sums) and one device-to-host copy after each.
    """
    return _report("sparsity_report", params, slices=True)


def _report(func, params, slices=False) -> SparsityReport:
    named = named_tensors(func, params, zero3="partitions")
    tensors = [p for _, p in named]
    counts = _zero_counts(func, tensors)
    rows = _zero_slices(tensors, "row") if slices else [None] * len(tensors)
    columns = _zero_slices(tensors, "column") if slices else [None] * len(tensors)
    shapes = [tuple(p.shape) for p in tensors]
    if distributed_active() and zero3_in(tensors):
        from regext import _zero3  # the placeholders' shapes are (0,)
        shapes = [_zero3.whole_shape(p) for p in tensors]
    per_tensor = tuple(TensorSparsity(name, shape, c, math.prod(shape), r, k)
                       for (name, _), shape, c, r, k in zip(named, shapes, counts, rows,
                                                             columns))
    return SparsityReport(zeros=sum(counts), numel=sum(t.numel for t in per_tensor),
                          per_tensor=per_tensor)


def sparsity(params) -> float:
    """The fraction of exactly-zero elements over all tensors, a float in [0, 1].

    ``params`` as in :func:`sparsity_report` (which also gives the per-tensor
    breakdown). 0.0 when there are no elements at all.
    """
    return _report("sparsity", params).fraction
