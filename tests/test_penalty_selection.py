"""Penalty: parameter selection (exclude), per-group coefficients, autograd / in-place / prox."""

import math
import warnings

import pytest
import torch
from torch import nn

import regext
from regext.reference import penalty_loop

from conftest import grads_of


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(),
                                   nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx):
        return self.head(self.norm(self.block(self.embed(idx)))).mean()


def _net(device, seed=0):
    torch.manual_seed(seed)
    return Net().to(device)


def test_exclude_glob_patterns(device):
    model = _net(device)
    pen = regext.Penalty(model, 0.1, 0.2, exclude=["*bias", "norm*"])
    assert pen.names == ("embed.weight", "block.0.weight", "block.1.weight", "block.3.weight",
                         "head.weight")
    assert pen.excluded == ("block.0.bias", "block.1.bias", "block.3.bias", "norm.weight",
                            "norm.bias", "head.bias")
    named = dict(model.named_parameters())
    assert [p for p in pen.parameters()] == [named[n] for n in pen.names]
    assert [n for n, _ in pen.named_parameters()] == list(pen.names)
    assert len(pen) == 5
    selected = [named[n] for n in pen.names]
    value = pen()
    torch.testing.assert_close(value, penalty_loop(selected, 0.1, 0.2))
    value.backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in pen.excluded)


def test_exclude_single_string_and_callable(device):
    model = _net(device)
    assert regext.Penalty(model, 0.1, exclude="*bias").names == \
        regext.Penalty(model, 0.1, exclude=["*bias"]).names
    one_d = regext.Penalty(model, 0.1, exclude=lambda name, p: p.ndim < 2)
    assert one_d.names == ("embed.weight", "block.0.weight", "block.3.weight", "head.weight")
    everything = regext.Penalty(model, 0.1)
    assert everything.names == tuple(n for n, _ in model.named_parameters())


def test_unmatched_pattern_warns(device):
    with pytest.warns(UserWarning, match="'*Bias' matches no parameter name"):
        regext.Penalty(_net(device), 0.1, exclude=["*bias", "*Bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regext.Penalty(_net(device), 0.1, exclude=["*bias"])


def test_overrides_make_groups_with_their_own_coefficients(device):
    model = _net(device)
    pen = regext.Penalty(model, l1=0.01, l2=0.1, exclude="*bias",
                         overrides={"embed.*": {"l2": 0.0}, "norm.*": {"l1": 0.0},
                                    "head.*": {"l2": 0.3, "l2_squared": True}})
    groups = {(g.l1, g.l2, g.l2_squared): g.names for g in pen.groups}
    assert groups == {(0.01, 0.0, False): ("embed.weight",),
                      (0.01, 0.1, False): ("block.0.weight", "block.1.weight",
                                           "block.3.weight"),
                      (0.0, 0.1, False): ("norm.weight",),
                      (0.01, 0.3, True): ("head.weight",)}
    named = dict(model.named_parameters())
    expected = sum(penalty_loop([named[n] for n in names], l1, l2, l2_squared=sq)
                   for (l1, l2, sq), names in groups.items())
    value = pen()
    torch.testing.assert_close(value, expected)
    params = pen.parameters()
    for g, h in zip(grads_of(value, params), grads_of(expected, params)):
        torch.testing.assert_close(g, h)
    assert "(l1=0.01, l2=0.3, squared: 1 tensors)" in repr(pen)


def test_callable_overrides(device):
    model = _net(device)
    pen = regext.Penalty(model, l1=0.0, l2=0.1,
                         overrides=lambda name, p: {"l2": 0.5} if p.ndim == 2 else None)
    assert {g.l2 for g in pen.groups} == {0.1, 0.5}


def test_add_grad_equals_autograd_of_call(device):
    model, ref = _net(device), _net(device)
    idx = torch.randint(0, 20, (6,), device=device)
    kwargs = dict(l1=1e-2, l2=1e-1, exclude=["*bias", "norm*"],
                  overrides={"head.*": {"l2_squared": True}})
    pen, ref_pen = regext.Penalty(model, **kwargs), regext.Penalty(ref, **kwargs)
    model(idx).backward()
    value = pen.add_grad_()
    (ref(idx) + ref_pen()).backward()
    assert value.grad_fn is None
    torch.testing.assert_close(value, ref_pen().detach())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_prox_is_the_proximal_map_of_each_group(device):
    model = _net(device)
    pen = regext.Penalty(model, l1=0.5, l2=2.0, exclude="*bias",
                         overrides={"head.*": {"l2_squared": True}, "norm.*": {"l2": 0.0}})
    named = {n: p.detach().clone() for n, p in model.named_parameters()}
    pen.prox_(0.1)
    for name, p in model.named_parameters():
        x = named[name]
        if name in pen.excluded:
            assert torch.equal(p, x)
            continue
        s = x.sign() * (x.abs() - 0.05).clamp(min=0)
        if name.startswith("head."):
            expected = s / (1 + 2 * 0.1 * 2.0)
        elif name.startswith("norm."):
            expected = s
        else:
            norm = s.norm()
            expected = s * (1 - 0.2 / norm).clamp(min=0) if norm > 0 else s
        torch.testing.assert_close(p.detach(), expected, msg=name)
    assert regext.sparsity(pen.parameters()) > 0


def test_named_pairs_and_tied_weights(device):
    torch.manual_seed(0)
    a = nn.Linear(4, 4, bias=False).to(device)
    model = nn.Sequential(a, nn.Tanh(), a)  # the same weight twice: counted once
    pen = regext.Penalty(model, 0.1, 0.1)
    assert pen.names == ("0.weight",)
    torch.testing.assert_close(pen(), penalty_loop([a.weight], 0.1, 0.1))
    pairs = regext.Penalty([("w", a.weight), ("w_again", a.weight)], 0.1, 0.1)
    torch.testing.assert_close(pairs(), penalty_loop([a.weight, a.weight], 0.1, 0.1))


def test_parameters_moved_after_construction_are_followed():
    model = _net("cpu")
    pen = regext.Penalty(model, 0.1, 0.1, exclude="*bias")
    model.double()  # updates the cached Parameter objects in place
    value = pen()
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, penalty_loop(pen.parameters(), 0.1, 0.1))


def test_empty_selection(device):
    pen = regext.Penalty(_net(device), 0.1, 0.1, exclude="*")
    assert len(pen) == 0 and pen.groups == ()
    assert pen().item() == 0.0 and pen.add_grad_().item() == 0.0
    pen.prox_(0.1)


def test_compiled_loss_fullgraph_matches_eager(device):
    model, ref = _net(device), _net(device)
    idx = torch.randint(0, 20, (6,), device=device)
    kwargs = dict(l1=1e-2, l2=1e-1, exclude=["*bias", "norm*"],
                  overrides={"head.*": {"l2_squared": True}})
    pen, ref_pen = regext.Penalty(model, **kwargs), regext.Penalty(ref, **kwargs)

    def loss_fn(m, p, inp):
        return m(inp) + p()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(model, pen, idx)
    loss.backward()
    ref_loss = loss_fn(ref, ref_pen, idx)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(pen, fullgraph=True)(), ref_pen())


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["l1", "l2"])
@pytest.mark.parametrize("bad", [-1.0, math.nan, "x"])
def test_bad_coefficient(name, bad):
    with pytest.raises(ValueError, match=rf"Penalty: {name} must be a finite number >= 0"):
        regext.Penalty(_net("cpu"), **{name: bad})


def test_bad_override():
    model = _net("cpu")
    with pytest.raises(ValueError, match=r"unknown keys \['weight_decay'\]"):
        regext.Penalty(model, overrides={"*": {"weight_decay": 0.1}})
    with pytest.raises(ValueError, match=r"Penalty: l2 of 'head.weight' must be a finite"):
        regext.Penalty(model, overrides={"head.*": {"l2": -1.0}})
    with pytest.raises(TypeError, match=r"overrides\['head.\*'\] must be a dict"):
        regext.Penalty(model, overrides={"head.*": 0.1})
    with pytest.raises(TypeError, match="overrides must be a dict"):
        regext.Penalty(model, overrides=[("head.*", {"l2": 0.1})])


def test_bad_sources_and_excludes():
    model = _net("cpu")
    with pytest.raises(TypeError, match=r"element 0 is a Parameter, not a \(name, tensor\) pair"):
        regext.Penalty(model.parameters(), 0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        regext.Penalty(torch.randn(3), 0.1)
    with pytest.raises(TypeError, match=r"exclude\[1\] is a int, not a glob pattern"):
        regext.Penalty(model, 0.1, exclude=["*bias", 3])
    with pytest.raises(TypeError, match="exclude must be a callable"):
        regext.Penalty(model, 0.1, exclude=3)
    with pytest.raises(TypeError, match=r"Penalty: steps has dtype torch.int64"):
        regext.Penalty([("steps", torch.arange(3))], 0.1)


# ---- frozen parameters: decided at each call ----------------------------------------------

def test_frozen_parameters_are_left_out_of_value_gradient_and_prox(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).to(device)
    model[0].requires_grad_(False)  # fine-tuning the head only
    pen = regext.Penalty(model, l1=1.0, exclude="*bias")
    frozen_before = model[0].weight.detach().clone()
    torch.testing.assert_close(pen(), penalty_loop([model[1].weight], 1.0, 0.0))
    pen.add_grad_()
    assert model[0].weight.grad is None and model[1].weight.grad is not None
    pen.prox_(10.0)  # lr * l1 = 10: every free weight becomes exactly zero
    assert torch.equal(model[0].weight.detach(), frozen_before)
    assert torch.equal(model[1].weight.detach(), torch.zeros(2, 2, device=device))


def test_unfreezing_brings_a_parameter_back(device):
    model = nn.Linear(3, 3, bias=False).to(device)
    pen = regext.Penalty(model, l1=0.5, l2=0.25)
    model.weight.requires_grad_(False)
    assert pen().item() == 0.0 and pen.add_grad_().item() == 0.0
    model.weight.requires_grad_(True)
    torch.testing.assert_close(pen(), penalty_loop([model.weight], 0.5, 0.25))


def test_the_function_api_counts_frozen_tensors_as_the_loop_does(device):
    model = nn.Linear(3, 3).to(device)
    model.bias.requires_grad_(False)
    params = list(model.parameters())
    torch.testing.assert_close(regext.fused_penalty(params, 0.5, 0.25),
                               penalty_loop(params, 0.5, 0.25))
    before = model.bias.detach().clone()
    regext.prox_l1_(params, 0.01)
    assert not torch.equal(model.bias.detach(), before)  # explicit lists: updated too


# ---- coefficients change between calls ----------------------------------------------------

def test_coefficients_can_change_between_calls(device):
    model = _net(device)
    pen = regext.Penalty(model, l1=0.1, l2=0.2, exclude="*bias",
                         overrides={"head.*": {"l2": 0.5}})
    params = pen.parameters()
    pen.l1 = 0.3
    head = next(g for g in pen.groups if g.names == ("head.weight",))
    others = [p for n, p in pen.named_parameters() if n != "head.weight"]
    want = penalty_loop(others, 0.3, 0.2) + penalty_loop([head.params[0]], 0.3, 0.5)
    torch.testing.assert_close(pen(), want)
    head.l2 = torch.tensor(0.0)
    torch.testing.assert_close(pen(), penalty_loop(others, 0.3, 0.2)
                               + penalty_loop([head.params[0]], 0.3, 0.0))
    head.l2 = None  # follows the Penalty's l2 again
    torch.testing.assert_close(pen(), penalty_loop(params, 0.3, 0.2))
    pen.l2 = lambda step: 0.1 * step
    pen.step = 3
    torch.testing.assert_close(pen(), penalty_loop(params, 0.3, 0.3))
    with pytest.raises(ValueError, match="Penalty: l1 must be a finite number >= 0"):
        pen.l1 = -1.0


# ---- errors and warnings name the parameter -----------------------------------------------

def test_errors_inside_penalty_name_the_parameter(device):
    model = _net(device)
    pen = regext.Penalty(model, l1=0.1, exclude="*bias")
    model.embed.weight.grad = torch.zeros(20, 8, device=device).to_sparse()
    with pytest.raises(TypeError, match=r"Penalty.add_grad_: embed.weight.grad has layout "
                                        r"torch.sparse_coo"):
        pen.add_grad_()
    model.embed.weight.grad = None
    model.head.weight.data = model.head.weight.data.to(torch.complex64)
    with pytest.raises(TypeError, match=r"Penalty: head.weight has dtype torch.complex64"):
        pen()
    expanded = torch.zeros(1, device=device).expand(4).requires_grad_()
    with pytest.raises(ValueError, match=r"Penalty.prox_: w has overlapping memory"):
        regext.Penalty([("v", torch.zeros(3, device=device, requires_grad=True)),
                        ("w", expanded)], l1=0.1).prox_(0.1)


def test_error_if_nonfinite_names_the_offending_parameter(device):
    model = _net(device)
    with torch.no_grad():
        model.block[3].weight[0, 0] = float("nan")
    pen = regext.Penalty(model, l1=0.1, exclude="*bias", error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=r"Penalty: the penalty is nan because block.3.weight"):
        pen()
    with pytest.raises(RuntimeError, match=r"Penalty.add_grad_: .*block.3.weight"):
        pen.add_grad_()
    assert all(p.grad is None for p in model.parameters())  # nothing was touched
    assert torch.isnan(regext.Penalty(model, l1=0.1)())  # off by default: no error


def test_excluding_a_tied_alias_warns_that_the_tensor_stays_penalized():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head})
    with pytest.warns(UserWarning, match=r"'head.weight', an alias of 'emb.weight' .* stays "
                                         r"penalized unless 'emb.weight' is matched too"):
        pen = regext.Penalty(model, l1=0.1, exclude="head.weight")
    assert pen.names == ("emb.weight",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regext.Penalty(model, l1=0.1, exclude=["head.weight", "emb.weight"])


def test_a_single_tensor_or_bare_tensors_get_a_message_that_names_what_works():
    w = torch.randn(3, 2)
    with pytest.raises(TypeError, match=r"Penalty: expected an nn.Module or \(name, tensor\) "
                                        r"pairs, got a single Tensor \(shape \(3, 2\), dtype "
                                        r"torch.float32\); pass \[\('weight', tensor\)\]"):
        regext.Penalty(w, 0.1)
    with pytest.raises(TypeError, match=r"element 0 is a Tensor, not a \(name, tensor\) pair; "
                                        r"pass a module, module.named_parameters\(\), or pairs "
                                        r"such as \[\('weight', tensor\)\]"):
        regext.Penalty([w], 0.1)
    # What the messages suggest works.
    assert regext.Penalty([("weight", w)], 0.1).names == ("weight",)
