"""One entry per regext operator: sample arguments, the arguments it writes, and a
reference from torch ops in float64.

test_op_registry.py checks that the table names every operator and that its
`mutated` positions are the schema's `(a!)` arguments; the opcheck, meta, compile,
thread, CUDA and emulated-CUDA tests iterate it. Adding an operator means adding
its entry here (csrc/schemas.h lists the other places).
"""

from dataclasses import dataclass
from typing import Callable

import torch

from regext.reference import (count_zeros_reference, group_rows_reference,
                              prox_group_l2_reference, prox_group_lasso_reference,
                              prox_group_metric_reference,
                              prox_l1_reference, prox_metric_reference)

from conftest import scalar

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def sample_params(gen, device, dtype):
    """Sizes across the 256-element blocks and a chunk boundary, a zero-size tensor,
    exact zeros, and a transposed (dense, non-contiguous) tensor."""
    ps = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in
          [(4, 5), (3,), (0,), (2, 3, 4), (300,), (32769,)]]
    ps[4][::5] = 0.0
    ps.append(torch.randn(6, 4, generator=gen, dtype=torch.float64).t())
    return [p.to(dtype=dtype, device=device) for p in ps]


def _grads_like(params, gen):
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)
            for p in params]


def _stats(params):
    return torch.ops.regext.penalty_forward(params, scalar(0.0), scalar(0.0), False)[1]


# Coefficients: CPU tensors of several dtypes, and tensors on the parameters' device.
L1, L2 = scalar(0.1), torch.tensor(0.2, dtype=torch.float32)


def forward_samples(gen, device):
    return [(sample_params(gen, device, dtype), L1, L2.to(device), squared)
            for dtype in DTYPES for squared in (False, True)]


def backward_samples(gen, device):
    out = []
    for dtype in DTYPES:
        params = sample_params(gen, device, dtype)
        stats = _stats(params)
        grad_total = torch.tensor(1.5, device=device)
        out.append((grad_total, params, stats, L1, L2, False))
        out.append((grad_total, params, stats, L1.to(device), L2, True))
        # A subset, told its stats rows: a tensor listed twice.
        out.append((grad_total, [params[6], params[0], params[6]], stats, L1, L2, False,
                    [6, 0, 6]))
    return out


def grad_accumulate_samples(gen, device):
    out = []
    for dtype in DTYPES:
        params = sample_params(gen, device, dtype)
        stats = _stats(params)
        out.append((_grads_like(params, gen), params, stats, L1, L2, False))
        out.append((_grads_like(params, gen), params, stats, L1, L2.to(device), True, None))
    return out


def forward_accumulate_samples(gen, device):
    return [(_grads_like(params, gen), params, L1, L2, squared)
            for dtype in DTYPES for params in [sample_params(gen, device, dtype)]
            for squared in (False, True)]


def prox_samples(gen, device):
    return [(sample_params(gen, device, dtype), threshold)
            for dtype in DTYPES
            for threshold in (scalar(0.0), torch.tensor(0.3, dtype=torch.bfloat16).to(device))]


def metric_samples(gen, device):
    """Second moments (with exact zeros: a threshold of l1_step / eps) laid out
    contiguously, so the transposed parameter's are staged; means of centered
    RMSprop; rows with both steps, one only, eps = 0 and none (left untouched)."""
    out = []
    for dtype in DTYPES:
        params = sample_params(gen, device, dtype)
        moments = [(1e-3 * torch.rand(p.shape, generator=gen, dtype=torch.float64)).to(dtype)
                   .contiguous().to(device) for p in params]
        moments[4][::3] = 0.0
        means = [(0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(dtype)
                 .to(device) for p in params]
        rows = [[0.01, 0.0, 1.5, 1e-8], [0.01, 0.02, 1.0, 1e-3], [0.0, 0.0, 1.0, 1e-8],
                [0.002, 0.0, 1.0, 0.0], [1e-4, 0.0, 30.0, 1e-8], [0.0, 0.05, 1.0, 1e-8],
                [0.03, 0.01, 2.0, 1e-2]]
        coefs = torch.tensor(rows, dtype=torch.float64, device=device)
        out.append((params, moments, [], coefs))
        out.append((params, moments, means, coefs))
    return out


def count_samples(gen, device):
    return [(sample_params(gen, device, dtype),) for dtype in DTYPES]


# ---- references: float64 torch ops, cast to the kernels' output dtypes ----------

def _ref_stats(params):
    return torch.tensor([[p.double().abs().sum().item(), p.double().pow(2).sum().item()]
                         for p in params], dtype=torch.float64).reshape(len(params), 2)


def _ref_total(params, stats, l1, l2, squared):
    l1, l2 = float(l1), float(l2)
    l2_terms = stats[:, 1] if squared else stats[:, 1].sqrt()
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return (l1 * stats[:, 0].sum() + l2 * l2_terms.sum()).to(dtype)


def _ref_grad(grad_total, x, sum_sq, l1, l2, squared):
    x64 = x.double()
    l1, l2 = float(l1), float(l2)
    if squared:
        linear = 2.0 * x64
    else:
        norm = float(sum_sq) ** 0.5
        linear = x64 / norm if norm != 0 else torch.zeros_like(x64)
    return (float(grad_total) * (l1 * x64.sign() + l2 * linear)).to(x.dtype)


def ref_forward(params, l1, l2, squared):
    stats = _ref_stats(params)
    return _ref_total(params, stats, l1, l2, squared).to(params[0].device), stats.to(
        params[0].device)


def ref_backward(grad_total, params, stats, l1, l2, squared, rows=None):
    rows = list(range(len(params))) if rows is None else rows
    return [_ref_grad(grad_total, p, stats[r, 1], l1, l2, squared) for p, r in zip(params, rows)]


def ref_grad_accumulate_(grads, params, stats, l1, l2, squared, rows=None):
    for g, d in zip(grads, ref_backward(1.0, params, stats, l1, l2, squared, rows)):
        g.copy_((g.double() + d.double()).to(g.dtype))


def ref_forward_accumulate_(grads, params, l1, l2, squared):
    total, stats = ref_forward(params, l1, l2, squared)
    ref_grad_accumulate_(grads, params, stats, l1, l2, squared)
    return total, stats


# ---- the group lasso -------------------------------------------------------------

def group_sample_params(gen, device, dtype, large=True):
    """sample_params plus the group layouts of csrc/groups.h: a conv weight, rows
    longer than a chunk (pieces), long column runs (3, 2, 300), columns over several
    position blocks (200, 600), a zero-size 2-D tensor. large=False: without the
    (2, 33000) and (200, 600) tensors and with short column runs (3, 2, 30), for the
    CUDA emulator (emulated_group_metric_samples)."""
    shapes = ([(8, 3, 3, 3), (2, 33000), (3, 2, 300), (200, 600), (5, 0)] if large else
              [(8, 3, 3, 3), (3, 2, 30), (5, 0)])
    extra = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
    extra[0][2] = 0.0         # an all-zero filter (row group)
    if large:
        extra[3][:, 7] = 0.0  # an all-zero column
    return sample_params(gen, device, dtype) + [p.to(dtype=dtype, device=device) for p in extra]


def group_dims_for(params, shift):
    """Rows, columns and whole tensors, mixed in one list."""
    return [(-1, 0, 1)[(i + shift) % 3] for i in range(len(params))]


def _group_stats(params, dims):
    return torch.ops.regext.group_penalty_forward(params, dims, scalar(0.0), scalar(0.0),
                                                  False)[1]


def group_forward_samples(gen, device):
    out = []
    for dtype in DTYPES:
        for shift, sqrt_size in ((1, False), (2, True)):
            params = group_sample_params(gen, device, dtype)
            out.append((params, group_dims_for(params, shift), L1, L2.to(device), sqrt_size))
    return out


def group_backward_samples(gen, device):
    out = []
    for dtype in DTYPES:
        params = group_sample_params(gen, device, dtype)
        dims = group_dims_for(params, 1)
        stats = _group_stats(params, dims)
        grad_total = torch.tensor(1.5, device=device)
        out.append((grad_total, params, dims, stats, L1, L2, False))
        out.append((grad_total, params, dims, stats, L1.to(device), L2, True))
        # A subset, told each tensor's first stats row: a tensor listed twice.
        first = [sum(1 if d < 0 or p.dim() < 2 else p.shape[d]
                     for p, d in zip(params[:i], dims[:i])) for i in range(len(params))]
        out.append((grad_total, [params[7], params[0], params[7]], [dims[7], dims[0], dims[7]],
                    stats, L1, L2, False, [first[7], first[0], first[7]]))
    return out


def group_grad_accumulate_samples(gen, device):
    out = []
    for dtype in DTYPES:
        params = group_sample_params(gen, device, dtype)
        dims = group_dims_for(params, 2)
        stats = _group_stats(params, dims)
        out.append((_grads_like(params, gen), params, dims, stats, L1, L2, False))
        out.append((_grads_like(params, gen), params, dims, stats, L1, L2.to(device), True, None))
    return out


def group_prox_samples(gen, device):
    out = []
    for dtype in DTYPES:
        for shift, threshold, sqrt_size in ((0, scalar(0.0), False),
                                            (1, torch.tensor(3.0).to(device), False),
                                            (2, scalar(0.3), True)):
            params = group_sample_params(gen, device, dtype)
            out.append((params, group_dims_for(params, shift), threshold, sqrt_size))
    return out


def group_metric_samples(gen, device, make_params=group_sample_params):
    """The group layouts of group_prox_samples with second moments (exact zeros in
    one tensor, eps 0 in its row: coordinates whose c is infinite) and means; rows
    that zero some groups and not others, a large scale, and a row of 0 (untouched)."""
    out = []
    for dtype in DTYPES:
        for shift, sqrt_size in ((0, False), (1, True)):
            params = make_params(gen, device, dtype)
            moments = [(1e-3 * torch.rand(p.shape, generator=gen, dtype=torch.float64))
                       .to(dtype).contiguous().to(device) for p in params]
            moments[4][::3] = 0.0
            means = [(0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
                     .to(dtype).to(device) for p in params]
            steps = [0.05, 0.02, 0.0, 0.1, 0.01, 0.2, 0.03, 0.01, 0.002, 0.05, 0.004, 0.3]
            rows = [[s * (0.1 if sqrt_size else 1.0), 0.0, 30.0 if t == 6 else 1.0,
                     0.0 if t == 4 else 1e-8] for t, s in enumerate(steps[:len(params)])]
            coefs = torch.tensor(rows, dtype=torch.float64, device=device)
            dims = group_dims_for(params, shift)
            out.append((params, moments, [], dims, coefs, sqrt_size))
            out.append((params, moments, means, dims, coefs, sqrt_size))
    return out


def emulated_group_metric_samples(gen, device):
    """group_metric_samples on small_group_sample_params, for the CUDA emulator. There,
    each group is a block of 256 fibers through Newton's block-wide reductions, on 3
    schedules: the first of the full samples (33,216 groups) ran over 5 minutes under
    ASan, and CI timed out at 90 minutes. A group longer than a chunk is still here
    (the (32769,) tensor of sample_params, one group); many columns over several
    position blocks and long column runs run emulated in
    tests/cuda_emu/test_emulated_group_metric.py (test_emulated_groups.LAYOUTS). Without
    the two large tensors: 18 to 23 groups per sample instead of 622 to 33,216 (the
    (2, 33000) tensor grouped by columns is 33,000 groups)."""
    return group_metric_samples(
        gen, device, lambda g, d, t: group_sample_params(g, d, t, large=False))


def ref_group_forward(params, dims, l1, l2, sqrt_size):
    rows = [group_rows_reference(p, d) for p, d in zip(params, dims)]
    stats = torch.cat([torch.stack([r.abs().sum(dim=1), r.pow(2).sum(dim=1)], dim=1)
                       for r in rows]) if rows else torch.zeros((0, 2), dtype=torch.float64)
    weights = [r.shape[1] ** 0.5 if sqrt_size else 1.0 for r in rows]
    l2_sum = sum(w * r.pow(2).sum(dim=1).sqrt().sum() for w, r in zip(weights, rows))
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    total = (float(l1) * stats[:, 0].sum() + float(l2) * l2_sum).to(dtype)
    return total.to(params[0].device), stats.to(params[0].device)


def ref_group_backward(grad_total, params, dims, stats, l1, l2, sqrt_size, first_rows=None):
    if first_rows is None:
        first_rows, row = [], 0
        for p, d in zip(params, dims):
            first_rows.append(row)
            row += 1 if d < 0 or p.dim() < 2 else p.shape[d]
    grads = []
    for p, d, first in zip(params, dims, first_rows):
        rows = group_rows_reference(p, d)
        norms = stats[first:first + rows.shape[0], 1].double().cpu().sqrt().to(rows.device)
        weight = rows.shape[1] ** 0.5 if sqrt_size else 1.0
        unit = torch.where(norms[:, None] == 0, torch.zeros_like(rows), rows / norms[:, None])
        g = float(grad_total) * (float(l1) * rows.sign() + float(l2) * weight * unit)
        if d >= 0 and p.dim() >= 2:
            g = g.reshape(p.movedim(d, 0).shape).movedim(0, d)
        grads.append(g.reshape(p.shape).to(p.dtype))
    return grads


def ref_group_grad_accumulate_(grads, params, dims, stats, l1, l2, sqrt_size, first_rows=None):
    for g, d in zip(grads, ref_group_backward(1.0, params, dims, stats, l1, l2, sqrt_size,
                                              first_rows)):
        g.copy_((g.double() + d.double()).to(g.dtype))


@dataclass(frozen=True)
class OpEntry:
    samples: Callable    # (generator, device) -> [argument tuples]
    mutated: tuple       # positions of the arguments the operator writes
    reference: Callable  # the same call in torch ops (writes the same arguments)
    # The same kind of samples sized for the CUDA emulator (tests/cuda_emu), where
    # `samples` would take too long; None: `samples` themselves.
    emulated_samples: Callable = None

    def samples_for(self, emulated):
        return self.emulated_samples if emulated and self.emulated_samples else self.samples


OPS = {
    "penalty_forward": OpEntry(forward_samples, (), ref_forward),
    "penalty_backward": OpEntry(backward_samples, (), ref_backward),
    "penalty_grad_accumulate_": OpEntry(grad_accumulate_samples, (0,), ref_grad_accumulate_),
    "penalty_forward_accumulate_": OpEntry(forward_accumulate_samples, (0,),
                                           ref_forward_accumulate_),
    "prox_l1_": OpEntry(prox_samples, (0,), prox_l1_reference),
    "prox_group_l2_": OpEntry(prox_samples, (0,), prox_group_l2_reference),
    "prox_metric_": OpEntry(metric_samples, (0,), prox_metric_reference),
    "count_zeros": OpEntry(count_samples, (), count_zeros_reference),
    "group_penalty_forward": OpEntry(group_forward_samples, (), ref_group_forward),
    "group_penalty_backward": OpEntry(group_backward_samples, (), ref_group_backward),
    "group_penalty_grad_accumulate_": OpEntry(group_grad_accumulate_samples, (0,),
                                              ref_group_grad_accumulate_),
    "prox_group_lasso_": OpEntry(group_prox_samples, (0,), prox_group_lasso_reference),
    "prox_group_metric_": OpEntry(group_metric_samples, (0,), prox_group_metric_reference,
                                  emulated_samples=emulated_group_metric_samples),
}


def cases(device="cpu", *, first_only=False, emulated=False):
    """(operator name, sample index) pairs for pytest ids; first_only: one per operator
    (for the slow checks: compile, threads); emulated: of the emulator's samples."""
    gen = torch.Generator().manual_seed(0)
    return [(name, i) for name, entry in OPS.items()
            for i in range(1 if first_only else
                           len(entry.samples_for(emulated)(gen, device)))]


def sample(name, index, device="cpu", seed=0, emulated=False):
    """A fresh copy of one sample's arguments (emulated: of the emulator's samples)."""
    return OPS[name].samples_for(emulated)(torch.Generator().manual_seed(seed), device)[index]


def clone_args(args):
    """The arguments with every tensor (and list of tensors) copied, layouts kept."""
    def clone(a):
        if isinstance(a, torch.Tensor):
            return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype,
                                       device=a.device).copy_(a)
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [clone(t) for t in a]
        return a
    return tuple(clone(a) for a in args)


def outcome(name, fn, args):
    """What a call produces: its result and the new values of the arguments it writes."""
    args = clone_args(args)
    result = fn(*args)
    written = [args[i] for i in OPS[name].mutated]
    return result, written


def flatten(value):
    """The tensors of a result, in order (nested tuples and lists flattened)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten(v)]
    return []


TOLERANCES = {  # (rtol, atol) by the samples' parameter dtype
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def param_dtype(args):
    """The dtype of a sample's parameters (the first list of tensors that is not grads)."""
    lists = [a for a in args if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)]
    return lists[-1][0].dtype


def assert_close_outcomes(got, want, dtype, what=""):
    rtol, atol = TOLERANCES[dtype]
    got, want = flatten(got), flatten(want)
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.dtype, w.dtype)
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what}, tensor {i}: {m}")
