"""The per-call fast path (regext._fastpath, issue 24) gives exactly what the general
path gives: the same bits for values and gradients, the same errors with the same
text, nothing written when it refuses; numbers cached as coefficients never leak."""

import pytest
import torch
from torch import nn

import regext
from regext import _fastpath

SHAPES = [(5, 3), (7,), (0,), (2, 3, 4), (1,), (33, 2)]


def params_of(seed, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16)):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtypes[i % len(dtypes)])
        out.append(x.requires_grad_())
    out.append(torch.randn(6, 4, generator=gen).t().requires_grad_())  # non-contiguous
    out.append(out[0])  # a duplicate counts twice
    return out


@pytest.fixture
def general_path(monkeypatch):
    """Runs a function with the fast path closed (the general path only)."""
    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(_fastpath, "open_now", lambda: False)
            return fn()
    return run


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("l2_squared", [False, True])
def test_fused_penalty_value_and_gradients_are_the_general_paths(seed, l2_squared,
                                                                 general_path):
    params = params_of(seed)
    fast = regext.fused_penalty(params, 0.3, 0.7, l2_squared=l2_squared)
    fast_grads = torch.autograd.grad(fast, params[:-1])
    slow = general_path(lambda: regext.fused_penalty(params, 0.3, 0.7, l2_squared=l2_squared))
    slow_grads = torch.autograd.grad(slow, params[:-1])
    assert torch.equal(fast, slow) and fast.dtype == slow.dtype
    for a, b in zip(fast_grads, slow_grads):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(regext.fused_penalty(iter(params), 0.3, 0.7, l2_squared=l2_squared),
                           slow)


@pytest.mark.parametrize("seed", range(3))
def test_add_penalty_grad_is_the_general_paths(seed, general_path):
    results = []
    for path in (lambda f: f(), general_path):
        params = params_of(seed)
        for p in params:
            p.grad = torch.ones_like(p) * 0.5
        value = path(lambda: regext.add_penalty_grad_(params, 0.2, 0.4))
        results.append((value, [p.grad.clone() for p in params]))
    (v1, g1), (v2, g2) = results
    assert torch.equal(v1, v2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_penalty_object_is_the_general_paths(general_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    pen = regext.Penalty(model, l1=0.1, l2=lambda step: 0.05 * (step + 1),
                         overrides={"2.*": {"l1": torch.tensor(0.3)}})
    model[0].bias.requires_grad_(False)  # frozen: left out on both paths
    pen.step = 3
    assert torch.equal(pen(), general_path(pen))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    fast = pen.add_grad_()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    slow = general_path(pen.add_grad_)
    assert torch.equal(fast, slow)
    for a, p in zip(fast_grads, model.parameters()):
        assert torch.equal(a, p.grad)


def test_errors_keep_their_text_and_nothing_is_written():
    params = params_of(0, dtypes=(torch.float32,))
    for p in params:
        p.grad = torch.zeros_like(p)
    before = [p.grad.clone() for p in params]
    # The operators refuse these; the general path names them.
    with pytest.raises(ValueError, match=r"regext::penalty_forward: l1 must be a finite number "
                                         r">= 0, got -1"):
        regext.fused_penalty(params, torch.tensor(-1.0), 0.1)
    params[1].grad = torch.zeros(1).expand(7)  # the operator refuses overlapping memory
    with pytest.raises(ValueError, match=r"add_penalty_grad_: params\[1\].grad has overlapping "
                                         r"memory \(an expanded tensor, shape \(7,\)"):
        regext.add_penalty_grad_(params, 0.1, 0.1)
    for i, (p, b) in enumerate(zip(params, before)):
        if i != 1:
            assert torch.equal(p.grad, b), f"params[{i}].grad was written"
    # The checks in Python run first: a bad element starts no operator.
    with pytest.raises(TypeError, match=r"fused_penalty: params\[1\] has dtype torch.int64"):
        regext.fused_penalty([torch.randn(2), torch.arange(3)], 0.1)
    with pytest.raises(ValueError, match=r"fused_penalty: l1 must be a finite number >= 0, "
                                         r"got -0.5"):
        regext.fused_penalty([torch.randn(2)], -0.5)


def test_cached_coefficients_are_private_and_bounded():
    x = [torch.randn(4, requires_grad=True)]
    a = regext.fused_penalty(x, 0.25, 0.0)
    b = regext.fused_penalty(x, 0.25, 0.0)
    assert torch.equal(a, b)
    held = _fastpath.number_coefficient(0.25)
    assert held.dtype == torch.float64 and not held.requires_grad and float(held) == 0.25
    for k in range(2 * _fastpath._MAX_CACHED):  # a schedule's many values
        regext.fused_penalty(x, 1e-3 * k, 0.0)
    assert len(_fastpath._COEFFICIENTS) <= _fastpath._MAX_CACHED
    for bad in (-1.0, float("nan"), float("inf"), True):
        assert _fastpath.number_coefficient(bad) is None
