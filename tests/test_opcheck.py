"""torch.library.opcheck on every regext operator: schema, fake kernel, autograd registration."""

import pytest
import torch

import regext  # noqa: F401  (loads the operators)

from conftest import random_params


def _params(gen, device, dtype=torch.float32):
    ps = random_params(gen, [(4, 5), (3,), (0,), (2, 3, 4)], dtype=dtype, device=device,
                       requires_grad=False)
    ps.append(random_params(gen, [(6, 4)], dtype=dtype, device=device,
                            requires_grad=False)[0].t())
    return ps


@pytest.mark.parametrize("l2_squared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_penalty_forward(device, gen, l2_squared, dtype):
    torch.library.opcheck(torch.ops.regext.penalty_forward.default,
                          (_params(gen, device, dtype), 0.1, 0.2, l2_squared))


@pytest.mark.parametrize("l2_squared", [False, True])
def test_opcheck_penalty_backward(device, gen, l2_squared):
    params = _params(gen, device)
    _, stats = torch.ops.regext.penalty_forward(params, 0.1, 0.2, l2_squared)
    grad_total = torch.tensor(1.5, device=device)
    torch.library.opcheck(torch.ops.regext.penalty_backward.default,
                          (grad_total, params, stats, 0.1, 0.2, l2_squared))


def test_opcheck_penalty_grad_accumulate(device, gen):
    params = _params(gen, device)
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    _, stats = torch.ops.regext.penalty_forward(params, 0.1, 0.2, False)
    torch.library.opcheck(torch.ops.regext.penalty_grad_accumulate_.default,
                          (grads, params, stats, 0.1, 0.2, False))


def test_opcheck_penalty_backward_with_stats_rows(device, gen):
    params = _params(gen, device)
    _, stats = torch.ops.regext.penalty_forward(params, 0.1, 0.2, False)
    subset, rows = [params[4], params[0]], [4, 0]
    grad_total = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.regext.penalty_backward.default,
                          (grad_total, subset, stats, 0.1, 0.2, False, rows))
    got = torch.ops.regext.penalty_backward(grad_total, subset, stats, 0.1, 0.2, False, rows)
    full = torch.ops.regext.penalty_backward(grad_total, params, stats, 0.1, 0.2, False)
    assert torch.equal(got[0], full[4]) and torch.equal(got[1], full[0])
    with pytest.raises(RuntimeError, match=r"stats_rows\[1\] = 9 is out of range"):
        torch.ops.regext.penalty_backward(grad_total, subset, stats, 0.1, 0.2, False, [4, 9])


def test_grad_accumulate_with_a_gradient_listed_twice(device, gen):
    (p,) = random_params(gen, [(300_000,)], device=device, requires_grad=False)
    grad = torch.randn(p.shape, generator=gen).to(device)
    expected = grad.clone()
    _, stats = torch.ops.regext.penalty_forward([p], 0.1, 0.2, False)
    once = [g.clone() for g in [expected]]
    torch.ops.regext.penalty_grad_accumulate_(once, [p], stats, 0.1, 0.2, False)
    delta = once[0] - expected
    torch.ops.regext.penalty_grad_accumulate_([grad, grad], [p, p], stats, 0.1, 0.2, False,
                                              [0, 0])
    torch.testing.assert_close(grad, expected + 2 * delta)
