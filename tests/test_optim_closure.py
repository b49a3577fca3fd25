"""Penalty.attach with optimizers stepped through a closure (LBFGS; Lightning's
automatic optimization steps every optimizer so), optimizer wrappers, and attaching
twice (issue 20, items 4 and 6)."""

import pytest
import torch
from torch import nn

import regext

L1, L2 = 3e-2, 5e-2


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def data(seed=1, n=4):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen, dtype=torch.float64),
             torch.randn(8, 3, generator=gen, dtype=torch.float64)) for _ in range(n)]


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True),
    "lbfgs": lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4, history_size=3),
}


def train(kind, penalize_in_loss, seed=0):
    """Steps with opt.step(closure): the penalty either attached in grad mode, or
    added to the loss by hand (the loop regext replaces). Returns the weights and the
    losses step() returned."""
    model = make_model(seed).double()
    opt = OPTIMIZERS[kind](model.parameters())
    pen = regext.Penalty(model, l1=L1, l2=L2, exclude="*bias")
    if not penalize_in_loss:
        pen.attach(opt, "grad")
    returned = []
    for x, y in data():
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if penalize_in_loss:
                loss = loss + L1 * sum(p.abs().sum() for p in pen.parameters()) \
                    + L2 * sum(torch.linalg.vector_norm(p) for p in pen.parameters())
            loss.backward()
            return loss
        returned.append(float(opt.step(closure)))
    return [p.detach().clone() for p in model.parameters()], returned, pen


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_grad_mode_with_a_closure_equals_the_penalty_in_the_loss(kind):
    got, got_losses, pen = train(kind, penalize_in_loss=False)
    want, want_losses, _ = train(kind, penalize_in_loss=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # The closure's loss includes the penalty (LBFGS's line search compares them).
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses),
                               rtol=1e-9, atol=1e-12)
    assert pen.step == len(data())


def test_without_regext_the_closure_would_have_erased_the_gradient():
    """The fault: the pre-hook's gradient, added before the closure's zero_grad, is
    lost. The fixed result differs from the unpenalized run."""
    got, _, _ = train("sgd", penalize_in_loss=False)
    model = make_model(0).double()
    opt = OPTIMIZERS["sgd"](model.parameters())
    for x, y in data():
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert any(not torch.allclose(g, p) for g, p in zip(got, model.parameters()))


def test_closure_passed_by_keyword_and_warmup():
    """closure= by keyword; no penalty during warm-up, then the penalty in every
    evaluation: the same weights as a loop that adds it to the loss from step 1."""
    def run(attached):
        model = make_model().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        pen = regext.Penalty(model, l1=L1, l2=L2)
        if attached:
            pen.attach(opt, "grad", warmup_steps=1)
        for step, (x, y) in enumerate(data()):
            def closure():
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                if not attached and step >= 1:
                    loss = loss + regext.fused_penalty(model.parameters(), L1, L2)
                loss.backward()
                return loss
            opt.step(closure=closure)
        return list(model.parameters())

    for g, w in zip(run(True), run(False)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


class Wrapper(torch.optim.Optimizer):
    """Shaped like accelerate's AcceleratedOptimizer: an Optimizer subclass that never
    ran Optimizer.__init__ and steps the optimizer it holds."""

    def __init__(self, optimizer):  # noqa: super().__init__ not called, as accelerate
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)


def test_wrapped_optimizers_are_unwrapped():
    model = make_model().double()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    pen = regext.Penalty(model, l1=L1)
    handle = pen.attach(Wrapper(Wrapper(inner)), "grad")
    assert handle.optimizer is inner
    ref = make_model().double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_pen = regext.Penalty(ref, l1=L1)
    for x, y in data():
        for m, o, before in ((model, handle.optimizer, None), (ref, ref_opt, ref_pen.add_grad_)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if before:
                before()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_accelerate_optimizer_is_unwrapped():
    accelerate = pytest.importorskip("accelerate")
    accelerate.Accelerator(cpu=True)  # AcceleratedOptimizer needs its state set up
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    wrapped = accelerate.optimizer.AcceleratedOptimizer(inner, device_placement=False)
    assert regext.Penalty(model, l1=L1).attach(wrapped, "prox").optimizer is inner


def test_bad_optimizers_name_what_to_pass():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    pen = regext.Penalty(model, l1=L1)
    with pytest.raises(TypeError, match=r"LR scheduler StepLR; pass the optimizer it "
                                        r"schedules \(scheduler.optimizer\)"):
        pen.attach(sched)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, or a "
                                        r"wrapper that holds one as .optimizer .*got dict"):
        pen.attach({"lr": 0.1})


def test_attaching_twice_is_an_error_until_removed():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pen = regext.Penalty(model, l1=L1)
    handle = pen.attach(opt, "prox")
    for mode in ("prox", "grad"):
        with pytest.raises(RuntimeError, match=r"Penalty.attach: this Penalty is already "
                                               r"attached \(PenaltyAttachment\(mode='prox'"):
            pen.attach(opt, mode)
    with pytest.raises(RuntimeError, match="already attached"):
        pen.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    # One step advances pen.step once: the failed attaches added no hooks.
    opt.zero_grad()
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    assert pen.step == 1
    handle.remove()
    assert "removed" in repr(handle)
    again = pen.attach(opt, "prox")
    opt.step()
    assert pen.step == 2 and again.active
