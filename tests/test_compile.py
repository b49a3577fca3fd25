"""fused_penalty and every operator under torch.compile(fullgraph=True): no graph
break, the same numbers as eager."""

import math

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


# ---- coefficients that change between calls (schedules, lr * l1) -------------------------

def _recompiles(fn, args_per_call, dynamic=None):
    """How many more graphs torch.compile(fn, fullgraph=True) compiles after its first
    call, over these calls; each result must equal eager's. (The first call may compile
    more than one graph: with float64 0-dim tensor inputs torch 2.13 compiles two.)"""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=dynamic)
    first = None
    for args in args_per_call:
        got, want = compiled(*args), fn(*args)
        first = counter.frame_count if first is None else first
        for g, w in zip(got if isinstance(got, (list, tuple)) else [got],
                        want if isinstance(want, (list, tuple)) else [want]):
            torch.testing.assert_close(g, w)
    return counter.frame_count - first


def _step(params, l1, l2, threshold):
    """A training step's regext calls: penalty value, gradients, proximal steps."""
    for p in params:
        p.grad = None
    value = regext.fused_penalty(params, l1, l2)
    added = regext.add_penalty_grad_(params, l1, l2, l2_squared=True)
    work = [p.detach().clone() for p in params]
    regext.prox_l1_(work, threshold)
    regext.prox_group_l2_(work, threshold)
    regext.prox_l2_squared_(work, threshold)
    return [value, added] + [p.grad for p in params] + work


@pytest.mark.parametrize("dynamic", [None, True])
def test_changing_float_coefficients_recompile_at_most_once(dynamic):
    params = [torch.randn(6, 5, requires_grad=True), torch.randn(9, requires_grad=True)]
    calls = [(params, 0.1 * k, 0.05 * k, 0.01 * k) for k in range(1, 5)]
    assert _recompiles(_step, calls, dynamic) <= (0 if dynamic else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_changing_tensor_coefficients_never_recompile(dtype):
    params = [torch.randn(6, 5, requires_grad=True), torch.randn(9, requires_grad=True)]
    calls = [(params, torch.tensor(0.1 * k, dtype=dtype), torch.tensor(0.05 * k, dtype=dtype),
              torch.tensor(0.01 * k, dtype=dtype)) for k in range(1, 5)]
    assert _recompiles(_step, calls) == 0


def test_penalty_with_a_changing_coefficient_under_compile():
    model = nn.Linear(5, 3)
    pen = regext.Penalty(model, l1=0.1, l2=0.2)

    def loss(scale):
        pen.l1 = scale
        return pen()

    assert _recompiles(loss, [(0.1 * k,) for k in range(1, 5)]) <= 1
    pen.l1 = torch.tensor(0.1)

    def loss_tensor():
        return pen()

    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_tensor, fullgraph=True, backend=counter)
    for k in range(1, 5):
        pen.l1.fill_(0.1 * k)  # a schedule updating the tensor in place
        torch.testing.assert_close(compiled(), regext.fused_penalty(model.parameters(),
                                                                    0.1 * k, 0.2))
    assert counter.frame_count == 1


# ---- schedules and error_if_nonfinite inside compiled steps (issue 20, items 3, 6) ---------

def _schedule_l1(step):
    return 1e-3 * step


def _schedule_l2(step):  # warm-up with min, piecewise decay, math: any Python body
    return 1e-2 * min(1.0, step / 10) * (0.5 if step > 50 else 1.0) * math.cos(step / 100)


@pytest.mark.parametrize("call", ["penalty", "add_grad_"])
def test_schedules_compile_at_most_twice_over_100_steps(call):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 1))
    ref = nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 1))
    ref.load_state_dict(model.state_dict())
    pen = regext.Penalty(model, l1=_schedule_l1, l2=_schedule_l2, exclude="*bias",
                         overrides={"1.*": {"l1": lambda s: 2e-3 * (s % 7)}})
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = (lambda: pen()) if call == "penalty" else (lambda: pen.add_grad_())
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    torch._dynamo.utils.counters.clear()
    for step in range(100):
        pen.step = step
        for p in model.parameters():
            p.grad = None
        got = compiled()
        l1, l2 = _schedule_l1(step), _schedule_l2(step)
        ref_pen = regext.Penalty(ref, l1=l1, l2=l2, exclude="*bias",
                                 overrides={"1.*": {"l1": 2e-3 * (step % 7)}})
        for p in ref.parameters():
            p.grad = None
        want = ref_pen() if call == "penalty" else ref_pen.add_grad_()
        assert torch.equal(got, want), step
        if call == "add_grad_":
            for p, q in zip(model.parameters(), ref.parameters()):
                assert (p.grad is None) == (q.grad is None) and (p.grad is None
                                                                 or torch.equal(p.grad, q.grad))
    # Compiled twice at most (Dynamo's own count of graphs it compiled).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_an_attached_schedule_in_a_compiled_step():
    """The optimizer's hooks advance pen.step between compiled calls of the loss."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch.manual_seed(6)
    model = nn.Linear(8, 3)
    ref = nn.Linear(8, 3)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(16, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    pen = regext.Penalty(model, l1=lambda s: 1e-2 * min(1.0, s / 5))
    pen.attach(opt, "prox")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    loss_fn = torch.compile(lambda: model(x).pow(2).mean(), fullgraph=True, backend=counter)
    for step in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        ref_opt.zero_grad()
        ref(x).pow(2).mean().backward()
        ref_opt.step()
        regext.Penalty(ref, l1=1e-2 * min(1.0, step / 5)).prox_(0.1)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("where", ["fused_penalty", "Penalty", "add_penalty_grad_"])
def test_error_if_nonfinite_under_fullgraph_compile(where):
    model = nn.Linear(4, 3)
    pen = regext.Penalty(model, l1=0.1, error_if_nonfinite=True)
    fn = {"fused_penalty": lambda: regext.fused_penalty(model.parameters(), 0.1,
                                                         error_if_nonfinite=True),
          "Penalty": lambda: pen(),
          "add_penalty_grad_": lambda: regext.add_penalty_grad_(model.parameters(), 0.1,
                                                                 error_if_nonfinite=True)}[where]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    model.zero_grad()
    torch.testing.assert_close(compiled(), regext.fused_penalty(model.parameters(), 0.1))
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    name = "weight" if where == "Penalty" else r"params\[0\]"
    with pytest.raises(RuntimeError, match=rf"{where}: the penalty is nan because {name} "
                                           rf"\(shape \(3, 4\), dtype torch.float32\) has a "
                                           rf"non-finite norm: it holds NaN"):
        compiled()
    for g, p in zip(grads, model.parameters()):  # nothing was written before the error
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
