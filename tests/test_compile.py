"""fused_penalty and every operator under torch.compile(fullgraph=True): no graph
break, the same numbers as eager."""

import pytest
import torch
from torch import nn

import regext

from op_samples import cases, flatten, outcome, sample


@pytest.mark.parametrize("name, index", cases(first_only=True))
def test_every_operator_compiles_fullgraph(name, index):
    args = sample(name, index)
    op = getattr(torch.ops.regext, name)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")
    got, want = flatten(outcome(name, compiled, args)), flatten(outcome(name, op, args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_compiled_training_step_matches_eager(device):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
    x = torch.randn(8, 16, device=device)

    def loss_fn(m, inp):
        return m(inp).pow(2).mean() + regext.fused_penalty(m.parameters(), 1e-2, 1e-1)

    def step(fn, m, inp):  # the backward of the compiled graph is AOT-compiled too
        loss = fn(m, inp)
        loss.backward()
        return loss

    eager_model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
    eager_model.load_state_dict(model.state_dict())

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss_c = step(compiled, model, x)
    loss_e = step(loss_fn, eager_model, x)
    torch.testing.assert_close(loss_c, loss_e)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_compiled_penalty_inductor_fullgraph(device):
    torch.manual_seed(4)
    params = [torch.randn(5, 3, device=device, requires_grad=True),
              torch.randn(7, device=device, requires_grad=True)]

    def penalty(ps):
        return regext.fused_penalty(ps, 0.2, 0.3, l2_squared=True) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(penalty, fullgraph=True)
    out = compiled(params)
    ref = penalty(params)
    torch.testing.assert_close(out, ref)
    g_c = torch.autograd.grad(out, params)
    g_e = torch.autograd.grad(ref, params)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)
