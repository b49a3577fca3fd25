"""prox_l1_ and prox_group_l2_: in-place proximal steps, exact zeros, list-order semantics."""

import math

import pytest
import torch

import regext
from regext.reference import prox_group_l2_reference, prox_l1_reference

from conftest import random_params, scalar

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(7, 5), (300,), (0,), (3, 4, 5), (1,), (70_000,)]


def soft_threshold_float64(x, t):
    x = x.double()
    return x.sign() * (x.abs() - t).clamp(min=0)


def group_shrink_float64(x, t):
    x = x.double()
    norm = torch.linalg.vector_norm(x)
    return x * (1 - t / norm).clamp(min=0) if norm > 0 else x


def _copies(params):
    return [p.detach().clone() for p in params]


# ---- prox_l1_ -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.7])
def test_prox_l1_matches_formula_and_reference_kernel(device, gen, dtype, threshold):
    params = random_params(gen, SHAPES, dtype=dtype, device=device, requires_grad=False)
    expected = [soft_threshold_float64(p, threshold) for p in params]
    reference = _copies(params)
    prox_l1_reference(reference, threshold)
    regext.prox_l1_(params, threshold)
    for p, e, r in zip(params, expected, reference):
        assert p.dtype == dtype
        assert torch.equal(p, r)  # bit for bit: the torch-op definition of the operator
        tol = {torch.float64: 1e-15, torch.float32: 1e-6}.get(dtype, 1e-2)
        torch.testing.assert_close(p.double(), e, rtol=tol, atol=tol)


def test_prox_l1_gives_exact_zeros_and_keeps_signs(device):
    x = torch.tensor([-2.0, -0.5, -0.1, 0.0, -0.0, 0.1, 0.5, 0.50001, 3.0], device=device)
    regext.prox_l1_([x], 0.5)
    assert x.tolist() == pytest.approx([-1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1e-5, 2.5],
                                       abs=1e-6)
    assert (x[1:7] == 0).all() and not torch.signbit(x[1:7]).any()  # +0, not -0
    assert regext.sparsity([x]) == pytest.approx(6 / 9)


def test_prox_l1_threshold_zero_changes_no_value(device, gen):
    (p,) = random_params(gen, [(100,)], device=device, requires_grad=False)
    before = p.clone()
    regext.prox_l1_([p], 0.0)
    assert torch.equal(p, before)


def test_prox_l1_nan_and_inf(device):
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.2, -4.0], device=device)
    regext.prox_l1_([x], 1.0)
    assert math.isnan(x[0]) and x[1] == math.inf and x[2] == -math.inf
    assert x[3:].tolist() == [0.0, -3.0]


@pytest.mark.parametrize("op", ["prox_l1_", "prox_group_l2_"])
def test_non_contiguous_views_are_updated_in_place(device, gen, op):
    base = random_params(gen, [(10, 12)], device=device, requires_grad=False)[0]
    original = base.clone()
    views = [base[::2, 1::3], base[1::2, :].t()]  # disjoint, not dense / transposed
    expected = _copies(views)
    getattr(regext.reference, f"{op}reference")(expected, 0.4)
    getattr(regext, op)(views, 0.4)
    for v, e in zip(views, expected):
        assert torch.equal(v, e)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[::2, 1::3] = False
    untouched[1::2, :] = False
    assert torch.equal(base[untouched], original[untouched])


def test_channels_last_stays_channels_last(device, gen):
    x = random_params(gen, [(2, 3, 4, 5)], device=device, requires_grad=False)[0]
    x = x.to(memory_format=torch.channels_last)
    expected = soft_threshold_float64(x, 0.5).float()
    regext.prox_l1_([x], 0.5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, expected)


def test_tensor_listed_twice_is_thresholded_twice(device, gen):
    # List order, as one call per tensor: [a, a] with t equals a once with 2t
    # (|x| - t - t == |x| - 2t exactly here: the values are multiples of 1/8).
    a = (torch.randint(-40, 40, (200_000,), generator=gen) / 8.0).to(device)
    b = a.clone()
    regext.prox_l1_([a, a], 0.25)
    regext.prox_l1_([b], 0.5)
    assert torch.equal(a, b)


def test_overlapping_views_apply_in_list_order(device, gen):
    w = random_params(gen, [(50, 40)], device=device, requires_grad=False)[0]
    expected = w.clone()
    prox_l1_reference([expected, expected[0], expected[:, :3]], 0.2)
    regext.prox_l1_([w, w[0], w[:, :3]], 0.2)
    assert torch.equal(w, expected)


def test_leaf_parameters_requiring_grad(device, gen):
    params = random_params(gen, [(5, 5), (8,)], device=device)
    versions = [p._version for p in params]
    with torch.enable_grad():
        regext.prox_l1_(params, 0.3)
    for p, v in zip(params, versions):
        assert p.requires_grad and p.is_leaf and p.grad_fn is None
        assert p._version > v


def test_modifying_a_tensor_saved_for_backward_is_caught(device, gen):
    (p,) = random_params(gen, [(6,)], device=device)
    y = (p * p).sum()  # saves p
    regext.prox_l1_([p], 0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_raw_operator_refuses_grad_mode_leaf_update(gen):
    (p,) = random_params(gen, [(6,)])
    with pytest.raises(RuntimeError, match="requires grad and grad mode is on"):
        torch.ops.regext.prox_l1_([p], scalar(0.1))
    with torch.no_grad():
        torch.ops.regext.prox_l1_([p], scalar(0.1))


def test_bitwise_identical_across_thread_counts():
    gen = torch.Generator().manual_seed(3)
    source = [torch.randn(n, generator=gen) for n in (5, 100_000, 1_000_000)]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a, b = _copies(source), _copies(source)
            regext.prox_l1_(a, 0.3)
            regext.prox_group_l2_(b, 50.0)
            results.append(a + b)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_proximal_gradient_finds_exact_zeros_where_subgradient_does_not():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 30, generator=gen)
    w_true = torch.zeros(30)
    w_true[:4] = torch.tensor([2.0, -3.0, 1.5, 1.0])
    y = X @ w_true + 0.1 * torch.randn(200, generator=gen)
    lr, l1 = 0.05, 0.1
    w_prox = torch.zeros(30, requires_grad=True)
    w_sub = torch.zeros(30, requires_grad=True)
    for _ in range(300):
        for w, prox in ((w_prox, True), (w_sub, False)):
            w.grad = None
            (X @ w - y).pow(2).mean().div(2).backward()
            if not prox:
                regext.add_penalty_grad_([w], l1)
            with torch.no_grad():
                w -= lr * w.grad
            if prox:
                regext.prox_l1_([w], lr * l1)
    assert regext.sparsity([w_prox]) >= 0.7  # most of the 26 noise features exactly 0
    assert regext.sparsity([w_sub]) == 0.0  # jitters around zero, never hits it
    assert (w_prox[:4] != 0).all()


# ---- prox_group_l2_ -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 1.0, 25.0])
def test_prox_group_l2_matches_formula_and_reference_kernel(device, gen, dtype, threshold):
    params = random_params(gen, SHAPES, dtype=dtype, device=device, requires_grad=False)
    expected = [group_shrink_float64(p, threshold) for p in params]
    reference = _copies(params)
    prox_group_l2_reference(reference, threshold)
    regext.prox_group_l2_(params, threshold)
    for p, e, r in zip(params, expected, reference):
        assert p.dtype == dtype
        tol = {torch.float64: 1e-14, torch.float32: 1e-6}.get(dtype, 1e-2)
        torch.testing.assert_close(p, r, rtol=tol, atol=0)  # float64 sums in another order
        torch.testing.assert_close(p.double(), e, rtol=tol, atol=tol)


def test_prox_group_l2_switches_small_groups_off_and_shrinks_big_ones(device):
    small = torch.tensor([0.3, -0.4], device=device)          # norm 0.5
    big = torch.tensor([3.0, -4.0], device=device)            # norm 5
    zero = torch.zeros(3, device=device)
    regext.prox_group_l2_([small, big, zero], 1.0)
    assert torch.equal(small, torch.zeros(2, device=device))
    torch.testing.assert_close(big, torch.tensor([2.4, -3.2], device=device))
    assert torch.equal(zero, torch.zeros(3, device=device))
    regext.prox_group_l2_([zero], 0.0)
    assert torch.equal(zero, torch.zeros(3, device=device))


def test_prox_group_l2_leaves_non_finite_tensors_unchanged(device):
    nan = torch.tensor([1.0, math.nan, 2.0], device=device)
    inf = torch.tensor([1.0, math.inf, 2.0], device=device)
    ok = torch.tensor([3.0, 4.0], device=device)
    regext.prox_group_l2_([nan, inf, ok], 1.0)
    assert nan[0] == 1.0 and math.isnan(nan[1]) and nan[2] == 2.0
    assert inf.tolist() == [1.0, math.inf, 2.0]
    torch.testing.assert_close(ok, torch.tensor([2.4, 3.2], device=device))


def test_prox_group_l2_listed_twice_shrinks_twice(device, gen):
    a = random_params(gen, [(300, 300)], device=device, requires_grad=False)[0]
    expected = a.clone()
    prox_group_l2_reference([expected, expected], 30.0)
    regext.prox_group_l2_([a, a], 30.0)
    torch.testing.assert_close(a, expected, rtol=1e-6, atol=0)


def test_prox_group_l2_half_norm_does_not_overflow(device):
    p = torch.full((4096,), 200.0, dtype=torch.float16, device=device)  # sum x^2 > 65504
    regext.prox_group_l2_([p], 0.5 * 200.0 * 64)  # norm 12800: halves every element
    assert torch.equal(p, torch.full_like(p, 100.0))


# ---- errors: before anything is modified ----------------------------------------------------

@pytest.mark.parametrize("op", ["prox_l1_", "prox_group_l2_"])
@pytest.mark.parametrize("bad", [-0.1, math.inf, -math.inf, math.nan, "0.1", None, True])
def test_bad_threshold(op, bad):
    p = torch.randn(5)
    before = p.clone()
    with pytest.raises(ValueError, match=rf"{op}: threshold must be a finite number >= 0"):
        getattr(regext, op)([p], bad)
    assert torch.equal(p, before)


@pytest.mark.parametrize("op", ["prox_l1_", "prox_group_l2_"])
@pytest.mark.parametrize("bad, error, pattern", [
    (torch.arange(4), TypeError, r"params\[2\] has dtype torch.int64"),
    (torch.randn(3, dtype=torch.complex64), TypeError, r"params\[2\] has dtype torch.complex64"),
    ("w", TypeError, r"params\[2\] is a str, not a Tensor"),
    (torch.zeros(1).expand(4), ValueError, r"params\[2\] has overlapping memory"),
])
def test_bad_element_late_in_list(op, bad, error, pattern):
    good = [torch.randn(30), torch.randn(4, 4)]
    before = _copies(good)
    with pytest.raises(error, match=pattern):
        getattr(regext, op)(good + [bad], 0.5)
    assert all(torch.equal(p, b) for p, b in zip(good, before))


@pytest.mark.parametrize("op", ["prox_l1_", "prox_group_l2_"])
def test_raw_operators_check_too(op):
    good = torch.randn(30)
    before = good.clone()
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        getattr(torch.ops.regext, op)([good], scalar(-1.0))
    with pytest.raises(ValueError, match=r"params\[1\] has overlapping memory"):
        getattr(torch.ops.regext, op)([good, torch.zeros(1).expand(3)], scalar(0.5))
    with pytest.raises(TypeError, match=r"params\[1\] has dtype Long"):
        getattr(torch.ops.regext, op)([good, torch.arange(3)], scalar(0.5))
    assert torch.equal(good, before)


def test_single_tensor_and_empty_list():
    with pytest.raises(TypeError, match="single Tensor"):
        regext.prox_l1_(torch.randn(3), 0.1)
    regext.prox_l1_([], 0.1)
    regext.prox_group_l2_(iter(()), 0.1)


# ---- operator registration ------------------------------------------------------------------

def test_compiled_proximal_step_fullgraph(device, gen):
    params = random_params(gen, [(20, 10), (10,)], device=device, requires_grad=False)
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    eager = _copies(params)

    def step(ps, gs):
        torch._foreach_add_(ps, gs, alpha=-0.1)
        regext.prox_l1_(ps, 0.05)
        regext.prox_group_l2_(ps, 0.5)

    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(params, grads)
    step(eager, grads)
    for p, e in zip(params, eager):
        torch.testing.assert_close(p, e)
