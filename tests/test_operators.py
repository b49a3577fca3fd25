"""The raw operators (torch.ops.regext.*): each against its float64 reference
(tests/op_samples.py), and their list semantics: stats rows, a gradient listed
twice, the one-pass forward-and-accumulate."""

import pytest
import torch

import regext  # noqa: F401  (loads the operators)

from conftest import random_params, scalar
from op_samples import OPS, assert_close_outcomes, cases, outcome, param_dtype, sample


@pytest.mark.parametrize("name, index", cases())
def test_operator_matches_its_float64_reference(name, index):
    args = sample(name, index)
    got = outcome(name, getattr(torch.ops.regext, name), args)
    want = outcome(name, OPS[name].reference, args)
    assert_close_outcomes(got, want, param_dtype(args), f"{name} sample {index}")


def _params(gen, device, dtype=torch.float32):
    ps = random_params(gen, [(4, 5), (3,), (0,), (2, 3, 4)], dtype=dtype, device=device,
                       requires_grad=False)
    ps.append(random_params(gen, [(6, 4)], dtype=dtype, device=device,
                            requires_grad=False)[0].t())
    return ps


def test_backward_with_stats_rows_equals_the_full_backward(device, gen):
    params = _params(gen, device)
    _, stats = torch.ops.regext.penalty_forward(params, scalar(0.1), scalar(0.2), False)
    subset, rows = [params[4], params[0]], [4, 0]
    grad_total = torch.tensor(0.5, device=device)
    got = torch.ops.regext.penalty_backward(grad_total, subset, stats, scalar(0.1), scalar(0.2), False, rows)
    full = torch.ops.regext.penalty_backward(grad_total, params, stats, scalar(0.1), scalar(0.2), False)
    assert torch.equal(got[0], full[4]) and torch.equal(got[1], full[0])
    with pytest.raises(RuntimeError, match=r"stats_rows\[1\] = 9 is out of range"):
        torch.ops.regext.penalty_backward(grad_total, subset, stats, scalar(0.1), scalar(0.2), False, [4, 9])


def test_grad_accumulate_with_a_gradient_listed_twice(device, gen):
    (p,) = random_params(gen, [(300_000,)], device=device, requires_grad=False)
    grad = torch.randn(p.shape, generator=gen).to(device)
    expected = grad.clone()
    _, stats = torch.ops.regext.penalty_forward([p], scalar(0.1), scalar(0.2), False)
    once = [g.clone() for g in [expected]]
    torch.ops.regext.penalty_grad_accumulate_(once, [p], stats, scalar(0.1), scalar(0.2), False)
    delta = once[0] - expected
    torch.ops.regext.penalty_grad_accumulate_([grad, grad], [p, p], stats, scalar(0.1), scalar(0.2), False,
                                              [0, 0])
    torch.testing.assert_close(grad, expected + 2 * delta)


def _two_op_reference(grads, params, l1, l2, l2_squared):
    """penalty_forward then penalty_grad_accumulate_, on copies of the gradients."""
    grads = [g.clone() for g in grads]
    total, stats = torch.ops.regext.penalty_forward(params, scalar(l1), scalar(l2), l2_squared)
    torch.ops.regext.penalty_grad_accumulate_(grads, params, stats, scalar(l1), scalar(l2), l2_squared)
    return total, stats, grads


# Lengths around the CPU kernels' 256-element blocks and 32Ki-element chunks.
_FUSED_SHAPES = [(3,), (255,), (256,), (257,), (40, 64), (32768,), (32769,), (70_001,), (0,),
                 (300, 7)]


@pytest.mark.parametrize("l2_squared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_forward_accumulate_equals_forward_then_accumulate_bitwise(device, gen, l2_squared,
                                                                   dtype):
    """The one-pass kernel (squared form) gives exactly the two-operator result."""
    params = random_params(gen, _FUSED_SHAPES, dtype=dtype, device=device, requires_grad=False)
    params[-1] = params[-1].t()  # a transposed (dense) parameter
    params[3][5:9] = 0.0         # exact zeros: sign(0) = 0
    grads = [torch.randn(p.shape, generator=gen).to(dtype).to(device) for p in params]
    grads[-1] = grads[-1].t().contiguous().t()  # same strides as its parameter
    want_total, want_stats, want_grads = _two_op_reference(grads, params, 0.3, 0.7, l2_squared)
    total, stats = torch.ops.regext.penalty_forward_accumulate_(grads, params, scalar(0.3), scalar(0.7),
                                                                l2_squared)
    assert torch.equal(total, want_total) and torch.equal(stats, want_stats)
    for g, w in zip(grads, want_grads):
        assert g.stride() == w.stride()
        assert torch.equal(g, w)


@pytest.mark.parametrize("l2_squared", [False, True])
def test_forward_accumulate_with_staged_duplicate_and_nan_cases(device, gen, l2_squared):
    """Paths that cannot update while reading (a gradient with other strides, a
    gradient listed twice) and NaN/inf data still give the two-operator result."""
    base = random_params(gen, [(50, 40), (4096,), (600,)], device=device, requires_grad=False)
    base[2][17] = float("nan")
    base[1][1000] = float("inf")
    grads = [torch.randn(50, 40, generator=gen).to(device).t().contiguous().t(),
             torch.randn(4096, generator=gen).to(device),
             torch.randn(600, generator=gen).to(device)]
    grads[0] = torch.randn(40, 50, generator=gen).to(device).t()  # strides differ from param
    for params, gs in ((base, grads), (base + [base[1]], grads + [grads[1]])):
        want_total, want_stats, want_grads = _two_op_reference(gs, params, 0.3, 0.7, l2_squared)
        got = [g.clone() for g in gs]
        if len(gs) == 4:
            got[3] = got[1]  # the same gradient tensor twice, as for a repeated parameter
        total, stats = torch.ops.regext.penalty_forward_accumulate_(got, params, scalar(0.3), scalar(0.7),
                                                                    l2_squared)
        torch.testing.assert_close(total, want_total, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(stats, want_stats, equal_nan=True, rtol=0, atol=0)
        if len(gs) == 4:
            # Twice the update on the shared gradient, in order.
            want_grads[1] = want_grads[1] + (want_grads[3] - gs[3])
        for g, w in zip(got[:3], want_grads[:3]):
            torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-6, atol=1e-6)


def test_forward_accumulate_bumps_gradient_versions_and_refuses_grad_mode(gen):
    params = random_params(gen, [(10,), (20, 3)], requires_grad=False)
    grads = [torch.zeros_like(p) for p in params]
    versions = [g._version for g in grads]
    torch.ops.regext.penalty_forward_accumulate_(grads, params, scalar(0.1), scalar(0.2), True)
    assert all(g._version > v for g, v in zip(grads, versions))
    leaf = [torch.zeros(10, requires_grad=True), torch.zeros(20, 3, requires_grad=True)]
    with pytest.raises(RuntimeError, match="requires grad and grad mode is on"):
        torch.ops.regext.penalty_forward_accumulate_(leaf, params, scalar(0.1), scalar(0.2), True)
