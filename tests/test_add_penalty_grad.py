"""add_penalty_grad_: the same gradients as adding fused_penalty to the loss, in place."""

import math

import pytest
import torch
from torch import nn

import regext
from regext.reference import penalty_float64, penalty_loop

from conftest import TOLERANCES, grads_of, random_params, scalar

SHAPES = [(7, 5), (300,), (0,), (3, 4, 5), (1,), (70_000,)]  # last one spans chunks


def _with_random_grads(gen, params):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)
    return params


def _clone_leaves(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_(p.requires_grad)
        if p.grad is not None:
            q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("l2_squared", [False, True])
@pytest.mark.parametrize("l1, l2", [(0.3, 0.7), (0.0, 0.5), (0.4, 0.0)])
def test_same_grads_as_fused_penalty_in_the_loss(device, gen, dtype, l2_squared, l1, l2):
    ours = _with_random_grads(gen, random_params(gen, SHAPES, dtype=dtype, device=device))
    ref = _clone_leaves(ours)
    value = regext.add_penalty_grad_(ours, l1, l2, l2_squared=l2_squared)
    expected = regext.fused_penalty(ref, l1, l2, l2_squared=l2_squared)
    expected.backward()  # accumulates into the existing .grad
    rtol, atol = TOLERANCES[dtype]
    assert value.dtype == expected.dtype and value.device == expected.device
    assert value.dim() == 0 and not value.requires_grad and value.grad_fn is None
    torch.testing.assert_close(value, expected.detach(), rtol=rtol, atol=atol)
    for p, q in zip(ours, ref):
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("l2_squared", [False, True])
def test_matches_loop_and_float64(device, gen, l2_squared):
    params = random_params(gen, SHAPES, device=device)
    value = regext.add_penalty_grad_(params, 0.2, 0.9, l2_squared=l2_squared)
    loop = penalty_loop(params, 0.2, 0.9, l2_squared=l2_squared)
    exact = penalty_float64(params, 0.2, 0.9, l2_squared=l2_squared)
    torch.testing.assert_close(value, loop.detach(), rtol=1e-5, atol=1e-6)
    assert abs(value.item() - exact.item()) <= 1e-6 * abs(exact.item())
    for p, g_loop, g_exact in zip(params, grads_of(loop, params), grads_of(exact, params)):
        torch.testing.assert_close(p.grad, g_loop, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.grad, g_exact, rtol=1e-5, atol=1e-6)


def test_missing_grads_are_created_with_the_parameter_layout(device, gen):
    base = random_params(gen, [(6, 8), (2, 3, 4, 5), (5,)], device=device, requires_grad=False)
    params = [base[0].t().detach().requires_grad_(),  # transposed, dense
              base[1].to(memory_format=torch.channels_last).requires_grad_(),
              base[2].clone().requires_grad_()]
    params[2].grad = torch.ones_like(params[2])  # one existing, two missing
    ref = _clone_leaves(params)
    regext.add_penalty_grad_(params, 0.1, 0.3)
    regext.fused_penalty(ref, 0.1, 0.3).backward()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad, q.grad)
    assert params[0].grad.stride() == params[0].stride()
    assert params[1].grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_non_contiguous_parameters_and_gradients(device, gen):
    big = random_params(gen, [(10, 12)], device=device, requires_grad=False)[0]
    views = [big[::2, 1::3].detach().requires_grad_(), big[:, 5].detach().requires_grad_()]
    views[0].grad = torch.randn(4, 5, generator=gen).to(device).t()  # non-contiguous grad
    ref = _clone_leaves(views)
    regext.add_penalty_grad_(views, 0.3, 0.4)
    regext.fused_penalty(ref, 0.3, 0.4).backward()
    for p, q in zip(views, ref):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("existing", [False, True])
def test_tensor_listed_twice_gets_twice_the_gradient(device, gen, existing):
    a, b = random_params(gen, [(300, 300), (5,)], device=device)  # a: parallel chunks
    if existing:
        _with_random_grads(gen, [a, b])
    ref_a, ref_b = _clone_leaves([a, b])
    value = regext.add_penalty_grad_([a, b, a], 0.3, 0.5)
    expected = regext.fused_penalty([ref_a, ref_b, ref_a], 0.3, 0.5)
    expected.backward()
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(a.grad, ref_a.grad)
    torch.testing.assert_close(b.grad, ref_b.grad)


def test_accumulate_op_applies_a_repeated_gradient_in_order(gen):
    # Many copies of one big gradient: without list-order processing the
    # concurrent read-modify-writes of one parallel pass lose updates.
    p = torch.randn(200_000, generator=gen)
    g = torch.zeros_like(p)
    _, stats = torch.ops.regext.penalty_forward([p] * 8, scalar(1.0), scalar(0.0), False)
    torch.ops.regext.penalty_grad_accumulate_([g] * 8, [p] * 8, stats, scalar(1.0), scalar(0.0), False)
    assert torch.equal(g, 8 * p.sign())


def test_frozen_parameters_count_in_value_but_keep_their_grad(device, gen):
    a, b, c = random_params(gen, [(4, 4), (6,), (2, 5)], device=device)
    b.requires_grad_(False)
    b.grad = None
    value = regext.add_penalty_grad_([a, b, c], 0.3, 0.2)
    torch.testing.assert_close(value, penalty_loop([a, b, c], 0.3, 0.2).detach())
    assert b.grad is None
    ra, rc = grads_of(penalty_loop([a, b, c], 0.3, 0.2), [a, c])
    torch.testing.assert_close(a.grad, ra)
    torch.testing.assert_close(c.grad, rc)


def test_empty_zero_element_and_all_zero_tensors(device):
    empty = regext.add_penalty_grad_([], 0.5, 0.5)
    assert empty.dim() == 0 and empty.item() == 0.0 and empty.dtype == torch.float32
    z = torch.zeros(4, 3, device=device, requires_grad=True)
    e = torch.zeros(0, 3, device=device, requires_grad=True)
    value = regext.add_penalty_grad_(iter([z, e]), 0.5, 0.5)
    assert value.item() == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z)) and e.grad.shape == (0, 3)


def test_params_are_never_modified_and_grads_version_bumped(device, gen):
    params = _with_random_grads(gen, random_params(gen, [(5, 5), (7,)], device=device))
    before = [p.detach().clone() for p in params]
    versions = [p.grad._version for p in params]
    regext.add_penalty_grad_(params, 0.2, 0.2)
    for p, b, v in zip(params, before, versions):
        assert torch.equal(p.detach(), b)
        assert p.grad._version > v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("l2_squared", [False, True])
def test_half_types(device, gen, dtype, l2_squared):
    params = _with_random_grads(gen, random_params(gen, [(64, 33), (1000,)], dtype=dtype,
                                                   device=device))
    ref = _clone_leaves(params)
    value = regext.add_penalty_grad_(params, 0.01, 0.1, l2_squared=l2_squared)
    expected = regext.fused_penalty(ref, 0.01, 0.1, l2_squared=l2_squared)
    expected.backward()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected.detach())
    rtol, atol = TOLERANCES[dtype]
    for p, q in zip(params, ref):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol)


def test_mixed_dtypes_give_float64_value(device, gen):
    a = random_params(gen, [(4, 4)], dtype=torch.float32, device=device)[0]
    b = random_params(gen, [(5,)], dtype=torch.float64, device=device)[0]
    value = regext.add_penalty_grad_([a, b], 0.1, 0.2)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, penalty_float64([a, b], 0.1, 0.2).detach())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_inf_propagate_like_autograd(device, bad):
    p = torch.tensor([1.0, bad, -2.0], device=device, requires_grad=True)
    q = torch.tensor([0.5, -0.25], device=device, requires_grad=True)
    value = regext.add_penalty_grad_([p, q], 0.5, 0.5)
    loop = penalty_loop([p, q], 0.5, 0.5)
    assert not math.isfinite(value.item())
    for t, g in zip([p, q], grads_of(loop, [p, q])):
        torch.testing.assert_close(t.grad, g, equal_nan=True)


def test_bitwise_identical_across_thread_counts():
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in (3, 100_000, 1_000_000)]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            for p in params:
                p.grad = torch.ones_like(p)
            value = regext.add_penalty_grad_(params, 0.3, 0.7)
            results.append((value, [p.grad.clone() for p in params]))
    finally:
        torch.set_num_threads(old)
    for value, grads in results[1:]:
        assert torch.equal(value, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


def test_training_steps_match_penalty_in_the_loss(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    ref = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(5):
        x = torch.randn(4, 8, device=device)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        regext.add_penalty_grad_(model.parameters(), 1e-2, 1e-1)
        opt.step()
        ref_opt.zero_grad()
        (ref(x).pow(2).mean() + regext.fused_penalty(ref.parameters(), 1e-2, 1e-1)).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_no_graph_and_no_grad_of_grad_even_with_grad_mode_on(device, gen):
    params = random_params(gen, [(3, 3)], device=device)
    with torch.enable_grad():
        value = regext.add_penalty_grad_(params, 0.1, 0.1)
    assert value.grad_fn is None and params[0].grad.grad_fn is None


# ---- bad input: raised before any gradient is touched ------------------------------------

def _good(device):
    a = torch.randn(3, device=device, requires_grad=True)
    a.grad = torch.ones(3, device=device)
    b = torch.randn(2, 2, device=device, requires_grad=True)
    return a, b


@pytest.mark.parametrize("name", ["l1", "l2"])
@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan, "0.1", None, True])
def test_bad_coefficient(name, bad):
    a, b = _good("cpu")
    with pytest.raises(ValueError, match=rf"add_penalty_grad_: {name} must be a finite number"):
        regext.add_penalty_grad_([a, b], **{"l1": 0.1, "l2": 0.1, name: bad})
    assert torch.equal(a.grad, torch.ones(3)) and b.grad is None


@pytest.mark.parametrize("bad, error, pattern", [
    (torch.arange(4), TypeError, r"params\[2\] has dtype torch.int64"),
    ([1.0], TypeError, r"params\[2\] is a list, not a Tensor"),
    (torch.randn(4, 4).to_sparse(), TypeError, r"params\[2\] has layout torch.sparse_coo"),
])
def test_bad_element_late_in_list(bad, error, pattern):
    a, b = _good("cpu")
    with pytest.raises(error, match=pattern):
        regext.add_penalty_grad_([a, b, bad], 0.1, 0.1)
    assert torch.equal(a.grad, torch.ones(3)) and b.grad is None


def test_bad_existing_grads_raise_before_anything_is_written():
    a, b = _good("cpu")
    sparse = torch.randn(4, 4, requires_grad=True)
    sparse.grad = torch.zeros(4, 4).to_sparse()
    with pytest.raises(TypeError, match=r"params\[2\]\.grad has layout torch.sparse_coo"):
        regext.add_penalty_grad_([a, b, sparse], 0.1, 0.1)
    expanded = torch.randn(5, requires_grad=True)
    expanded.grad = torch.zeros(1).expand(5)
    with pytest.raises(ValueError, match=r"params\[2\]\.grad has overlapping memory"):
        regext.add_penalty_grad_([a, b, expanded], 0.1, 0.1)
    assert torch.equal(a.grad, torch.ones(3)) and b.grad is None


@pytest.mark.parametrize("data, error, pattern", [
    (torch.zeros(3, dtype=torch.float64), TypeError,
     r"params\[1\]\.grad has dtype torch.float32 but params\[1\] has dtype torch.float64"),
    (torch.zeros(4), ValueError, r"params\[1\]\.grad has shape \(3,\) but params\[1\] has shape"),
])
def test_mismatched_existing_grad(data, error, pattern):
    # torch checks a .grad when it is assigned, but replacing the parameter's
    # .data afterwards (as hand-rolled dtype/device casts do) skips the check.
    a, _ = _good("cpu")
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.zeros(3)
    p.data = data
    with pytest.raises(error, match=pattern):
        regext.add_penalty_grad_([a, p], 0.1, 0.1)
    assert torch.equal(a.grad, torch.ones(3))
