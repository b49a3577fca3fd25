"""Zero, empty, non-contiguous, duplicate, frozen, half-precision and NaN/inf inputs."""

import math

import pytest
import torch

import regext
from regext.reference import penalty_float64, penalty_loop

from conftest import TOLERANCES, grads_of, random_params


def test_empty_iterable_gives_zero():
    out = regext.fused_penalty([], 0.5, 0.5)
    assert out.dtype == torch.float32 and out.dim() == 0 and out.item() == 0.0
    assert regext.fused_penalty(iter(()), 1.0).item() == 0.0


def test_generator_input_is_consumed_once(device, gen):
    params = random_params(gen, [(3, 3), (4,)], device=device)
    ours = regext.fused_penalty((p for p in params), 0.2, 0.3)
    torch.testing.assert_close(ours, penalty_loop(params, 0.2, 0.3))


def test_zero_element_tensors_contribute_nothing_and_keep_rows(device, gen):
    params = random_params(gen, [(0,), (3, 4), (0, 5), (6,), (2, 0, 3)], device=device)
    ours = regext.fused_penalty(params, 0.3, 0.7)
    loop = penalty_loop(params, 0.3, 0.7)
    torch.testing.assert_close(ours, loop)
    for g, h, p in zip(grads_of(ours, params), grads_of(loop, params), params):
        assert g.shape == p.shape
        torch.testing.assert_close(g, h)


@pytest.mark.parametrize("l2_squared", [False, True])
def test_all_zero_tensor_gets_zero_gradient_never_nan(device, l2_squared):
    z = torch.zeros(4, 3, device=device, requires_grad=True)
    r = torch.randn(5, device=device, requires_grad=True)
    ours = regext.fused_penalty([z, r], 0.5, 0.5, l2_squared=l2_squared)
    loop = penalty_loop([z, r], 0.5, 0.5, l2_squared=l2_squared)
    gz, gr = grads_of(ours, [z, r])
    assert torch.equal(gz, torch.zeros_like(z))
    torch.testing.assert_close(gr, grads_of(loop, [z, r])[1])


def test_sign_of_zero_entries_is_zero(device):
    p = torch.tensor([0.0, -0.0, 2.0, -3.0], device=device, requires_grad=True)
    (g,) = grads_of(regext.fused_penalty([p], 1.0, 0.0), [p])
    assert g.tolist() == [0.0, 0.0, 1.0, -1.0]


def test_non_contiguous_views(device, gen):
    base = random_params(gen, [(8, 6), (4, 3, 5, 2), (10, 12)], device=device,
                         requires_grad=False)
    views = [base[0].t(), base[1].permute(0, 2, 3, 1), base[2][::3, 1::2],
             base[2][:, 5], base[1].to(memory_format=torch.channels_last)]
    views = [v.detach().requires_grad_() if v.is_leaf else v for v in views]
    leaves = [v.detach().clone().requires_grad_() for v in views]
    for ps in (views, leaves):
        pass
    params = [v.detach().requires_grad_() for v in views]  # keep the strides, make leaves
    assert not params[0].is_contiguous() and not params[2].is_contiguous()
    for sq in (False, True):
        ours = regext.fused_penalty(params, 0.4, 0.6, l2_squared=sq)
        loop = penalty_loop(params, 0.4, 0.6, l2_squared=sq)
        torch.testing.assert_close(ours, loop)
        for g, h in zip(grads_of(ours, params), grads_of(loop, params)):
            torch.testing.assert_close(g, h)
    channels_last_grad = grads_of(regext.fused_penalty([params[4]], 0.1, 0.1), [params[4]])[0]
    assert channels_last_grad.stride() == params[4].stride()


def test_duplicate_tensor_counts_twice(device, gen):
    (a, b) = random_params(gen, [(5, 4), (3,)], device=device)
    twice = regext.fused_penalty([a, b, a], 0.3, 0.5)
    torch.testing.assert_close(twice, penalty_loop([a, b, a], 0.3, 0.5))
    once_a = regext.fused_penalty([a], 0.3, 0.5)
    torch.testing.assert_close(twice, regext.fused_penalty([b], 0.3, 0.5) + 2 * once_a)
    ga, gb = grads_of(twice, [a, b])
    la, lb = grads_of(penalty_loop([a, b, a], 0.3, 0.5), [a, b])
    torch.testing.assert_close(ga, la)
    torch.testing.assert_close(gb, lb)


def test_frozen_parameters_get_no_grad_but_count_in_value(device, gen):
    a, b, c = random_params(gen, [(4, 4), (6,), (2, 5)], device=device)
    b.requires_grad_(False)
    out = regext.fused_penalty([a, b, c], 0.3, 0.2)
    torch.testing.assert_close(out, penalty_loop([a, b, c], 0.3, 0.2))
    out.backward()
    assert b.grad is None and a.grad is not None and c.grad is not None
    ra, rc = grads_of(penalty_loop([a, b, c], 0.3, 0.2), [a, c])
    torch.testing.assert_close(a.grad, ra)
    torch.testing.assert_close(c.grad, rc)


def test_no_param_requires_grad_gives_plain_tensor(device, gen):
    params = random_params(gen, [(3,), (4, 4)], device=device, requires_grad=False)
    out = regext.fused_penalty(params, 0.1, 0.1)
    assert not out.requires_grad
    torch.testing.assert_close(out, penalty_loop(params, 0.1, 0.1))


def test_parameters_are_never_modified(device, gen):
    params = random_params(gen, [(5, 5), (7,)], device=device)
    before = [p.detach().clone() for p in params]
    regext.fused_penalty(params, 0.2, 0.2).backward()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("l2_squared", [False, True])
def test_half_types_accumulate_in_float32_or_better(device, gen, dtype, l2_squared):
    params = random_params(gen, [(64, 33), (1000,), (7,)], dtype=dtype, device=device)
    ours = regext.fused_penalty(params, 0.01, 0.1, l2_squared=l2_squared)
    assert ours.dtype == torch.float32
    exact = penalty_float64(params, 0.01, 0.1, l2_squared=l2_squared)
    assert abs(ours.item() - exact.item()) <= 1e-6 * abs(exact.item())
    loop = penalty_loop(params, 0.01, 0.1, l2_squared=l2_squared)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(ours, loop.float(), rtol=rtol, atol=atol)
    for g, h, p in zip(grads_of(ours, params), grads_of(loop, params), params):
        assert g.dtype == dtype
        torch.testing.assert_close(g, h, rtol=rtol, atol=atol)


def test_half_sum_of_squares_overflowing_half_stays_finite(device):
    p = torch.full((4096,), 200.0, dtype=torch.float16, device=device, requires_grad=True)
    ours = regext.fused_penalty([p], 0.0, 1.0, l2_squared=True)  # sum x^2 = 1.6e8 > 65504
    assert math.isfinite(ours.item())
    assert ours.item() == pytest.approx(4096 * 200.0 ** 2, rel=1e-7)


def test_mixed_dtypes_promote_to_float64(device, gen):
    a = random_params(gen, [(4, 4)], dtype=torch.float32, device=device)[0]
    b = random_params(gen, [(5,)], dtype=torch.float64, device=device)[0]
    c = random_params(gen, [(6,)], dtype=torch.bfloat16, device=device)[0]
    ours = regext.fused_penalty([a, b, c], 0.1, 0.2)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, penalty_float64([a, b, c], 0.1, 0.2), rtol=1e-12, atol=0)
    for g, p in zip(grads_of(ours, [a, b, c]), [a, b, c]):
        assert g.dtype == p.dtype


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("l1, l2", [(0.5, 0.5), (0.0, 0.5), (0.5, 0.0), (0.0, 0.0)])
@pytest.mark.parametrize("l2_squared", [False, True])
def test_nan_inf_propagate_like_the_loop(device, bad, l1, l2, l2_squared):
    p = torch.tensor([1.0, bad, -2.0], device=device, requires_grad=True)
    q = torch.tensor([0.5, -0.25], device=device, requires_grad=True)
    ours = regext.fused_penalty([p, q], l1, l2, l2_squared=l2_squared)
    loop = penalty_loop([p, q], l1, l2, l2_squared=l2_squared)
    assert not math.isfinite(ours.item())
    torch.testing.assert_close(ours, loop, equal_nan=True)
    for g, h in zip(grads_of(ours, [p, q]), grads_of(loop, [p, q])):
        torch.testing.assert_close(g, h, equal_nan=True)
