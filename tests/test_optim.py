"""Penalty.attach(optimizer): bit for bit the hand-written loop (add_grad_ before
step, prox_ after step with each group's lr), with schedulers, per-group learning
rates, AMP's GradScaler, schedules, warm-up, checkpoints and remove()."""

import copy
import math

import pytest
import torch
from torch import nn

import regext

STEPS = 5


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(n=STEPS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen))
            for _ in range(n)]


def make_optimizer(kind, model):
    """Two param groups with different learning rates (first layer, the rest)."""
    first, rest = list(model[0].parameters()), list(model[2].parameters())
    groups = [{"params": first, "lr": 0.05}, {"params": rest, "lr": 0.02}]
    return {
        "sgd_momentum": lambda: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
        "adam": lambda: torch.optim.Adam(groups, lr=0.05),
        "adamw_foreach": lambda: torch.optim.AdamW(groups, lr=0.05, foreach=True),
        "adamw_fused": lambda: torch.optim.AdamW(groups, lr=0.05, fused=True),
        "sgd_fused": lambda: torch.optim.SGD(groups, lr=0.05, momentum=0.9, fused=True),
    }[kind]()


def make_scheduler(kind, optimizer):
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)


def penalty_of(model, **kwargs):
    return regext.Penalty(model, l1=1e-2, l2=2e-2, exclude="*bias",
                          overrides={"2.weight": {"l2_squared": True}}, **kwargs)


def train(model, optimizer, scheduler, data, before_step=None, after_step=None):
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if before_step:
            before_step()
        optimizer.step()
        if after_step:
            after_step()
        scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


OPTIMIZERS = ["sgd_momentum", "adam", "adamw_foreach", "adamw_fused", "sgd_fused"]


@pytest.mark.parametrize("scheduler", ["step", "cosine"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_grad_mode_equals_add_grad_before_step(optimizer, scheduler):
    data = batches()
    ref_model = make_model()
    ref_opt = make_optimizer(optimizer, ref_model)
    ref_pen = penalty_of(ref_model)
    want = train(ref_model, ref_opt, make_scheduler(scheduler, ref_opt), data,
                 before_step=ref_pen.add_grad_)
    model = make_model()
    opt = make_optimizer(optimizer, model)
    pen = penalty_of(model)
    pen.attach(opt, "grad")
    got = train(model, opt, make_scheduler(scheduler, opt), data)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert pen.step == STEPS


def _prox_by_hand(pen, opt, metric=None):
    def after():
        for group in opt.param_groups:
            pen.prox_(group["lr"], only={id(p) for p in group["params"]}, metric=metric)
    return after


@pytest.mark.parametrize("metric", ["auto", "euclidean"])
@pytest.mark.parametrize("scheduler", ["step", "cosine"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_prox_mode_equals_prox_after_step_with_each_group_lr(optimizer, scheduler, metric):
    """By default the step is taken in the optimizer's metric (Penalty.prox_ with
    metric=optimizer; SGD's is the Euclidean one), with metric="euclidean" as before."""
    data = batches()
    ref_model = make_model()
    ref_opt = make_optimizer(optimizer, ref_model)
    ref_pen = penalty_of(ref_model)
    want = train(ref_model, ref_opt, make_scheduler(scheduler, ref_opt), data,
                 after_step=_prox_by_hand(ref_pen, ref_opt,
                                          ref_opt if metric == "auto" else None))
    model = make_model()
    opt = make_optimizer(optimizer, model)
    pen = penalty_of(model)
    handle = pen.attach(opt, "prox", metric=metric)
    assert handle.in_metric == (metric == "auto" and not optimizer.startswith("sgd"))
    got = train(model, opt, make_scheduler(scheduler, opt), data)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_prox_mode_makes_exact_zeros_and_uses_the_groups_lr():
    model = make_model()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                           {"params": model[2].parameters(), "lr": 1.0}], lr=0.1)
    pen = regext.Penalty(model, l1=1.0, exclude="*bias")  # lr * l1 = 1 zeroes |w| <= 1
    pen.attach(opt, "prox")
    first = model[0].weight.detach().clone()
    opt.zero_grad()
    (0.0 * model(torch.randn(4, 6)).sum()).backward()       # no data gradient
    opt.step()
    assert torch.equal(model[0].weight.detach(), first)      # lr 0: untouched
    assert torch.count_nonzero(model[2].weight) == 0         # lr 1: all |w| < 1 zeroed


@pytest.mark.parametrize("mode", ["grad", "prox"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_step_gradscaler_skips_applies_no_penalty(mode, fused):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pen = regext.Penalty(model, l1=0.5, l2=0.5)
    pen.attach(opt, mode)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(torch.randn(4, 6)).sum()).backward()
    model[0].weight.grad[0, 0] = math.inf
    scaler.step(opt)
    scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("mode", ["grad", "prox"])
@pytest.mark.parametrize("fused", [False, True])
def test_gradscaler_steps_equal_the_unscaled_loop(mode, fused):
    """The penalty is applied in the gradients' true scale, whoever unscales them."""
    data = batches()
    results = []
    for use_scaler in (False, True):
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
        pen = penalty_of(model)
        pen.attach(opt, mode)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0, enabled=use_scaler)
        for x, y in data:
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["grad", "prox"])
def test_remove_restores_plain_training(mode):
    data = batches()
    plain_model = make_model()
    plain_opt = make_optimizer("adam", plain_model)
    want = train(plain_model, plain_opt, make_scheduler("step", plain_opt), data)
    model = make_model()
    opt = make_optimizer("adam", model)
    handle = penalty_of(model).attach(opt, mode)
    handle.remove()
    got = train(model, opt, make_scheduler("step", opt), data)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_schedules_and_warmup_take_effect_at_the_right_step():
    seen = []
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pen = regext.Penalty(model, l1=lambda step: seen.append(step) or 0.01 * step, l2=0.0)
    pen.attach(opt, "grad", warmup_steps=2)
    for step in range(5):
        opt.zero_grad()
        model(torch.randn(3, 6)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        if step < 2:  # warm-up: no penalty, the schedule is not even evaluated
            assert seen == []
        else:
            assert seen[-1] == step
        del grads
    assert pen.step == 5 and seen == [2, 3, 4]


def test_changing_a_coefficient_between_steps():
    data = batches()
    ref_model, model = make_model(), make_model()
    ref_opt, opt = make_optimizer("sgd_momentum", ref_model), make_optimizer("sgd_momentum",
                                                                            model)
    ref_pen, pen = penalty_of(ref_model), penalty_of(model)
    pen.attach(opt, "grad")
    for k, (x, y) in enumerate(data):
        for m, o, p in ((ref_model, ref_opt, ref_pen), (model, opt, pen)):
            p.l1 = 1e-2 * (k + 1)
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        ref_pen.add_grad_()
        ref_opt.step()
        opt.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_gradient_accumulation_adds_the_penalty_once_per_step():
    data = batches(6)
    ref_model, model = make_model(), make_model()
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref_model, model))
    ref_pen, pen = penalty_of(ref_model), penalty_of(model)
    pen.attach(opt, "grad")
    for m, o, p in ((ref_model, ref_opt, ref_pen), (model, opt, None)):
        for k, (x, y) in enumerate(data):
            nn.functional.mse_loss(m(x), y).backward()
            if k % 3 == 2:  # three micro-batches per step
                if p is not None:
                    p.add_grad_()
                o.step()
                o.zero_grad()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    assert pen.step == 2


@pytest.mark.parametrize("mode", ["grad", "prox"])
def test_checkpoint_round_trip_resumes_identically(mode, tmp_path):
    data = batches(6)
    model = make_model()
    opt = make_optimizer("adamw_foreach", model)
    pen = penalty_of(model)
    pen.l1 = lambda step: 1e-2 / (1 + step)
    pen.groups[0].l2 = torch.tensor(0.03)
    pen.attach(opt, mode)
    sched = make_scheduler("cosine", opt)
    for x, y in data[:3]:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "pen": pen.state_dict()}, tmp_path / "ckpt.pt")
    uninterrupted = copy.deepcopy(model)
    u_opt = make_optimizer("adamw_foreach", uninterrupted)
    u_opt.load_state_dict(opt.state_dict())
    for x, y in data[3:]:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    want = [p.detach().clone() for p in model.parameters()]

    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = make_model(seed=99)
    resumed.load_state_dict(ckpt["model"])
    r_opt = make_optimizer("adamw_foreach", resumed)
    r_opt.load_state_dict(ckpt["opt"])
    r_sched = make_scheduler("cosine", r_opt)
    r_sched.load_state_dict(ckpt["sched"])
    r_pen = penalty_of(resumed)
    r_pen.l1 = lambda step: 1e-2 / (1 + step)  # the schedule is code: rebuilt, not saved
    r_pen.load_state_dict(ckpt["pen"])
    assert r_pen.step == 3 and float(r_pen.groups[0].l2) == pytest.approx(0.03)
    r_pen.attach(r_opt, mode)
    for x, y in data[3:]:
        r_opt.zero_grad()
        nn.functional.mse_loss(resumed(x), y).backward()
        r_opt.step()
        r_sched.step()
    for g, w in zip(resumed.parameters(), want):
        assert torch.equal(g.detach(), w)


def test_attach_checks_coverage_and_leaves_other_parameters_alone():
    model = make_model()
    pen = regext.Penalty(model, l1=1.0)
    with pytest.raises(ValueError, match=r"Penalty.attach: 2.weight is selected by the Penalty "
                                         r"but the optimizer does not hold it \(2 such"):
        pen.attach(torch.optim.SGD(model[0].parameters(), lr=0.1), "prox")
    with pytest.raises(ValueError, match="mode must be 'grad' or 'prox'"):
        pen.attach(torch.optim.SGD(model.parameters(), lr=0.1), "both")
    only_first = regext.Penalty(model, l1=1.0, exclude="2.*")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    only_first.attach(opt, "prox")
    model[0].weight.requires_grad_(False)  # frozen: left alone too
    frozen = model[0].weight.detach().clone()
    opt.zero_grad()
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight.detach(), frozen)
    assert torch.count_nonzero(model[2].weight) > 0
