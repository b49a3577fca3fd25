"""Gradients built with create_graph=True (gradient penalties, Hessian-vector
products): the first derivative has the plain backward's accuracy and range
(float64 norms), and the second derivative is exact.

The failures this guards against, from replayed user reports (l1=0, l2=1):
float32 [2e19, 0] gave [0, 0] (the norm overflowed float32), [1e-25, 1e-25]
gave [1e-25, 1e-25] (the norm underflowed), and randn(300000) lost accuracy
with size (1.5e-6 against 7e-8 for the plain backward).
"""

import pytest
import torch

import regext
from regext.reference import penalty_float64

from conftest import random_params

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def first_derivative(params, l1, l2, l2_squared=False, create_graph=True):
    value = regext.fused_penalty(params, l1, l2, l2_squared=l2_squared)
    return torch.autograd.grad(value, params, create_graph=create_graph)


def ulp_distance(a, b):
    """Largest distance in units in the last place of the tensors' dtype."""
    ints = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[a.dtype]
    return (a.contiguous().view(ints).long() - b.contiguous().view(ints).long()).abs().max().item()


@pytest.mark.parametrize("values, expected", [
    ([2e19, 0.0], [1.0, 0.0]),                # ||x|| = 2e19: its float32 square overflows
    ([1e-25, 1e-25], [0.70710677, 0.70710677]),  # its float32 square underflows
    ([3e38, -3e38], [0.70710677, -0.70710677]),  # near float32's largest
])
def test_create_graph_keeps_the_forward_range(values, expected):
    x = torch.tensor(values, requires_grad=True)
    (g,) = first_derivative([x], 0.0, 1.0)
    (plain,) = first_derivative([x], 0.0, 1.0, create_graph=False)
    assert g.requires_grad
    torch.testing.assert_close(g.detach(), torch.tensor(expected), rtol=1e-6, atol=0)
    assert torch.equal(g.detach(), plain)


@pytest.mark.parametrize("l2_squared", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_create_graph_gradient_within_two_ulp_of_the_plain_backward(dtype, l2_squared):
    gen = torch.Generator().manual_seed(3)
    params = random_params(gen, [(300_000,), (40, 30), (7,), (0,)], dtype=dtype)
    with torch.no_grad():
        params[1][3:6] = 0.0
    with_graph = first_derivative(params, 0.3, 0.7, l2_squared)
    plain = first_derivative(params, 0.3, 0.7, l2_squared, create_graph=False)
    for g, p in zip(with_graph, plain):
        assert g.dtype == dtype and g.shape == p.shape
        assert g.numel() == 0 or ulp_distance(g.detach(), p) <= 2


def test_create_graph_accuracy_does_not_grow_with_size():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300_000, generator=gen).requires_grad_()
    (g,) = first_derivative([x], 0.0, 1.0)
    exact = x.detach().double() / torch.linalg.vector_norm(x.detach().double())
    rel = ((g.detach().double() - exact).abs() / exact.abs()).max().item()
    assert rel <= 2.4e-7  # two float32 roundings; the old path reached 1.5e-6


@pytest.mark.parametrize("l2_squared", [False, True])
def test_hessian_vector_products_match_float64_autograd(l2_squared):
    gen = torch.Generator().manual_seed(5)
    params = random_params(gen, [(6, 5), (11,), (3, 2, 2)], dtype=torch.float64,
                           away_from_zero=True)
    vs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    grads = first_derivative(params, 0.3, 0.7, l2_squared)
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params)
    ref = penalty_float64(params, 0.3, 0.7, l2_squared=l2_squared)
    ref_grads = torch.autograd.grad(ref, params, create_graph=True)
    ref_hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(ref_grads, vs)), params)
    for h, r in zip(hvp, ref_hvp):
        torch.testing.assert_close(h, r, rtol=1e-12, atol=1e-14)


def test_float32_hessian_vector_products_match_float64():
    gen = torch.Generator().manual_seed(6)
    x = random_params(gen, [(1000,)], away_from_zero=True)[0]
    v = torch.randn(1000, generator=gen)
    (g,) = first_derivative([x], 0.0, 1.0)
    (hv,) = torch.autograd.grad((g * v).sum(), [x])
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(torch.linalg.vector_norm(x64), [x64], create_graph=True)
    (hv64,) = torch.autograd.grad((g64 * v.double()).sum(), [x64])
    torch.testing.assert_close(hv.double(), hv64, rtol=1e-5, atol=1e-9)


def test_gradgradcheck_with_frozen_and_repeated_parameters():
    gen = torch.Generator().manual_seed(7)
    a, b, c = random_params(gen, [(3, 4), (5,), (2, 2)], dtype=torch.float64,
                            away_from_zero=True)
    c.requires_grad_(False)
    for sq in (False, True):
        assert torch.autograd.gradgradcheck(
            lambda x, y: regext.fused_penalty([x, y, c, x], 0.2, 0.9, l2_squared=sq), (a, b))


def test_all_zero_tensor_has_zero_second_derivative_never_nan():
    z = torch.zeros(5, requires_grad=True)
    x = torch.randn(4, requires_grad=True)
    g_z, g_x = first_derivative([z, x], 0.0, 1.0)
    assert torch.equal(g_z.detach(), torch.zeros(5))
    (hz,) = torch.autograd.grad(g_z.sum(), [z], retain_graph=True)
    assert torch.equal(hz, torch.zeros(5))
    (hz, hx) = torch.autograd.grad((g_z * 3.0).sum() + g_x.sum(), [z, x])
    assert torch.equal(hz, torch.zeros(5)) and torch.isfinite(hx).all()


def test_nan_tensor_second_derivative_is_nan():
    x = torch.tensor([1.0, float("nan")], requires_grad=True)
    (g,) = first_derivative([x], 0.0, 1.0)
    (h,) = torch.autograd.grad(g.sum(), [x])
    assert torch.isnan(h).all()


def test_gradient_penalty_through_the_squared_form():
    """WGAN-GP style: a penalty on the norm of the penalty's own gradient."""
    gen = torch.Generator().manual_seed(8)
    params = random_params(gen, [(20,), (4, 4)], dtype=torch.float64, away_from_zero=True)
    grads = first_derivative(params, 0.1, 0.5, l2_squared=True)
    gp = sum(g.pow(2).sum() for g in grads)
    got = torch.autograd.grad(gp, params)
    ref = torch.autograd.grad(penalty_float64(params, 0.1, 0.5, l2_squared=True), params,
                              create_graph=True)
    want = torch.autograd.grad(sum(g.pow(2).sum() for g in ref), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_gradients_with_respect_to_coefficient_tensors():
    gen = torch.Generator().manual_seed(9)
    params = random_params(gen, [(5, 3), (4,)], dtype=torch.float64)
    l1 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    l2 = torch.tensor(0.7, dtype=torch.float32, requires_grad=True)
    for sq in (False, True):
        value = regext.fused_penalty(params, l1, l2, l2_squared=sq)
        d_l1, d_l2 = torch.autograd.grad(value, [l1, l2])
        ref = penalty_float64(params, l1, l2.double(), l2_squared=sq)
        r_l1, r_l2 = torch.autograd.grad(ref, [l1, l2])
        torch.testing.assert_close(d_l1, r_l1)
        torch.testing.assert_close(d_l2, r_l2)
        assert d_l2.dtype == torch.float32
