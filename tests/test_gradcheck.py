"""Gradients of fused_penalty: numerical gradcheck in float64, double backward."""

import pytest
import torch

import regext

from conftest import random_params


@pytest.mark.parametrize("l2_squared", [False, True])
def test_gradcheck_float64(l2_squared, device, gen):
    params = random_params(gen, [(3, 4), (5,), (2, 3, 2), ()], dtype=torch.float64,
                           device=device, away_from_zero=True)
    params.append(random_params(gen, [(4, 6)], dtype=torch.float64, device=device,
                                away_from_zero=True)[0].t())  # non-contiguous view

    def fn(*ps):
        return regext.fused_penalty(ps, 0.37, 1.3, l2_squared=l2_squared)

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("l2_squared", [False, True])
def test_gradcheck_with_frozen_params(l2_squared, device, gen):
    params = random_params(gen, [(3, 4), (6,), (2, 2)], dtype=torch.float64, device=device,
                           away_from_zero=True)
    params[1].requires_grad_(False)

    def fn(a, c):
        return regext.fused_penalty([a, params[1], c], 0.5, 2.0, l2_squared=l2_squared)

    assert torch.autograd.gradcheck(fn, (params[0], params[2]))


@pytest.mark.parametrize("l2_squared", [False, True])
def test_gradgradcheck_float64(l2_squared, device, gen):
    params = random_params(gen, [(3, 4), (5,), ()], dtype=torch.float64, device=device,
                           away_from_zero=True)

    def fn(*ps):
        return regext.fused_penalty(ps, 0.37, 1.3, l2_squared=l2_squared)

    assert torch.autograd.gradgradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_second_derivative_matches_loop(device, gen):
    """A gradient penalty on top of the penalty: the loop's double backward, exactly."""
    a, b = random_params(gen, [(4, 3), (6,)], dtype=torch.float64, device=device)
    from regext.reference import penalty_loop
    results = []
    for fn in (regext.fused_penalty, penalty_loop):
        value = fn([a, b], 0.2, 0.9)
        ga, gb = torch.autograd.grad(value, [a, b], create_graph=True)
        gp = (ga.pow(2).sum() + gb.pow(2).sum())
        results.append(torch.autograd.grad(gp, [a, b]))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y)


def test_grad_total_scales_gradients(device, gen):
    (p,) = random_params(gen, [(7, 5)], device=device)
    value = regext.fused_penalty([p], 0.3, 0.4)
    (g1,) = torch.autograd.grad(value, [p], retain_graph=True)
    (g3,) = torch.autograd.grad(value * 3.0, [p])
    torch.testing.assert_close(g3, 3.0 * g1)
