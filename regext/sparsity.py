"""Sparsity reports: exact zeros per tensor and overall, one fused counting pass per device."""

from dataclasses import dataclass, field

import torch

from regext import distributed
from regext._dtensor import has_dtensor
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
        for rows in indices_by_device(tensors):
            got = torch.ops.regext.count_zeros([tensors[i] for i in rows]).tolist()
            for i, c in zip(rows, got):
                counts[i] = c
    return counts


@dataclass(frozen=True)
class TensorSparsity:
    """Exact zeros of one tensor."""
    name: str
    shape: tuple
    zeros: int
    numel: int

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
        lines = [f"{'tensor':<{width}}  {'shape':>18}  {'zeros':>12}  {'numel':>12}  zero %"]
        for t in self.per_tensor:
            lines.append(f"{t.name:<{width}}  {str(tuple(t.shape)):>18}  {t.zeros:>12}  "
                         f"{t.numel:>12}  {100 * t.fraction:6.2f}")
        lines.append(f"{'total':<{width}}  {'':>18}  {self.zeros:>12}  {self.numel:>12}  "
                     f"{100 * self.fraction:6.2f}")
        return "\n".join(lines)


def sparsity_report(params) -> SparsityReport:
    """Counts exact zeros (+0 and -0; NaN is not zero) per tensor and overall.

    Args:
        params: an ``nn.Module`` (its named parameters), an iterable of
            ``(name, tensor)`` pairs such as ``model.named_parameters()``, or an
            iterable of tensors (named ``"0"``, ``"1"``, ...). A tensor listed
            twice counts twice.

    Returns:
        A :class:`SparsityReport`. One fused counting pass per device and one
        device-to-host copy of the counts.
    """
    return _report("sparsity_report", params)


def _report(func, params) -> SparsityReport:
    named = named_tensors(func, params)
    counts = _zero_counts(func, [p for _, p in named])
    per_tensor = tuple(TensorSparsity(name, tuple(p.shape), c, p.numel())
                       for (name, p), c in zip(named, counts))
    return SparsityReport(zeros=sum(counts), numel=sum(t.numel for t in per_tensor),
                          per_tensor=per_tensor)


def sparsity(params) -> float:
    """The fraction of exactly-zero elements over all tensors, a float in [0, 1].

    ``params`` as in :func:`sparsity_report` (which also gives the per-tensor
    breakdown). 0.0 when there are no elements at all.
    """
    return _report("sparsity", params).fraction
