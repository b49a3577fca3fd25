"""Property tests (hypothesis) for the in-place features on fresh random lists."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import regext  # noqa: E402
from regext.reference import (count_zeros_reference, prox_group_l2_reference,  # noqa: E402
                              prox_l1_reference)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def tensor_lists(draw, max_tensors=5):
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from(DTYPES))
    sizes = draw(st.lists(st.sampled_from([0, 1, 7, 16, 33, 1000, 40_000, 70_001]),
                          min_size=1, max_size=max_tensors))
    zero_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        x[torch.rand(n, generator=gen) < zero_fraction] = 0.0
        out.append(x.to(dtype))
    # Sometimes the same tensor twice, to exercise the list-order runs.
    if draw(st.booleans()):
        out.append(out[draw(st.integers(0, len(out) - 1))])
    return out


SETTINGS = settings(max_examples=30, deadline=None)


@SETTINGS
@given(tensor_lists(), st.sampled_from([0.0, 0.01, 0.5, 2.0]))
def test_prox_l1_equals_its_reference_definition(params, threshold):
    expected = [p.clone() for p in params]
    # Rebuild the aliasing of the input in the copy: duplicates share one tensor.
    ids = {}
    for i, p in enumerate(params):
        ids.setdefault(id(p), i)
    expected = [expected[ids[id(p)]] for p in params]
    prox_l1_reference(expected, threshold)
    regext.prox_l1_(params, threshold)
    for p, e in zip(params, expected):
        assert torch.equal(p, e)


@SETTINGS
@given(tensor_lists(), st.sampled_from([0.0, 0.5, 20.0, 500.0]))
def test_prox_group_l2_is_close_to_its_reference_definition(params, threshold):
    ids = {}
    for i, p in enumerate(params):
        ids.setdefault(id(p), i)
    copies = [p.clone() for p in params]
    expected = [copies[ids[id(p)]] for p in params]
    prox_group_l2_reference(expected, threshold)
    regext.prox_group_l2_(params, threshold)
    for p, e in zip(params, expected):
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(p.dtype, 1e-2)
        torch.testing.assert_close(p, e, rtol=tol, atol=0)


@SETTINGS
@given(tensor_lists())
def test_count_zeros_equals_torch(params):
    assert torch.equal(torch.ops.regext.count_zeros(params), count_zeros_reference(params))


@SETTINGS
@given(tensor_lists(max_tensors=4), st.sampled_from([(0.3, 0.7), (0.0, 1.0), (1.0, 0.0)]),
       st.booleans(), st.lists(st.booleans(), min_size=6, max_size=6))
def test_add_penalty_grad_equals_autograd(params, coefs, l2_squared, has_grad):
    l1, l2 = coefs
    leaves, ref = [], []
    made = {}
    for i, p in enumerate(params):
        if id(p) not in made:
            a = p.clone().requires_grad_()
            b = p.clone().requires_grad_()
            if has_grad[i % len(has_grad)]:
                a.grad = torch.ones_like(a)
                b.grad = torch.ones_like(b)
            made[id(p)] = (a, b)
        leaves.append(made[id(p)][0])
        ref.append(made[id(p)][1])
    value = regext.add_penalty_grad_(leaves, l1, l2, l2_squared=l2_squared)
    expected = regext.fused_penalty(ref, l1, l2, l2_squared=l2_squared)
    expected.backward()
    torch.testing.assert_close(value, expected.detach())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(params[0].dtype, 2e-2)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)


def test_cuda_stand_ins_are_registered_where_no_compiled_kernel_exists():
    for name in ("prox_l1_", "prox_group_l2_", "count_zeros"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"regext::{name}", "CUDA")
