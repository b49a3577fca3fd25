"""Proximal steps in the optimizer's own metric (issue 22): Penalty.attach(mode="prox",
metric=...), Penalty.prox_(metric=), the prox functions' metric= and the operator
regext::prox_metric_.

The oracle is a float64 reference built, after every step, from the optimizer's own
state (exp_avg_sq / max_exp_avg_sq and the bias correction, Adagrad's sum and decayed
lr, RMSprop's square_avg and grad_avg): the parameters must match it to rtol 1e-5,
with exactly the same zeros, for every supported optimizer and variant."""

import math
import warnings

import pytest
import torch
from torch import nn

import regext
from regext.reference import sqrt_float64

STEPS = 6
L1 = 0.05


class AdamSubclass(torch.optim.Adam):
    """A user's subclass: regext knows its metric through isinstance."""


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def batches(dtype=torch.float32, n=STEPS, seed=1):
    """Input feature 0 is always 0: its first-layer weights get exactly zero
    gradients, so their second moments stay 0 (the huge-threshold case)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 6, generator=gen, dtype=dtype)
        x[:, 0] = 0.0
        out.append((x, torch.randn(8, 3, generator=gen, dtype=dtype)))
    return out


def two_groups(model, **second):
    return [{"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), **second}]


OPTIMIZERS = {
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.02, foreach=False),
    "adam_foreach_amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=0.02, amsgrad=True,
                                                       foreach=True),
    "adam_fused": lambda m: torch.optim.Adam(m.parameters(), lr=0.02, fused=True),
    "adam_subclass": lambda m: AdamSubclass(m.parameters(), lr=0.02),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.1,
                                         foreach=False),
    "adamw_foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, foreach=True),
    "adamw_fused_amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, fused=True,
                                                       amsgrad=True),
    "adam_per_group": lambda m: torch.optim.Adam(
        two_groups(m, lr=0.05, betas=(0.8, 0.95), eps=1e-4, amsgrad=True), lr=0.02),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=0.05,
                                             initial_accumulator_value=0.01, foreach=False),
    "adagrad_foreach": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=0.3,
                                                     foreach=True),
    "adagrad_fused": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, fused=True),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, foreach=False),
    "rmsprop_centered_momentum": lambda m: torch.optim.RMSprop(
        m.parameters(), lr=0.01, centered=True, momentum=0.9, foreach=True),
    "rmsprop_per_group": lambda m: torch.optim.RMSprop(two_groups(m, centered=True, eps=1e-3),
                                                       lr=0.01),
}


def group_of(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def reference_denominators(opt, p):
    """(d, f): what the optimizer divided its update by, in float64 from its state,
    and its step size over lr."""
    state, group = opt.state[p], group_of(opt, p)
    eps = group.get("eps", 0.0)
    if isinstance(opt, torch.optim.SGD):
        return torch.ones_like(p, dtype=torch.float64), 1.0
    if isinstance(opt, torch.optim.Adam):
        v = state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"].double()
        t = float(state["step"])
        return sqrt_float64(v / (1.0 - group["betas"][1] ** t)) + eps, 1.0
    if isinstance(opt, torch.optim.Adagrad):
        t = float(state["step"])
        return sqrt_float64(state["sum"].double()) + eps, 1.0 / (1.0 + (t - 1.0) * group["lr_decay"])
    v = state["square_avg"].double()
    if group["centered"]:
        v = v - state["grad_avg"].double() ** 2
    return sqrt_float64(v) + eps, 1.0


def reference_step(x, d, lr, l1, l2_squared=0.0):
    """sign(x)·max(|x| − lr·l1/d, 0) / (1 + 2·lr·l2/d), float64."""
    x = x.double()
    t = lr * l1 / d
    y = torch.where(x.abs() <= t, torch.zeros_like(x), x - x.sign() * t)
    return y / (1.0 + 2.0 * lr * l2_squared / d) if l2_squared else y


def assert_matches(got, want, what, euclidean_of=None):
    """rtol 1e-5 and the same zeros. The Euclidean step (SGD's metric) is today's
    kernel, bits unchanged: it computes |x| − t in float32 for float32 weights, so a
    result that nearly cancels is off by up to one float32 ulp of the weight before the
    step (`euclidean_of`), which rtol alone cannot allow."""
    got = got.double()
    allowed = 1e-5 * want.abs()
    if euclidean_of is not None and euclidean_of.dtype != torch.float64:
        allowed = allowed + torch.finfo(euclidean_of.dtype).eps * euclidean_of.double().abs()
    worst = ((got - want).abs() - allowed).max()
    assert worst <= 0, f"{what}: off by more than allowed ({worst.item():.3g} over)"
    assert torch.equal(got == 0, want == 0), f"{what}: the zeros differ"


def run_against_reference(optimizer, dtype=torch.float32, l2_squared=0.0, steps=STEPS):
    """Trains with the penalty attached (default metric) and checks every step against
    the float64 reference. Returns the model and its optimizer."""
    model = make_model(dtype)
    opt = OPTIMIZERS[optimizer](model)
    pen = regext.Penalty(model, l1=L1, l2=l2_squared, l2_squared=True, exclude="*bias")
    before = {}
    # Registered before attach, so it runs first: the parameters after the
    # optimizer's step, before the proximal step.
    opt.register_step_post_hook(
        lambda o, args, kwargs: before.update({id(p): p.detach().clone()
                                               for p in model.parameters()}))
    handle = pen.attach(opt, "prox")
    assert handle.in_metric == (not optimizer.startswith("sgd"))
    zeros = 0
    for step, (x, y) in enumerate(batches(dtype, steps)):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for name, p in pen.named_parameters():
            d, f = reference_denominators(opt, p)
            want = reference_step(before[id(p)], d, group_of(opt, p)["lr"] * f, L1, l2_squared)
            assert_matches(p.detach(), want, f"{optimizer}, step {step}, {name}",
                           before[id(p)] if optimizer.startswith("sgd") else None)
            zeros += int((p == 0).sum())
    return model, opt, zeros


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_step_equals_the_float64_reference_from_the_optimizers_state(optimizer):
    _, _, zeros = run_against_reference(optimizer)
    assert zeros > 0  # the zero pattern was tested on something


@pytest.mark.parametrize("optimizer", ["adamw", "adagrad", "rmsprop_centered_momentum"])
def test_elastic_net_and_float64_parameters(optimizer):
    """l1 with the squared L2 term (one fused pass: soft-threshold, then the ridge
    factor, both in the metric), on float64 parameters."""
    run_against_reference(optimizer, dtype=torch.float64, l2_squared=0.3)


def test_a_never_seen_input_is_zeroed_at_the_first_step():
    """The metric's answer for a second moment of exactly 0: Adam's denominator is eps,
    the threshold lr·l1/eps (here 0.02·0.05/1e-8 = 1e5), and the weight becomes 0.
    The Euclidean step leaves it (|w| > lr·l1 = 0.001)."""
    results = {}
    for metric in ("auto", "euclidean"):
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        regext.Penalty(model, l1=L1, exclude="*bias").attach(opt, "prox", metric=metric)
        x, y = batches(n=1)[0]
        nn.functional.mse_loss(model(x), y).backward()
        assert torch.equal(model[0].weight.grad[:, 0], torch.zeros(16))
        opt.step()
        results[metric] = model[0].weight.detach()[:, 0].clone()
    assert torch.equal(results["auto"], torch.zeros(16))
    assert (results["euclidean"].abs() > 0.001).all()


def test_l1_means_the_same_under_every_optimizer():
    """f(w) = ½‖w − a‖²: at equilibrium w_i = 0 iff |∂f/∂w_i(0)| = |a_i| <= l1. With the
    metric step every optimizer finds that zero set; under Adam the Euclidean step
    (threshold lr·l1, while Adam moves each weight by ~lr) zeroes nothing."""
    gen = torch.Generator().manual_seed(3)
    # Half of the gradients below l1, half above, none within 0.05 of it.
    a = torch.cat([torch.linspace(0.03, 0.15, 20), torch.linspace(0.25, 0.45, 20)])
    a = a[torch.randperm(40, generator=gen)] * torch.where(torch.rand(40, generator=gen) < 0.5,
                                                           -1.0, 1.0)
    l1 = 0.2
    want = a.abs() <= l1
    makers = {"sgd": lambda w: torch.optim.SGD([w], lr=0.1),
              "adam": lambda w: torch.optim.Adam([w], lr=0.01),
              "adamw": lambda w: torch.optim.AdamW([w], lr=0.01, weight_decay=0.0),
              "adagrad": lambda w: torch.optim.Adagrad([w], lr=0.1),
              "rmsprop": lambda w: torch.optim.RMSprop([w], lr=0.003)}
    for name, make in makers.items():
        for metric in ("auto", "euclidean"):
            w = nn.Parameter(0.01 * torch.ones(40))
            opt = make(w)
            regext.Penalty([("w", w)], l1=l1).attach(opt, "prox", metric=metric)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3000)
            for _ in range(3000):
                opt.zero_grad()
                (0.5 * (w - a).square().sum()).backward()
                opt.step()
                sched.step()
            zero = w.detach() == 0
            if metric == "auto" or name == "sgd":
                assert torch.equal(zero, want), (name, metric, zero.sum(), want.sum())
            elif name in ("adam", "adamw"):
                assert zero.sum() < want.sum() / 4, (name, metric, zero.sum())


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_amp_step_applies_nothing_after_earlier_steps(fused):
    """A fused AdamW runs step() on a step GradScaler skips: its rows' step sizes are
    multiplied by found_inf == 0 on the device, and the kernel leaves those tensors
    untouched, bit for bit (the state from the earlier step is there)."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    regext.Penalty(model, l1=L1).attach(opt, "prox")
    x, y = batches(n=1)[0]
    for poison in (False, True):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if poison:
            model[0].weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


# ---- the functional forms -----------------------------------------------------------

def stepped(optimizer="adamw", steps=2):
    model = make_model()
    opt = OPTIMIZERS[optimizer](model)
    for x, y in batches(n=steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("optimizer", ["adamw", "adagrad", "rmsprop_centered_momentum"])
def test_prox_functions_take_the_optimizer_as_metric(optimizer):
    model, opt = stepped(optimizer)
    weights = [model[0].weight, model[2].weight]
    lr = opt.param_groups[0]["lr"]
    for fn, l1, l2 in ((regext.prox_l1_, 0.01, 0.0), (regext.prox_l2_squared_, 0.0, 0.4)):
        xs = [w.detach().clone() for w in weights]
        with torch.no_grad():
            fn(weights, lr * (l1 or l2), metric=opt)
        for w, x in zip(weights, xs):
            d, f = reference_denominators(opt, w)
            assert_matches(w.detach(), reference_step(x, d, lr * f, l1, l2), fn.__name__)


def test_sgd_metric_is_the_euclidean_step_bit_for_bit():
    model, opt = stepped("sgd_momentum")
    ref = [p.detach().clone() for p in model.parameters()]
    regext.prox_l1_(model.parameters(), 0.01, metric=opt)
    regext.prox_l1_(ref, 0.01)
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), ref))


def test_a_parameter_without_state_is_left_alone():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    nn.functional.mse_loss(model[0](torch.randn(4, 6)), torch.randn(4, 16)).backward()
    opt.step()  # model[2] had no gradient: no state, no metric
    assert not opt.state[model[2].weight]
    before = model[2].weight.detach().clone()
    regext.prox_l1_(model.parameters(), 10.0, metric=opt)
    assert torch.equal(model[2].weight.detach(), before)
    assert torch.count_nonzero(model[0].weight) == 0


def test_metric_errors_name_what_to_do():
    model, opt = stepped("adamw")
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"params\[0\] is not a parameter of the AdamW"):
        regext.prox_l1_(other.parameters(), 0.1, metric=opt)
    with pytest.raises(TypeError, match="metric must be None or a torch.optim optimizer"):
        regext.prox_l1_(model.parameters(), 0.1, metric="adam")
    adamax = torch.optim.Adamax(model.parameters())
    with pytest.raises(ValueError, match=r"torch\.optim\.adamax\.Adamax.*pass metric=None"):
        regext.prox_l1_(model.parameters(), 0.1, metric=adamax)
    pen = regext.Penalty(model, l1=0.1)
    with pytest.raises(ValueError, match="metric must be 'auto', 'optimizer' or 'euclidean'"):
        pen.attach(opt, "prox", metric="adam")
    with pytest.raises(ValueError, match="applies to mode='prox' only"):
        pen.attach(opt, "grad", metric="optimizer")
    with pytest.raises(ValueError, match=r"Adamax.*pass metric=\"euclidean\""):
        pen.attach(adamax, "prox", metric="optimizer")


def test_penalty_prox_checks_every_parameter_before_stepping_any():
    model, opt = stepped("adamw")
    extra = nn.Linear(6, 2)
    pen = regext.Penalty(nn.ModuleDict({"a": model, "b": extra}), l1=0.1,
                         overrides={"b.*": {"l1": 0.2}})
    before = [p.detach().clone() for p in pen.parameters()]
    with pytest.raises(ValueError, match=r"b\.weight is not a parameter of the AdamW"):
        pen.prox_(0.02, metric=opt)
    assert all(torch.equal(p, b) for p, b in zip(pen.parameters(), before))


def test_an_unknown_optimizer_warns_once_and_steps_euclidean():
    data = batches()
    results = []
    for metric in ("auto", "euclidean"):
        model = make_model()
        opt = torch.optim.Adamax(model.parameters(), lr=0.02)
        pen = regext.Penalty(model, l1=L1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = pen.attach(opt, "prox", metric=metric)
            for x, y in data:
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        messages = [str(w.message) for w in caught if "metric" in str(w.message)]
        if metric == "auto":
            assert len(messages) == 1 and "torch.optim.adamax.Adamax" in messages[0]
        else:
            assert messages == []
        assert not handle.in_metric
        results.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ---- the operator ---------------------------------------------------------------------

def op_args(n=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(4, 5, generator=gen).to(dtype) for _ in range(n)]
    moments = [torch.rand(4, 5, generator=gen).to(dtype) for _ in range(n)]
    coefs = torch.tensor([[0.1, 0.0, 1.0, 1e-8]] * n, dtype=torch.float64)
    return params, moments, coefs


def test_operator_argument_errors_name_the_argument_and_position():
    op = torch.ops.regext.prox_metric_
    params, moments, coefs = op_args()
    with pytest.raises(RuntimeError, match="moments has 2 tensors but params has 3"):
        op(params, moments[:2], [], coefs)
    with pytest.raises(RuntimeError, match=r"moments\[1\] has shape \[5, 4\] but params\[1\]"):
        op(params, [moments[0], moments[1].t(), moments[2]], [], coefs)
    with pytest.raises(TypeError, match=r"moments\[2\] has dtype Double but params\[2\] has dtype Float"):
        op(params, moments[:2] + [moments[2].double()], [], coefs)
    with pytest.raises(TypeError, match=r"means\[0\] has dtype Half"):
        op(params, moments, [m.half() for m in moments], coefs)
    with pytest.raises(TypeError, match=r"coefs must be a contiguous float64 tensor of shape \[3, 4\]"):
        op(params, moments, [], coefs.float())
    with pytest.raises(TypeError, match=r"shape \[3, 4\]"):
        op(params, moments, [], coefs[:2])
    bad = coefs.clone()
    bad[1, 3] = -1.0
    with pytest.raises(ValueError, match=r"coefs\[1\]\[3\] \(eps\) must be a finite number >= 0"):
        op(params, moments, [], bad)
    bad[1, 3], bad[2, 2] = 1e-8, math.inf
    with pytest.raises(ValueError, match=r"coefs\[2\]\[2\] \(scale\)"):
        op(params, moments, [], bad)
    with pytest.raises(ValueError, match=r"moments\[1\] shares memory with params\[0\]"):
        op(params, [moments[0], params[0], moments[2]], [], coefs)
    with pytest.raises(ValueError, match=r"means\[2\] shares memory with params\[1\]"):
        op(params, moments, [moments[0], moments[1], params[1].view(4, 5)], coefs)
    assert all(torch.equal(p, q) for p, q in zip(params, op_args()[0]))  # nothing ran


def test_operator_bumps_versions_and_refuses_leaves_under_grad_mode():
    params, moments, coefs = op_args()
    versions = [p._version for p in params]
    torch.ops.regext.prox_metric_(params, moments, [], coefs)
    assert [p._version for p in params] == [v + 1 for v in versions]
    leaf = [params[0].clone().requires_grad_()]
    with pytest.raises(RuntimeError, match="requires grad and grad mode is on"):
        torch.ops.regext.prox_metric_(leaf, moments[:1], [], coefs[:1])


def test_operator_list_order_strided_views_and_staged_state():
    """A tensor listed twice is stepped twice (in order, as one call per tensor);
    a non-dense view is updated where it lies; state in another layout is read
    element by element."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(8, 10, generator=gen)
    view = base[:, ::2]                       # not dense: staged and written back
    other = torch.randn(7, 3, generator=gen).t()
    params = [view, other, view]
    moments = [torch.rand(8, 5, generator=gen), torch.rand(3, 7, generator=gen).contiguous(),
               torch.rand(8, 5, generator=gen)]
    coefs = torch.tensor([[0.02, 0.01, 1.3, 1e-3], [0.05, 0.0, 1.0, 1e-8],
                          [0.01, 0.0, 2.0, 1e-8]], dtype=torch.float64)
    want = [p.clone() for p in params[:2]]  # rounded to float32 after each step, as the kernel
    regext.reference.prox_metric_reference([want[0], want[1], want[0]], moments, [], coefs)
    untouched = base[:, 1::2].clone()
    torch.ops.regext.prox_metric_(params, moments, [], coefs)
    assert_matches(view, want[0].double(), "the view listed twice")
    assert_matches(other, want[1].double(), "the transposed tensor")
    assert torch.equal(base[:, 1::2], untouched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_fast_path_agrees_with_float64_around_every_threshold(dtype):
    """float32 arithmetic where it provably agrees with float64 (within 5e-6, the same
    zeros), float64 for the coordinates near their threshold: |x| swept across
    [0.5 t, 2 t] in steps of 1e-4 t, and a handful within a few float32 ulps of t.
    (float16 would round the tiniest results to 0: its zeros are not float64's.)"""
    gen = torch.Generator().manual_seed(9)
    n = 20000
    v = (torch.rand(n, generator=gen, dtype=torch.float64) * 1e-3).to(dtype).to(torch.float32)
    row = [2e-4, 0.0, 31.6, 1e-8]
    d = regext.reference.metric_denominator_reference(v, None, row[2], row[3])
    ratio = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    ratio[::97] = 1.0 + torch.arange(0, n, 97, dtype=torch.float64).remainder(9).sub(4) * 2 ** -23
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    x = (sign * ratio * row[0] / d).to(dtype)
    for ridge in (0.0, 3e-5):
        coefs = torch.tensor([[row[0], ridge, row[2], row[3]]], dtype=torch.float64)
        got = x.clone()
        torch.ops.regext.prox_metric_([got], [v.to(dtype)], [], coefs)
        want = x.double().clone()
        regext.reference.prox_metric_reference([want], [v.to(dtype)], [], coefs)
        # want is float64 (not rounded to dtype): the kernel's rounding to dtype is allowed
        rounding = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
        worst = ((got.double() - want).abs() - (5e-6 + rounding) * want.abs()).max()
        assert worst <= 0, (ridge, worst.item())
        assert torch.equal(got == 0, want == 0)
        assert 0 < int((got == 0).sum()) < n


def test_the_float32_path_is_taken_where_it_is_safe():
    """Far from the threshold the result is the float32 computation (it may differ from
    the float64 one rounded to float32 in the last bit), near it the float64 one."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(100000, generator=gen)
    v = torch.rand(100000, generator=gen) * 1e-3
    coefs = torch.tensor([[1e-5, 0.0, 31.6, 1e-8]], dtype=torch.float64)
    got = x.clone()
    torch.ops.regext.prox_metric_([got], [v], [], coefs)
    want = x.clone()
    regext.reference.prox_metric_reference([want], [v], [], coefs)
    assert not torch.equal(got, want)  # some last bits differ: float32 arithmetic ran
    torch.testing.assert_close(got, want, rtol=5e-6, atol=0)
    double = x.double()
    regext.reference.prox_metric_reference([double], [v.double()], [], coefs)
    assert torch.equal(got == 0, double == 0)


def test_nan_and_inf_in_parameters_and_state():
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0, -1.0, 0.5, 0.0])
    v = torch.tensor([1.0, 1.0, 1.0, math.nan, math.inf, 0.0, 0.0])
    coefs = torch.tensor([[0.1, 0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.ops.regext.prox_metric_([x], [v], [], coefs)
    # NaN stays NaN, ±inf stays ±inf; a NaN moment makes NaN; an infinite moment
    # gives threshold 0 (unchanged); d = 0 (v = 0, eps = 0) gives an infinite
    # threshold: the weight becomes 0.
    assert torch.equal(x.isnan(), torch.tensor([True, False, False, True, False, False, False]))
    assert x[1] == math.inf and x[2] == -math.inf and x[4] == -1.0
    assert x[5] == 0 and x[6] == 0


# ---- the group lasso in the metric --------------------------------------------------

def group_lasso_bisection(x, d, lam):
    """argmin lam·‖u‖ + ½ Σ d_i (u_i − x_i)² for one group, by bisection on τ (an
    independent solver), float64."""
    if (d * x).norm() <= lam:
        return torch.zeros_like(x)
    c = lam / d
    lo, hi = 0.0, float(x.norm())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((x / (mid + c)).square().sum()) > 1.0:
            lo = mid
        else:
            hi = mid
    tau = 0.5 * (lo + hi)
    return x * (tau / (tau + c))


@pytest.mark.parametrize("group", ["row", "column", "tensor"])
def test_group_lasso_attached_equals_an_independent_float64_solver(group):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    l2 = 0.4 if group == "tensor" else 0.03  # a whole tensor is zeroed too
    pen = regext.Penalty(model, l1=0.01, l2=l2, group=group, group_weight="sqrt_size",
                         exclude="*bias")
    before = {}
    opt.register_step_post_hook(
        lambda o, a, k: before.update({id(p): p.detach().clone() for p in model.parameters()}))
    pen.attach(opt, "prox")
    zero_groups = 0
    for x, y in batches():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for name, p in pen.named_parameters():
            d, _ = reference_denominators(opt, p)
            lr = opt.param_groups[0]["lr"]
            z = reference_step(before[id(p)], d, lr, 0.01)  # the L1 part first
            dim = {"row": 0, "column": 1, "tensor": None}[group]
            zs = [z.flatten()] if dim is None else list(z.movedim(dim, 0))
            ds = [d.flatten()] if dim is None else list(d.movedim(dim, 0))
            us = [group_lasso_bisection(zg.flatten(), dg.flatten(),
                                        lr * l2 * math.sqrt(zg.numel())) for zg, dg in zip(zs, ds)]
            want = (torch.stack(us).reshape(z.movedim(dim, 0).shape).movedim(0, dim)
                    if dim is not None else us[0].reshape(z.shape))
            zero_groups += sum(int((u == 0).all()) for u in us)
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-12,
                                       msg=lambda m: f"{group}, {name}: {m}")
            assert torch.equal(p == 0, want == 0), f"{group}, {name}: zeros differ"
    assert zero_groups > 0


def test_group_lasso_with_an_infinite_second_moment_keeps_that_coordinate():
    """A finite gradient spike (1e30 in float32) overflows AdamW's exp_avg_sq to inf
    while the weight stays finite: that coordinate's metric is infinite (c = 0), so
    it keeps its value and the rest of its group shrinks (found by a review: the
    step wrote NaN). The independent bisection solver agrees."""
    w = nn.Parameter(torch.tensor([[0.5, 0.3], [0.2, 0.1]]))
    opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.0)
    w.grad = torch.tensor([[1e30, 0.0], [0.0, 0.0]])
    opt.step()
    assert math.isinf(float(opt.state[w]["exp_avg_sq"][0, 0]))
    before = w.detach().clone()
    regext.prox_group_l2_([w], 1e-4, group="row", metric=opt)
    d = torch.tensor([math.inf, 1e-8], dtype=torch.float64)  # v = 0 there: d = eps
    want = group_lasso_bisection(before[0].double(), d, 1e-4)
    assert w[0, 0] == 0.5 and torch.isfinite(w).all()
    torch.testing.assert_close(w[0].double(), want.to(torch.float32).double(), rtol=1e-6, atol=0)
    assert torch.equal(w[1], torch.zeros(2))  # v = 0 everywhere: d = eps, zeroed


def test_group_lasso_metric_special_state_and_range():
    """A NaN second moment makes its whole group NaN (the per-coordinate step makes
    that coordinate NaN; here the group's metric is undefined) and leaves the other
    groups as they would be; x beyond float64's squares (1e200) is left unchanged,
    as the Euclidean step leaves a group whose norm overflows; denominators 600
    decades apart still give the exact answer (the start's |x_i| - c_i bound)."""
    op = torch.ops.regext.prox_group_metric_
    f64 = dict(dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], **f64)
    v = torch.tensor([[1.0, math.nan, 1.0], [1.0, 4.0, 1.0]], **f64)
    alone = x[1:].clone()
    op([alone], [v[1:]], [], [0], torch.tensor([[0.5, 0.0, 1.0, 1e-8]], **f64), False)
    op([x], [v], [], [0], torch.tensor([[0.5, 0.0, 1.0, 1e-8]], **f64), False)
    assert x[0].isnan().all() and torch.equal(x[1:], alone)
    huge = torch.tensor([1e200, 2e200], **f64)
    op([huge], [torch.ones(2, **f64)], [], [-1], torch.tensor([[1.0, 0.0, 1.0, 1e-8]], **f64),
       False)
    assert torch.equal(huge, torch.tensor([1e200, 2e200], **f64))
    spread = torch.tensor([1.0, 2.0], **f64)
    op([spread], [torch.tensor([1e300, 1e-300], **f64)], [], [-1],
       torch.tensor([[1e-3, 0.0, 1.0, 0.0]], **f64), False)
    want = group_lasso_bisection(torch.tensor([1.0, 2.0], **f64),
                                 torch.tensor([1e150, 1e-150], **f64), 1e-3)
    torch.testing.assert_close(spread, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_zero_dim_parameters_match_the_references(dtype):
    """A 0-dim parameter (a learned scalar) is one group and one coordinate: both
    operators and both float64 references agree on it (the references raised a
    TypeError on 0-dim tensors: NumPy's sqrt of a 0-dim array is a scalar)."""
    from regext.reference import prox_group_metric_reference, prox_metric_reference
    gen = torch.Generator().manual_seed(31)
    for _ in range(20):
        x = (3 * torch.randn((), generator=gen, dtype=torch.float64)).to(dtype)
        v = torch.rand((), generator=gen, dtype=torch.float64).to(dtype)
        m = (0.1 * torch.randn((), generator=gen, dtype=torch.float64)).to(dtype)
        coefs = torch.tensor([[float(torch.rand((), generator=gen)), 0.0, 1.5, 1e-8]],
                             dtype=torch.float64)
        for means in ([], [m]):
            got, want = x.clone(), x.clone()
            torch.ops.regext.prox_metric_([got], [v], means, coefs)
            prox_metric_reference([want], [v], means, coefs)
            torch.testing.assert_close(got, want, rtol=5e-6, atol=0)
            got, want = x.clone(), x.clone()
            torch.ops.regext.prox_group_metric_([got], [v], means, [0], coefs, True)
            prox_group_metric_reference([want], [v], means, [0], coefs, True)
            assert got.shape == () and torch.equal(got == 0, want == 0)
            torch.testing.assert_close(got, want, rtol=1e-6 if dtype != torch.float64 else 1e-12,
                                       atol=0)


@pytest.mark.parametrize("step", ["l1", "group"])
def test_a_bad_state_tensor_is_refused_before_any_parameter_is_stepped(step):
    """Two kinds of state (plain and centered RMSprop groups) are two operator calls;
    a state tensor of the wrong dtype in the second is refused, naming the parameter,
    before the first call writes anything (found by a review: the first tensor was
    already stepped, and the message named a position in an internal sub-list)."""
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.RMSprop([{"params": [a]}, {"params": [b], "centered": True}], lr=1e-2)
    (a.sum() + b.sum()).backward()
    opt.step()
    opt.state[b]["square_avg"] = opt.state[b]["square_avg"].double()
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(TypeError, match=r"second moment of params\[1\] has dtype torch.float64"):
        if step == "l1":
            regext.prox_l1_([a, b], 10.0, metric=opt)
        else:
            regext.prox_group_l2_([a, b], 10.0, group="row", metric=opt)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_group_lasso_metric_state_on_another_device_is_an_error():
    p = torch.randn(4, 5, dtype=torch.float64)
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"moments\[0\] is on meta"):
        torch.ops.regext.prox_group_metric_([p], [torch.rand(4, 5, dtype=torch.float64,
                                                             device="meta")], [], [0],
                                            torch.tensor([[0.5, 0, 1, 1e-8]],
                                                         dtype=torch.float64), False)
    assert torch.equal(p, before)


def test_group_lasso_in_a_constant_metric_is_the_euclidean_step():
    from regext.reference import group_lasso_in_metric_reference as group_lasso_in_metric
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    d = torch.full_like(x, 4.0)
    got = group_lasso_in_metric(x, d, torch.tensor(6.0, dtype=torch.float64))
    norms = x.norm(dim=1, keepdim=True)
    want = x * (1 - (6.0 / 4.0) / norms).clamp_min(0)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    assert 0 < int((got == 0).all(dim=1).sum()) < 50


# ---- CUDA (benchmarks/gpu_check.sh runs these on a GPU) ------------------------------

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and regext.cuda_available()),
                                reason="needs a GPU and regext's CUDA kernels")


@needs_cuda
@pytest.mark.parametrize("variant", ["plain", "foreach", "fused", "capturable", "centered"])
def test_cuda_metric_step_equals_the_reference_without_synchronizing(variant):
    """The step reads device-side step counts (fused, capturable) and copies host-side
    numbers from pinned memory: no host synchronization (torch's sync debug mode would
    raise), and the float64 reference from the optimizer's state holds on the GPU."""
    model = make_model().cuda()
    opt = (torch.optim.RMSprop(model.parameters(), lr=0.01, centered=True) if variant == "centered"
           else torch.optim.AdamW(model.parameters(), lr=0.02,
                                  **({} if variant == "plain" else {variant: True})))
    pen = regext.Penalty(model, l1=L1, exclude="*bias")
    for x, y in batches(n=3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
        opt.step()
        before = {id(p): p.detach().clone() for p in model.parameters()}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pen.prox_(opt.param_groups[0]["lr"], metric=opt)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for name, p in pen.named_parameters():
            d, f = reference_denominators(opt, p)
            want = reference_step(before[id(p)].cpu(), d.cpu(), opt.param_groups[0]["lr"] * f, L1)
            assert_matches(p.detach().cpu(), want, f"cuda {variant}, {name}")


@needs_cuda
@pytest.mark.parametrize("group", ["row", "column", "tensor"])
def test_cuda_group_lasso_metric_step_equals_the_cpu_without_synchronizing(group):
    """regext::prox_group_metric_ on the GPU (group_metric_cuda.cu): the same zeros as
    the CPU kernel and values within float64 round-off, with no host synchronization."""
    gen = torch.Generator().manual_seed(12)
    params = [torch.randn(s, generator=gen) for s in ((64, 300), (300, 40), (16, 8, 3, 3), (7,))]
    moments = [torch.rand(p.shape, generator=gen) for p in params]
    dims = [{"row": 0, "column": 1, "tensor": -1}[group]] * len(params)
    coefs = torch.tensor([[s, 0.0, 1.0, 1e-8] for s in (0.3, 2.0, 1.0, 0.5)],
                         dtype=torch.float64)
    want = [p.clone() for p in params]
    torch.ops.regext.prox_group_metric_(want, moments, [], dims, coefs, True)
    got = [p.cuda() for p in params]
    moments_cuda, coefs_cuda = [v.cuda() for v in moments], coefs.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.regext.prox_group_metric_(got, moments_cuda, [], dims, coefs_cuda, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for g, w in zip(got, want):
        g = g.cpu()
        assert torch.equal(g == 0, w == 0)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_the_benchmark_runs_and_checks_itself(tmp_path):
    """benchmarks/bench_metric_prox.py at 1% of GPT-2 small's rows, one round: it checks
    one attached step against the float64 reference before timing, and reports the
    ratio to the step alone and the bandwidth (no speed is asserted)."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_metric_prox.py"),
                           "--scale", "0.01", "--repeats", "1", "--warmup", "0",
                           "--out", str(tmp_path)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["check_against_float64_reference"] is True
    assert set(data["median_ms"]) == {"step", "step+metric_prox", "step+euclidean_prox",
                                      "metric_prox", "euclidean_prox"}
    assert data["ratio_step_metric_prox"] > 0 and data["gbps"]["metric_prox"] > 0
    assert "step+metric_prox / step = " in proc.stdout


def test_the_group_benchmark_runs_and_checks_itself(tmp_path):
    """benchmarks/bench_group_metric.py on two small weights, one round: it checks the
    fused step against the float64 reference before timing (no speed is asserted)."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_group_metric.py"),
                           "--tensors", "2", "--size", "128", "--repeats", "1", "--warmup", "0",
                           "--out", str(tmp_path)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["check_against_float64_reference"] is True
    assert set(data["median_ms"]) == {"fused", "reference", "euclidean"}
    assert 0 < data["zero_rows"] < 256 and data["gbps_fused"] > 0
