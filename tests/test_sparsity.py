"""sparsity / sparsity_report: exact-zero counts, overall and per tensor."""

import math

import pytest
import torch
from torch import nn

import regext
from regext.reference import count_zeros_reference

from conftest import random_params

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _with_zeros(gen, shape, fraction, dtype=torch.float32, device="cpu"):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x[torch.rand(shape, generator=gen) < fraction] = 0.0
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_counts_match_torch(device, gen, dtype):
    params = [_with_zeros(gen, s, f, dtype, device)
              for s, f in [((7, 5), 0.3), ((100_000,), 0.5), ((0,), 0.0), ((3, 4, 5), 1.0),
                           ((1,), 0.0)]]
    expected = [int((p == 0).sum()) for p in params]
    report = regext.sparsity_report(params)
    assert [t.zeros for t in report.per_tensor] == expected
    assert [t.numel for t in report.per_tensor] == [p.numel() for p in params]
    assert report.zeros == sum(expected) and report.numel == sum(p.numel() for p in params)
    assert regext.sparsity(params) == report.fraction == sum(expected) / report.numel
    counts = torch.ops.regext.count_zeros(params)
    assert counts.dtype == torch.int64 and counts.device == params[0].device
    assert torch.equal(counts, count_zeros_reference(params))


def test_signed_zero_counts_nan_does_not(device):
    x = torch.tensor([0.0, -0.0, math.nan, 1e-45, -math.inf, 5.0], device=device)
    assert regext.sparsity_report([x]).zeros == 2
    for dtype in (torch.float16, torch.bfloat16):
        assert regext.sparsity_report([x.to(dtype)]).zeros == 3  # 1e-45 underflows to 0


def test_names_from_module_named_pairs_and_plain_tensors():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.zero_()
    report = regext.sparsity_report(model)
    assert [t.name for t in report.per_tensor] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert report.as_dict()["0.bias"] == 1.0
    assert regext.sparsity_report(model.named_parameters()).as_dict() == report.as_dict()
    plain = regext.sparsity_report(model.parameters())
    assert [t.name for t in plain.per_tensor] == ["0", "1", "2", "3"]
    assert plain.fraction == report.fraction == regext.sparsity(model) == pytest.approx(3 / 23)
    text = str(report)
    assert "0.bias" in text and "100.00" in text and "total" in text
    assert report.per_tensor[0].shape == (3, 4)


def test_non_contiguous_duplicates_empty(device, gen):
    base = _with_zeros(gen, (40, 30), 0.5, device=device)
    view = base[::3, 1::2]
    assert regext.sparsity_report([view]).zeros == int((view == 0).sum())
    twice = regext.sparsity_report([view, view])
    assert twice.zeros == 2 * int((view == 0).sum()) and twice.numel == 2 * view.numel()
    assert regext.sparsity([]) == 0.0
    assert regext.sparsity([torch.zeros(0, device=device)]) == 0.0
    assert regext.sparsity_report([]).per_tensor == ()


def test_parameters_requiring_grad_are_fine_and_untouched(device, gen):
    params = random_params(gen, [(5, 5)], device=device)
    before = params[0].detach().clone()
    with torch.enable_grad():
        assert regext.sparsity(params) == 0.0
    assert torch.equal(params[0].detach(), before) and params[0].grad is None


def test_bitwise_counts_across_thread_counts():
    gen = torch.Generator().manual_seed(2)
    params = [_with_zeros(gen, (n,), 0.3) for n in (10, 200_000, 1_000_000)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.regext.count_zeros(params)
        torch.set_num_threads(2)
        two = torch.ops.regext.count_zeros(params)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two) and torch.equal(one, count_zeros_reference(params))


@pytest.mark.parametrize("bad, error, pattern", [
    (torch.arange(4), TypeError, r"params\[1\] has dtype torch.int64"),
    (3.0, TypeError, r"params\[1\] is a float, not a Tensor"),
])
def test_bad_input(bad, error, pattern):
    with pytest.raises(error, match=rf"sparsity: {pattern}"):
        regext.sparsity([torch.randn(3), bad])
    with pytest.raises(error, match=rf"sparsity_report: {pattern}"):
        regext.sparsity_report([torch.randn(3), bad])
    with pytest.raises(TypeError, match="single Tensor"):
        regext.sparsity(torch.randn(3))
    with pytest.raises(TypeError, match="iterable"):
        regext.sparsity(42)
