"""Bitwise reproducibility across calls and thread counts; accuracy on big tensors."""

import pytest
import torch

import regext
from regext.reference import penalty_float64

from conftest import grads_of


def _run(params):
    out = regext.fused_penalty(params, 0.3, 0.7)
    return out, grads_of(out, params)


def test_bitwise_identical_across_thread_counts_and_calls():
    gen = torch.Generator().manual_seed(5)
    sizes = [int(s) for s in torch.randint(1, 200_000, (40,), generator=gen)] + [3_000_000]
    params = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            results.append(_run(params))
    finally:
        torch.set_num_threads(old)
    first_value, first_grads = results[0]
    for value, grads in results[1:]:
        assert torch.equal(value, first_value)
        for a, b in zip(grads, first_grads):
            assert torch.equal(a, b)


def test_float32_accuracy_on_20M_elements():
    gen = torch.Generator().manual_seed(11)
    p = torch.rand(20_000_000, generator=gen) + 0.5  # all positive: worst case for naive sums
    exact_l1 = p.double().sum().item()
    exact_l2 = p.double().pow(2).sum().sqrt().item()
    l1_val = regext.fused_penalty([p], 1.0, 0.0).item()
    l2_val = regext.fused_penalty([p], 0.0, 1.0).item()
    assert abs(l1_val - exact_l1) / exact_l1 <= 1e-6
    assert abs(l2_val - exact_l2) / exact_l2 <= 1e-6
    exact = penalty_float64([p], 1e-3, 1e-2).item()
    both = regext.fused_penalty([p], 1e-3, 1e-2).item()
    assert abs(both - exact) / exact <= 1e-6
