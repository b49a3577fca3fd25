"""Coefficients and thresholds: Python numbers, or 0-dim tensors on the CPU or on
the parameters' device, in every entry point; changing tensors need no new
compiled graph. NaN/inf diagnostics (error_if_nonfinite)."""

import math

import pytest
import torch

import regext
from regext.reference import penalty_float64

from conftest import random_params

ENTRY_POINTS = ["fused_penalty", "add_penalty_grad_"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_tensor_coefficients_give_the_number_results(device, gen, dtype):
    params = random_params(gen, [(30, 4), (7,)], device=device)
    l1, l2 = torch.tensor(0.25, dtype=dtype), torch.tensor(0.5, dtype=dtype, device=device)
    torch.testing.assert_close(regext.fused_penalty(params, l1, l2),
                               regext.fused_penalty(params, float(l1), float(l2)))
    got = [p.detach().clone() for p in params]
    want = [p.detach().clone() for p in params]
    regext.prox_l1_(got, l1)
    regext.prox_l1_(want, float(l1))
    regext.prox_group_l2_(got, l2)
    regext.prox_group_l2_(want, float(l2))
    regext.prox_l2_squared_(got, l2)
    regext.prox_l2_squared_(want, float(l2))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for p in params:
        p.grad = None
    regext.add_penalty_grad_(params, l1, l2)
    ref = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    regext.add_penalty_grad_(params, float(l1), float(l2))
    for p, r in zip(params, ref):
        assert torch.equal(p.grad, r)


@pytest.mark.parametrize("bad, error, pattern", [
    (torch.tensor([0.1]), TypeError, r"l1 must be a number or a 0-dim floating-point tensor"),
    (torch.tensor(1), TypeError, r"l1 must be a number or a 0-dim floating-point tensor"),
    (torch.tensor(-1.0), ValueError, r"l1 must be a finite number >= 0, got -1"),
    (torch.tensor(math.nan), ValueError, r"l1 must be a finite number >= 0, got nan"),
    (torch.empty((), device="meta"), RuntimeError, r"l1 is on meta but the parameters are on cpu"),
])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bad_coefficient_tensors(entry, bad, error, pattern):
    p = torch.randn(4, requires_grad=True)
    with pytest.raises(error, match=pattern):
        getattr(regext, entry)([p], bad, 0.1)
    assert p.grad is None


def test_error_if_nonfinite_names_the_first_nonfinite_tensor():
    params = [torch.randn(3, requires_grad=True), torch.tensor([1.0, math.inf]).requires_grad_(),
              torch.tensor([math.nan]).requires_grad_()]
    assert not torch.isfinite(regext.fused_penalty(params, 0.1, 0.1))  # no error by default
    with pytest.raises(RuntimeError, match=r"fused_penalty: the penalty is (nan|inf) because "
                                           r"params\[1\] \(shape \(2,\), dtype torch.float32\) "
                                           r"has a non-finite norm: it holds inf values"):
        regext.fused_penalty(params, 0.1, 0.1, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=r"add_penalty_grad_: .* because params\[1\]"):
        regext.add_penalty_grad_(params, 0.1, 0.1, error_if_nonfinite=True)
    assert all(p.grad is None for p in params)  # raised before any gradient was touched


def test_error_if_nonfinite_when_only_the_total_overflows():
    params = [torch.full((10,), 3e37, requires_grad=True), torch.full((10,), 3e37,
                                                                      requires_grad=True)]
    with pytest.raises(RuntimeError, match=r"although every tensor's norms are finite: .* "
                                           r"overflows the result dtype torch.float32"):
        regext.fused_penalty(params, 1.0, 0.0, error_if_nonfinite=True)
    value = regext.fused_penalty(params, 1e-10, 0.0, error_if_nonfinite=True)
    assert value.item() == pytest.approx(penalty_float64(params, 1e-10, 0.0).item(), rel=1e-6)


def test_coefficient_tensors_on_the_parameters_device_are_never_read_on_the_host():
    """Meta tensors have no data: reading one would raise. Coefficients on the
    parameters' (meta) device pass through every entry point unread, as a CUDA
    coefficient does (no synchronization, capturable in a CUDA graph)."""
    params = [torch.empty(4, 3, device="meta", requires_grad=True)]
    l1, l2, t = (torch.empty((), device="meta") for _ in range(3))
    value = regext.fused_penalty(params, l1, l2)
    assert value.device.type == "meta"
    value.backward()
    regext.prox_l1_([p.detach() for p in params], t)
    regext.prox_group_l2_([p.detach() for p in params], t)
    regext.prox_l2_squared_([p.detach() for p in params], t)
    pen = regext.Penalty([("w", params[0])], l1=l1, l2=l2)
    assert pen().device.type == "meta"
    pen.prox_(t)
