"""fused_penalty under torch.func transforms: grad, grad_and_value, vjp, jacrev, jvp,
jacfwd, hessian and vmap (model ensembles), against torch.func of the float64 loop.

Every regext autograd Function separates forward and setup_context, defines jvp and
generates its vmap rule; the operators have batching rules (regext._batching) that
run one call over every (sample, tensor) view.
"""

import collections

import pytest
import torch
from torch.func import (functional_call, grad, grad_and_value, hessian, jacfwd, jacrev, jvp,
                        stack_module_state, vjp, vmap)

import regext

F64 = torch.float64

# (l2_squared, group, group_weight): the L2 forms of fused_penalty.
VARIANTS = {
    "tensor": (False, "tensor", None),
    "squared": (True, "tensor", None),
    "row": (False, "row", None),
    "column": (False, "column", None),
    "row_sqrt_size": (False, "row", "sqrt_size"),
}


def loop(params, l1, l2, variant="tensor"):
    """The float64 reference: l1 * sum ||p||_1 + l2 * sum of L2 terms, as torch ops."""
    l2_squared, group, group_weight = VARIANTS[variant]
    total = 0.0
    for p in params:
        x = p.to(F64)
        total = total + l1 * x.abs().sum()
        if l2_squared:
            total = total + l2 * x.pow(2).sum()
        elif group == "tensor" or x.dim() < 2:
            w = x.numel() ** 0.5 if group_weight else 1.0
            total = total + l2 * w * torch.linalg.vector_norm(x)
        else:
            rows = x if group == "row" else x.movedim(1, 0)
            rows = rows.reshape(rows.shape[0], rows[0].numel() if rows.shape[0] else 0)
            w = rows.shape[1] ** 0.5 if group_weight else 1.0
            total = total + l2 * w * torch.linalg.vector_norm(rows, dim=1).sum()
    return total


def regext_penalty(params, l1, l2, variant="tensor"):
    l2_squared, group, group_weight = VARIANTS[variant]
    return regext.fused_penalty(params, l1, l2, l2_squared=l2_squared, group=group,
                                group_weight=group_weight)


def make_params(dtype, seed=0):
    """A weight, a non-contiguous view (transposed), an all-zero tensor, a bias, a
    3-D tensor with zero slices and an empty tensor."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    conv = randn(3, 2, 4)
    conv[1] = 0.0        # a zero row
    conv[:, 0] = 0.0     # a zero column
    return [randn(5, 4), randn(6, 3).t(), torch.zeros(2, 3, dtype=dtype), randn(4), conv,
            torch.zeros(0, 3, dtype=dtype)]


def tolerances(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=1e-6)


def assert_close(actual, expected, dtype):
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_close(a, e, dtype)
        return
    torch.testing.assert_close(actual.to(F64), expected.to(F64), **tolerances(dtype))


def count_calls(fn):
    """(fn(), Counter of regext operator calls) recorded by the profiler. A call under
    vmap is recorded twice: the batched call and the one its batching rule makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, collections.Counter(e.name for e in prof.events()
                                    if e.name.startswith("regext::"))


# --------------------------------------------------------------- grad, jacrev, jvp

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_grad_grad_and_value_vjp_jacrev(dtype, variant, device):
    params = [p.to(device) for p in make_params(dtype, seed=1)]
    f = lambda ps: regext_penalty(ps, 0.3, 0.7, variant)  # noqa: E731
    ref = lambda ps: loop(ps, 0.3, 0.7, variant)  # noqa: E731
    params64 = [p.to(F64) for p in params]
    expected_grads = grad(ref)(params64)
    got = grad(f)(params)
    assert [g.dtype for g in got] == [p.dtype for p in params]
    assert_close(got, expected_grads, dtype)
    grads, value = grad_and_value(f)(params)
    assert value.dtype == dtype
    assert_close(value, ref(params64), dtype)
    assert_close(grads, expected_grads, dtype)
    value, pullback = vjp(f, params)
    assert_close(pullback(torch.tensor(2.5, dtype=dtype, device=device))[0], [2.5 * g for g in expected_grads],
                 dtype)
    assert_close(jacrev(f)(params), expected_grads, dtype)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_jvp(dtype, variant):
    params = make_params(dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    tangents = [torch.randn(p.shape, generator=gen, dtype=F64).to(dtype) for p in params]
    value, tangent = jvp(lambda *ps: regext_penalty(ps, 0.3, 0.7, variant), tuple(params),
                         tuple(tangents))
    expected_value, expected_tangent = jvp(lambda *ps: loop(ps, 0.3, 0.7, variant),
                                           tuple(p.to(F64) for p in params),
                                           tuple(t.to(F64) for t in tangents))
    assert value.dtype == tangent.dtype == dtype
    assert_close(value, expected_value, dtype)
    assert_close(tangent, expected_tangent, dtype)


def test_jvp_with_torch_autograd_forward_ad():
    torch.manual_seed(4)
    x, v = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = regext.fused_penalty([fwAD.make_dual(x, v)], 0.2, 0.5)
        tangent = fwAD.unpack_dual(out).tangent
    expected = jvp(lambda x: loop([x], 0.2, 0.5), (x,), (v,))[1]
    torch.testing.assert_close(tangent, expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hessian_and_jacfwd_of_jacrev(variant):
    torch.manual_seed(5)
    w = torch.randn(4, 3, dtype=F64)
    w[1] = 0.0  # a zero row: its group's second derivative is taken as 0, as torch's
    f = lambda w: regext_penalty([w, w[0]], 0.3, 0.7, variant)  # noqa: E731
    ref = lambda w: loop([w, w[0]], 0.3, 0.7, variant)  # noqa: E731
    if variant == "tensor":
        expected = hessian(ref)(w)
    else:
        expected = jacfwd(jacrev(ref))(w)
    torch.testing.assert_close(hessian(f)(w), expected)
    torch.testing.assert_close(jacfwd(jacrev(f))(w), expected)
    torch.testing.assert_close(jacrev(jacrev(f))(w), expected)


@pytest.mark.parametrize("squared", [False, True])
def test_coefficient_tensors_grad_jvp_and_meta_gradient(squared):
    """l1 and l2 as 0-dim tensors: gradients and tangents reach them, and a
    meta-gradient (through an inner SGD step on the weights) matches the loop's."""
    variant = "squared" if squared else "tensor"
    torch.manual_seed(6)
    w = torch.randn(4, 3, dtype=F64)
    l1, l2 = torch.tensor(0.3, dtype=F64), torch.tensor(0.7, dtype=F64)
    for fn, ref in [(lambda w, a, b: regext_penalty([w], a, b, variant),
                     lambda w, a, b: loop([w], a, b, variant))]:
        torch.testing.assert_close(grad(fn, argnums=(0, 1, 2))(w, l1, l2),
                                   grad(ref, argnums=(0, 1, 2))(w, l1, l2))
        tangents = (torch.randn_like(w), torch.tensor(0.4, dtype=F64),
                    torch.tensor(-1.1, dtype=F64))
        torch.testing.assert_close(jvp(fn, (w, l1, l2), tangents),
                                   jvp(ref, (w, l1, l2), tangents))

    def meta_loss(l2, penalty):
        inner = w - 0.1 * grad(lambda w: (w.sum() - 1.0) ** 2 + penalty([w], 0.3, l2))(w)
        return (inner ** 2).sum()

    torch.testing.assert_close(
        grad(meta_loss)(l2, lambda ps, a, b: regext_penalty(ps, a, b, variant)),
        grad(meta_loss)(l2, lambda ps, a, b: loop(ps, a, b, variant)))


# ------------------------------------------------------------------------------- vmap

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 7)
        self.fc2 = torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def ensemble(dtype, n=8, seed=7, device="cpu"):
    torch.manual_seed(seed)
    models = [MLP().to(dtype=dtype, device=device) for _ in range(n)]
    with torch.no_grad():
        models[2].fc1.weight.zero_()       # a zero weight in one model
        models[3].fc2.weight[1].zero_()    # a zero row in another
    return models, stack_module_state(models)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_vmap_ensemble_of_eight_models_one_operator_call(dtype, variant, device):
    models, (stacked, _) = ensemble(dtype, device=device)
    l1, l2 = 1e-3, 2e-2
    penalties, calls = count_calls(
        lambda: vmap(lambda ps: regext_penalty(ps.values(), l1, l2, variant))(stacked))
    forward_op = "regext::penalty_forward" if variant in ("tensor", "squared") \
        else "regext::group_penalty_forward"
    assert calls[forward_op] <= 2, calls  # the batched call and one real one, not 8
    assert penalties.shape == (8,) and penalties.dtype == dtype
    expected = torch.stack([loop(m.parameters(), l1, l2, variant) for m in models])
    assert_close(penalties, expected, dtype)

    # Per-model gradients, one backward operator call for all eight models.
    grads, calls = count_calls(
        lambda: vmap(grad(lambda ps: regext_penalty(ps.values(), l1, l2, variant)))(stacked))
    if variant in ("tensor", "squared"):
        assert calls["regext::penalty_backward"] <= 2, calls
    for i, m in enumerate(models):
        expected = grad(lambda ps: loop(ps.values(), l1, l2, variant))(
            {k: v.to(F64) for k, v in m.named_parameters()})
        assert_close([grads[k][i] for k in expected], list(expected.values()), dtype)


def test_vmap_ensemble_loss_plus_penalty_functional_call():
    """The usual ensemble step: per-model loss + penalty, per-model gradients."""
    models, (stacked, buffers) = ensemble(F64)
    base = MLP().to("meta")
    x, y = torch.randn(10, 5, dtype=F64), torch.randn(10, 3, dtype=F64)

    def step(penalty):
        def loss(ps, bs):
            out = functional_call(base, (ps, bs), (x,))
            return ((out - y) ** 2).mean() + penalty(ps.values(), 1e-3, 1e-2)
        return vmap(grad_and_value(loss))(stacked, buffers)

    (grads, values), (ref_grads, ref_values) = step(regext.fused_penalty), step(
        lambda ps, a, b: loop(ps, a, b))
    torch.testing.assert_close(values, ref_values)
    torch.testing.assert_close(grads, ref_grads)


@pytest.mark.parametrize("variant", ["tensor", "row"])
def test_per_sample_gradients_with_a_shared_penalty(variant):
    """vmap over data, parameters shared (in_dims None): the penalty is computed once,
    and its gradient reaches every sample's gradient (a batched grad_total)."""
    torch.manual_seed(11)
    model = torch.nn.Linear(4, 3).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)

    def per_sample(penalty):
        def loss(ps, x, y):
            out = functional_call(model, ps, (x[None],))
            return ((out - y) ** 2).sum() + penalty(ps.values(), 0.1, 0.2, variant)
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    torch.testing.assert_close(per_sample(regext_penalty), per_sample(loop))


@pytest.mark.parametrize("variant", ["tensor", "squared", "column"])
def test_vmap_batched_coefficients_shared_params_and_other_batch_dims(variant):
    """Per-model l1/l2 tensors, a parameter shared by every sample (in_dims None) and
    a batch dimension other than 0; values, per-sample gradients (of the weights and
    of the coefficients) and Hessians."""
    torch.manual_seed(8)
    batch = 5
    w = torch.randn(4, batch, 3, dtype=F64)          # batch dim 1
    w[:, 2] = 0.0                                    # sample 2's weight is zero
    shared = torch.randn(3, 2, dtype=F64)
    l1s = torch.rand(batch, dtype=F64)
    l2s = torch.rand(batch, dtype=F64)

    def f(w, shared, l1, l2, penalty):
        return penalty([w, shared, w.t()], l1, l2, variant)

    in_dims = (1, None, 0, 0)
    for args in [(w, shared, l1s, l2s), (w, shared, 0.2, 0.5)]:
        dims = in_dims[:2] + tuple(0 if isinstance(a, torch.Tensor) else None for a in args[2:])
        got = vmap(lambda *a: f(*a, regext_penalty), in_dims=dims)(*args)
        expected = vmap(lambda *a: f(*a, loop), in_dims=dims)(*args)
        torch.testing.assert_close(got, expected)
    argnums = (0, 1, 2, 3)
    got = vmap(grad(lambda *a: f(*a, regext_penalty), argnums=argnums), in_dims=in_dims)(
        w, shared, l1s, l2s)
    expected = vmap(grad(lambda *a: f(*a, loop), argnums=argnums), in_dims=in_dims)(
        w, shared, l1s, l2s)
    torch.testing.assert_close(got, expected)
    # Only the coefficients batched: the parameters are read once.
    got = vmap(lambda a, b: regext_penalty([shared], a, b, variant))(l1s, l2s)
    torch.testing.assert_close(got, vmap(lambda a, b: loop([shared], a, b, variant))(l1s, l2s))
    got = vmap(grad(lambda s, a, b: regext_penalty([s], a, b, variant)), in_dims=(None, 0, 0))(
        shared, l1s, l2s)
    expected = vmap(grad(lambda s, a, b: loop([s], a, b, variant)), in_dims=(None, 0, 0))(
        shared, l1s, l2s)
    torch.testing.assert_close(got, expected)
    got = vmap(hessian(lambda w: regext_penalty([w, w.t()], 0.2, 0.5, variant)), in_dims=1)(w)
    expected = vmap(hessian(lambda w: loop([w, w.t()], 0.2, 0.5, variant)), in_dims=1)(w)
    torch.testing.assert_close(got, expected)


def test_vmap_of_jvp_jacfwd_and_jacrev_of_vmap():
    torch.manual_seed(9)
    w = torch.randn(6, 4, 3, dtype=F64)
    v = torch.randn(6, 4, 3, dtype=F64)
    f = lambda w: regext.fused_penalty([w, w[1:]], 0.3, 0.7)  # noqa: E731
    ref = lambda w: loop([w, w[1:]], 0.3, 0.7)  # noqa: E731
    torch.testing.assert_close(vmap(lambda w, v: jvp(f, (w,), (v,)))(w, v),
                               vmap(lambda w, v: jvp(ref, (w,), (v,)))(w, v))
    torch.testing.assert_close(vmap(jacfwd(f))(w), vmap(jacfwd(ref))(w))
    torch.testing.assert_close(jacrev(vmap(f))(w), jacrev(vmap(ref))(w))
    torch.testing.assert_close(jacfwd(vmap(f))(w), jacfwd(vmap(ref))(w))


def test_vmap_nested_and_empty_batch():
    torch.manual_seed(10)
    w = torch.randn(2, 3, 4, 5)
    got = vmap(vmap(lambda w: regext.fused_penalty([w, w.t()], 0.1, 0.2, group="row")))(w)
    expected = vmap(vmap(lambda w: loop([w, w.t()], 0.1, 0.2, "row")))(w)
    torch.testing.assert_close(got, expected.float())
    empty = vmap(lambda w: regext.fused_penalty([w], 0.1, 0.2))(torch.zeros(0, 3))
    assert empty.shape == (0,)


@pytest.mark.parametrize("variant", ["tensor", "squared", "row"])
def test_vmap_grad_of_some_params_and_groups_without_rows(variant):
    """Gradients of a subset of the list (the backward's stats rows), a tensor listed
    twice, a group layout with no groups (shape [0, 3] by rows), nested vmaps with
    coefficients batched at both levels."""
    torch.manual_seed(12)
    a, b = torch.randn(4, 3, 2, dtype=F64), torch.randn(4, 5, dtype=F64)
    empty = torch.zeros(4, 0, 3, dtype=F64)

    def f(penalty):
        return vmap(grad(lambda b, a, e: penalty([a, e, b, a], 0.2, 0.5, variant)))(b, a, empty)

    torch.testing.assert_close(f(regext_penalty), f(loop))
    values = vmap(lambda e: regext_penalty([e], 0.2, 0.5, variant))(empty)
    torch.testing.assert_close(values, torch.zeros(4, dtype=F64))
    l2 = torch.rand(3, 4, dtype=F64)

    def nested(penalty):
        return vmap(vmap(lambda a, l2: penalty([a, a.t()], 0.2, l2, variant)),
                    in_dims=(None, 0))(a, l2)

    torch.testing.assert_close(nested(regext_penalty), nested(loop))


def test_vmap_nonfinite_propagates():
    w = torch.randn(3, 4, dtype=F64)
    w[1, 2] = float("nan")
    w[2, 0] = float("inf")
    got = vmap(lambda w: regext.fused_penalty([w], 0.1, 0.2))(w)
    assert torch.isfinite(got[0]) and got[1].isnan() and got[2].isinf()
    torch.testing.assert_close(got, vmap(lambda w: loop([w], 0.1, 0.2))(w), equal_nan=True)
    grads = vmap(grad(lambda w: regext.fused_penalty([w], 0.1, 0.2)))(w)
    assert torch.isfinite(grads[0]).all() and grads[1].isnan().all()


def test_plain_calls_keep_the_plain_function():
    """Outside torch.func and forward AD, the Function without setup_context (whose
    apply binds no signature) and without jvp (torch.compile traces it) is used."""
    w = torch.randn(3, 2, requires_grad=True)
    assert type(regext.fused_penalty([w], 0.1, 0.2).grad_fn).__name__ == "_FusedPenaltyBackward"
    g, = torch.autograd.grad(regext.fused_penalty([w], 0.1, 0.2), [w], create_graph=True)
    assert type(g.grad_fn).__name__ == "PenaltyGradBackward"


# ----------------------------------------------------------------------------- errors

def test_vmap_negative_batched_coefficient_raises():
    with pytest.raises(ValueError, match="l2 must be finite numbers >= 0"):
        vmap(lambda b: regext.fused_penalty([torch.ones(3)], 0.1, b))(
            torch.tensor([0.5, -1.0], dtype=F64))
