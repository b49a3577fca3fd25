"""The group lasso's CUDA kernels (csrc/cuda/group_cuda.cu), run by the emulator.

Every layout of csrc/groups.h at its edges: rows shorter and longer than a warp,
runs just below, at and above kLongRun (256) repeated over outer > 1, rows of a
chunk and of more than a chunk (pieces), position blocks of 63 to 129 periods;
misaligned data in allocations of exactly the tensor's size; special values;
more tensors than one launch holds, in several dtypes. Oracle: float64 (the CUDA
group sums are float64 throughout) and the CPU kernels; results bitwise equal
under the three fiber schedules.
"""

import pytest
import torch

from emulated import CPU, DTYPES, EMU, assert_bits_equal, exact_size, launches, on_every_schedule
from op_samples import TOLERANCES
from regext.reference import group_lasso_float64, group_rows_reference
from conftest import scalar

from test_emulated_cuda import make_values

CHUNK = 32768

# (shape, group dim): each exercises one path of csrc/groups.h.
LAYOUTS = [
    ((7, 31), 0), ((7, 32), 0), ((9, 33), 0),          # short rows: a warp per run
    ((3, 255), 0), ((3, 256), 0),                      # short and long runs, one period
    ((4, 3, 255), 1), ((4, 3, 256), 1), ((4, 3, 257), 1),  # runs repeated over outer = 4
    ((2, CHUNK - 1), 0), ((2, CHUNK), 0), ((2, CHUNK + 1), 0),  # pieces of long rows
    ((2, 2, CHUNK + 5), 1),                            # pieces of runs repeated over outer
    ((63, 40), 1), ((64, 40), 1), ((65, 40), 1), ((129, 600), 1),  # position blocks
    ((16, 8, 3, 3), 1), ((16, 8, 3, 3), 0),            # conv input channels, filters
    ((5, 1), 0), ((1, 5), 1), ((0, 4), 0), ((4, 0), 1),  # one column / row, empty
    ((50,), 0), ((0,), 1),                             # fewer than 2 dims: one group
]


def place(shape, dtype, kind, gen, offset):
    """A tensor of `shape` and `kind` values at element `offset` of an allocation of
    exactly its size."""
    n = 1
    for s in shape:
        n *= s
    return exact_size(make_values(n, dtype, kind, gen), offset).view(shape)


def float64_group_stats(params, dims):
    rows = [group_rows_reference(p, d) for p, d in zip(params, dims)]
    return torch.cat([torch.stack([r.abs().sum(dim=1), r.pow(2).sum(dim=1)], dim=1)
                      for r in rows])


def check_group_forward(params, dims, sqrt_size):
    total, stats = on_every_schedule(
        lambda: EMU.group_penalty_forward(params, dims, scalar(0.3), scalar(0.7), sqrt_size))
    cpu_total, cpu_stats = CPU.group_penalty_forward(params, dims, scalar(0.3), scalar(0.7),
                                                     sqrt_size)
    want = float64_group_stats(params, dims)
    assert stats.shape == want.shape == cpu_stats.shape
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(stats), finite)
    assert torch.equal(stats[~finite].isnan(), cpu_stats[~finite].isnan())
    err = ((stats - want).abs() / want.abs().clamp_min(1e-300))[finite]
    assert err.numel() == 0 or err.max().item() <= 1e-12, err.max().item()
    want_total = group_lasso_float64(params, dims, 0.3, 0.7, sqrt_size)
    assert total.dtype == cpu_total.dtype
    if torch.isfinite(want_total.to(total.dtype)):
        rounding = 6e-8 if total.dtype == torch.float32 else 1e-12
        assert abs(total.item() - want_total.item()) <= rounding * abs(want_total.item()) + 1e-300
    else:
        assert_bits_equal(total, cpu_total, "non-finite total")
    return stats


@pytest.mark.parametrize("sqrt_size", [False, True])
@pytest.mark.parametrize("kind", ["normal", "special"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_forward_backward_prox_on_every_layout(dtype, kind, sqrt_size):
    gen = torch.Generator().manual_seed(31)
    params = [place(shape, dtype, kind, gen, i % 8) for i, (shape, _) in enumerate(LAYOUTS)]
    dims = [d for _, d in LAYOUTS]
    stats = check_group_forward(params, dims, sqrt_size)

    grad_total = torch.tensor(1.5)
    got = on_every_schedule(lambda: EMU.group_penalty_backward(
        grad_total, params, dims, stats, scalar(0.3), scalar(0.7), sqrt_size))
    want = CPU.group_penalty_backward(grad_total, params, dims, stats, scalar(0.3), scalar(0.7),
                                      sqrt_size)
    rtol, atol = TOLERANCES[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"gradient {i} {LAYOUTS[i]}: {m}")

    def accumulate(op):
        grads = [torch.ones_like(p) for p in params]
        op.group_penalty_grad_accumulate_(grads, params, dims, stats, scalar(0.3), scalar(0.7),
                                          sqrt_size)
        return grads
    for i, (g, w) in enumerate(zip(on_every_schedule(lambda: accumulate(EMU)), accumulate(CPU))):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"accumulated {i} {LAYOUTS[i]}: {m}")

    def prox(op):
        xs = [p.clone() for p in params]
        op.prox_group_lasso_(xs, dims, scalar(2.0), sqrt_size)
        return xs
    for i, (g, w) in enumerate(zip(on_every_schedule(lambda: prox(EMU)), prox(CPU))):
        # Same zero groups; the kept ones scaled from norms equal to ~1e-12 (CPU float32
        # blocks: ~1e-7), so they may differ in the last bit.
        assert torch.equal(g == 0, w == 0), (i, LAYOUTS[i])
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("dtypes, num_tensors", [((torch.float32,), 230), (DTYPES, 97)],
                         ids=["230 tensors", "mixed dtypes"])
def test_group_batches(dtypes, num_tensors):
    """More tensors than one launch's GroupBatch holds (224), or several dtypes:
    stats rows of every group land in their own place."""
    gen = torch.Generator().manual_seed(32)
    params, dims = [], []
    for i in range(num_tensors):
        shape = tuple(int(s) for s in torch.randint(1, 40, (2,), generator=gen))
        params.append(place(shape, dtypes[i % len(dtypes)], "normal", gen, i % 8))
        dims.append((-1, 0, 1)[i % 3])
    stats = check_group_forward(params, dims, False)
    got = EMU.group_penalty_backward(torch.tensor(1.0), params, dims, stats, scalar(0.3),
                                     scalar(0.7), False)
    want = CPU.group_penalty_backward(torch.tensor(1.0), params, dims, stats, scalar(0.3),
                                      scalar(0.7), False)
    for g, w in zip(got, want):
        rtol, atol = TOLERANCES[g.dtype]
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def test_group_launches():
    """One dtype, one batch: forward = partial sums, combine, total (3 launches);
    gradient 1; proximal step = partial sums, combine, shrink (3: no total). Every launch
    within CUDA's limits."""
    gen = torch.Generator().manual_seed(33)
    params = [place(shape, torch.float32, "normal", gen, 0) for shape, _ in LAYOUTS]
    dims = [d for _, d in LAYOUTS]
    (_, stats), fwd = launches(lambda: EMU.group_penalty_forward(params, dims, scalar(0.1),
                                                                 scalar(0.2), False))
    _, bwd = launches(lambda: EMU.group_penalty_backward(torch.tensor(1.0), params, dims, stats,
                                                         scalar(0.1), scalar(0.2), False))
    _, prox = launches(lambda: EMU.prox_group_lasso_([p.clone() for p in params], dims,
                                                     scalar(0.1), False))
    assert (len(fwd), len(bwd), len(prox)) == (3, 1, 3), (fwd, bwd, prox)
    for blocks, threads, param_bytes in fwd + bwd + prox:
        assert param_bytes <= 32764 and threads <= 1024 and blocks >= 1
