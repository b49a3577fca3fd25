"""The group lasso (group="row" / "column", group_weight="sqrt_size") through the public
API: fused_penalty, add_penalty_grad_, prox_group_l2_, Penalty and sparsity_report,
against float64 autograd of torch.linalg.vector_norm(..., dim=...)."""

import math

import pytest
import torch

import regext
from regext.reference import group_lasso_float64, group_rows_reference

from conftest import DEVICES, TOLERANCES, grads_of

GROUPS = {"tensor": -1, "row": 0, "column": 1}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def random_shapes(gen, count=8):
    """Random shapes with the edge cases every time: one row, one column, zero size,
    a conv weight, a vector."""
    shapes = [(1, 7), (6, 1), (0, 5), (5, 0), (4, 3, 3, 3), (9,), (2, 33000)]
    for _ in range(count):
        ndim = int(torch.randint(2, 5, (1,), generator=gen))
        shapes.append(tuple(int(s) for s in torch.randint(1, 12, (ndim,), generator=gen)))
    return shapes


def views(gen, shapes, dtype, device):
    """Each shape as a contiguous tensor, a transposed (dense) view and a strided
    (non-dense) slice, in turn."""
    out = []
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if i % 3 == 1 and x.dim() >= 2:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)   # same shape, other strides
        elif i % 3 == 2 and x.dim() >= 2:
            x = torch.randn((shape[0], 2 * shape[1]) + shape[2:], generator=gen,
                            dtype=torch.float64)[:, ::2]         # not dense
        out.append(x.to(dtype=dtype, device=device).requires_grad_())
    return out


def reference(params, group, group_weight, l1, l2):
    dims = [GROUPS[group]] * len(params)
    return group_lasso_float64(params, dims, l1, l2, group_weight == "sqrt_size")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_weight", [None, "sqrt_size"])
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_and_gradients_match_float64_autograd(dtype, group, group_weight, device):
    gen = torch.Generator().manual_seed(hash((str(dtype), group, group_weight)) % 2**31)
    params = views(gen, random_shapes(gen), dtype, device)
    value = regext.fused_penalty(params, 0.3, 0.7, group=group, group_weight=group_weight)
    want = reference(params, group, group_weight, 0.3, 0.7)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert math.isclose(value.item(), want.item(), rel_tol=1e-6 if dtype != torch.float64 else 1e-12)
    rtol, atol = TOLERANCES[dtype]
    want_grads = grads_of(want, params)
    for got, exp, p in zip(grads_of(value, params), want_grads, params):
        assert got.dtype == p.dtype and got.shape == p.shape
        torch.testing.assert_close(got, exp, rtol=rtol, atol=atol)

    # add_penalty_grad_ gives the same gradients (created, then accumulated).
    for p in params:
        p.grad = None
    total = regext.add_penalty_grad_(params, 0.3, 0.7, group=group, group_weight=group_weight)
    assert math.isclose(total.item(), value.item(), rel_tol=1e-6)
    first = [p.grad.clone() for p in params]
    regext.add_penalty_grad_(params, 0.3, 0.7, group=group, group_weight=group_weight)
    for p, g, exp in zip(params, first, want_grads):
        torch.testing.assert_close(g, exp, rtol=rtol, atol=atol)
        torch.testing.assert_close(p.grad.double(), 2 * g.double(), rtol=2 * rtol, atol=2 * atol)


@pytest.mark.parametrize("group_weight", [None, "sqrt_size"])
@pytest.mark.parametrize("group", ["row", "column"])
def test_gradcheck_and_gradgradcheck(group, group_weight):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
              for s in [(4, 3), (3, 2, 2, 2), (5,), (1, 4)]]
    with torch.no_grad():
        params[0][1] = 0.0  # a zero group (checked at the end)
    params[0] = params[0].detach().requires_grad_()

    def f(*ps):
        return regext.fused_penalty(ps, 0.0, 0.7, group=group, group_weight=group_weight)
    nonzero = [p.detach().clone().requires_grad_() for p in params]
    with torch.no_grad():
        nonzero[0][1] = 1.0
    assert torch.autograd.gradcheck(f, nonzero)
    assert torch.autograd.gradgradcheck(f, nonzero)
    l1 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    l2 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: regext.fused_penalty(nonzero, a, b, group=group, group_weight=group_weight),
        (l1, l2))
    # The zero group: gradient 0 for its L2 term, as torch's norm backward.
    value = f(*params)
    grad = torch.autograd.grad(value, params[0])[0]
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_row_and_column_groups_of_a_linear_weight_are_its_rows_and_columns():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    row = regext.fused_penalty([w], 0.0, 1.0, group="row")
    column = regext.fused_penalty([w], 0.0, 1.0, group="column")
    assert row.item() == pytest.approx(5.0 + 0.0 + 1.0)
    assert column.item() == pytest.approx(math.sqrt(10.0) + 4.0)
    weighted = regext.fused_penalty([w], 0.0, 1.0, group="row", group_weight="sqrt_size")
    assert weighted.item() == pytest.approx(math.sqrt(2) * 6.0)
    bias = torch.tensor([3.0, 4.0])  # fewer than 2 dims: one group
    assert regext.fused_penalty([bias], 0.0, 1.0, group="column").item() == pytest.approx(5.0)


@pytest.mark.parametrize("group_weight", [None, "sqrt_size"])
@pytest.mark.parametrize("group", ["row", "column"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_zeroes_exactly_the_groups_below_the_threshold(dtype, group, group_weight):
    gen = torch.Generator().manual_seed(4)
    params = [p.detach() for p in views(gen, random_shapes(gen), dtype, "cpu")]
    threshold = 1.5
    before = [p.clone() for p in params]
    regext.prox_group_l2_(params, threshold, group=group, group_weight=group_weight)
    dim = GROUPS[group]
    for old, new in zip(before, params):
        rows_old = group_rows_reference(old, dim)
        rows_new = group_rows_reference(new, dim)
        weight = rows_old.shape[1] ** 0.5 if group_weight else 1.0
        norms = rows_old.pow(2).sum(dim=1, keepdim=True).sqrt()
        scale = torch.where(norms <= threshold * weight, 0.0, 1 - threshold * weight / norms)
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(rows_new, rows_old * scale, rtol=rtol, atol=atol)
        gone = (norms <= threshold * weight).squeeze(1)
        assert (rows_new[gone] == 0).all()  # exact zeros, whole groups


def test_nan_and_inf_stay_in_their_groups():
    w = torch.randn(4, 6)
    w[1, 2] = float("nan")
    w[3, 0] = float("inf")
    w.requires_grad_()
    value = regext.fused_penalty([w], 0.0, 1.0, group="row")
    assert math.isnan(value.item())
    (grad,) = torch.autograd.grad(value, w)
    assert grad[1].isnan().all() and torch.isfinite(grad[[0, 2]]).all()
    with torch.no_grad():
        x = w.detach().clone()
        regext.prox_group_l2_([x], 0.1, group="row")
        assert torch.equal(x[1].isnan(), w[1].isnan())  # NaN row unchanged
        assert x[3, 0] == float("inf") and torch.equal(x[3, 1:], w[3, 1:])  # inf row unchanged
        assert not torch.equal(x[0], w[0])  # the others shrunk


def test_bitwise_identical_across_thread_counts():
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in
              [(3000, 700), (700, 3000), (64, 128, 3, 3), (2, 300_000), (50_000, 3), (800,)]]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            for group in ("row", "column"):
                value = regext.fused_penalty(params, 0.1, 0.2, group=group)
                xs = [p.detach().clone() for p in params]
                regext.prox_group_l2_(xs, 0.5, group=group)
                results.append((group, value, grads_of(value, params), xs))
    finally:
        torch.set_num_threads(old)
    for group, value, grads, xs in results[2:]:
        first = results[0] if group == "row" else results[1]
        assert torch.equal(value, first[1])
        assert all(torch.equal(a, b) for a, b in zip(grads, first[2]))
        assert all(torch.equal(a, b) for a, b in zip(xs, first[3]))


def test_a_tensor_listed_twice_counts_twice():
    w = torch.randn(5, 4, requires_grad=True)
    once = regext.fused_penalty([w], 0.1, 0.2, group="column")
    twice = regext.fused_penalty([w, w], 0.1, 0.2, group="column")
    assert twice.item() == pytest.approx(2 * once.item())
    w.grad = None
    regext.add_penalty_grad_([w, w], 0.1, 0.2, group="column")
    torch.testing.assert_close(w.grad, 2 * grads_of(once, [w])[0])


def test_frozen_parameters_get_no_gradient_and_keep_their_rows():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(5, 2)  # frozen: counts in the value, no gradient
    value = regext.fused_penalty([a, b], 0.0, 1.0, group="row")
    want = reference([a, b], "row", None, 0.0, 1.0)
    assert value.item() == pytest.approx(want.item())
    (grad,) = torch.autograd.grad(value, [a])
    torch.testing.assert_close(grad, grads_of(want, [a])[0].float())


def test_bad_arguments_name_themselves():
    w = torch.randn(3, 3)
    with pytest.raises(ValueError, match="group must be one of"):
        regext.fused_penalty([w], 0.0, 1.0, group="rows")
    with pytest.raises(ValueError, match="group_weight must be None or 'sqrt_size'"):
        regext.add_penalty_grad_([w], 0.0, 1.0, group="row", group_weight="size")
    with pytest.raises(ValueError, match="needs the Euclidean norm"):
        regext.fused_penalty([w], 0.0, 1.0, group="row", l2_squared=True)
    with pytest.raises(ValueError, match="group must be one of"):
        regext.prox_group_l2_([w], 0.1, group=0)
    with pytest.raises(ValueError, match="group_dims\\[0\\] = 2"):
        torch.ops.regext.group_penalty_forward([w], [2], torch.tensor(0.0), torch.tensor(1.0),
                                               False)
    with pytest.raises(ValueError, match="group_dims has 2 entries"):
        torch.ops.regext.prox_group_lasso_([w], [0, 1], torch.tensor(1.0), False)
    stats = torch.zeros(3, 2, dtype=torch.float64)
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    with pytest.raises(ValueError, match="group_dims\\[0\\] = 5; use -1"):
        torch.ops.regext.group_penalty_backward(one, [w], [5], stats, zero, one, False, [0])
    with pytest.raises(ValueError, match="group_dims\\[0\\] = 3; use -1"):
        torch.ops.regext.group_penalty_grad_accumulate_([torch.zeros(3, 3)], [w], [3], stats,
                                                        zero, one, False, [0])
    with pytest.raises(RuntimeError, match="first_rows\\[0\\] = 2 with 3 groups"):
        torch.ops.regext.group_penalty_backward(torch.tensor(1.0), [w], [0],
                                                torch.zeros(3, 2, dtype=torch.float64),
                                                torch.tensor(0.0), torch.tensor(1.0), False, [2])


def test_penalty_overrides_choose_groups_per_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                torch.nn.Conv1d(8, 4, 3))
    pen = regext.Penalty(model, l2=0.5, group="row", exclude=lambda n, p: p.ndim < 2,
                         overrides={"2.*": {"group": "column", "group_weight": "sqrt_size"}})
    assert len(pen.groups) == 2
    assert "group='column'" in repr(pen)
    w0, w2 = model[0].weight, model[2].weight
    want = (group_lasso_float64([w0], [0], 0.0, 0.5)
            + group_lasso_float64([w2], [1], 0.0, 0.5, sqrt_size=True))
    assert pen().item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="parameter '0.weight' \\(group='row' and group_weight="
                       "None from the Penalty's defaults.*needs the Euclidean norm"):
        regext.Penalty(model, l2=0.5, group="row", l2_squared=True)
    with pytest.raises(ValueError, match="parameter '0.weight'.*from its override.*needs the "
                                         "Euclidean norm"):
        regext.Penalty(model, l2=0.5, overrides={"0.*": {"group": "row", "l2_squared": True}})
    # Fewer than 2 dims: one group whatever the default says, so the squared form is fine;
    # and the defaults are judged per parameter, after its overrides.
    pen = regext.Penalty(model, l2=0.5, group="row", overrides={"*bias": {"l2_squared": True}})
    assert {g.l2_squared for g in pen.groups} == {True, False}
    regext.Penalty(model, l2=0.5, group="row", l2_squared=True,
                   overrides={"*weight": {"l2_squared": False}})


def test_penalty_prox_and_attach_zero_whole_neurons():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    pen = regext.Penalty(model, l2=0.05, group="row", exclude=lambda n, p: p.ndim < 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = pen.attach(opt, mode="prox")
    x, y = torch.randn(64, 10), torch.randn(64, 2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    handle.remove()
    report = regext.sparsity_report(model)
    rows = report.per_tensor[0].zero_rows
    assert rows and all((model[0].weight[list(rows)] == 0).all(dim=1))
    assert report.per_tensor[1].zero_rows is None  # a bias: fewer than 2 dims


def test_sparsity_report_finds_zero_rows_and_columns():
    w = torch.randn(5, 4)
    w[[0, 3]] = 0.0
    w[:, 2] = 0.0
    w[1, 1] = float("nan")  # NaN is not zero
    conv = torch.randn(3, 6, 2, 2)
    conv[:, 4] = -0.0
    report = regext.sparsity_report([("w", w), ("conv", conv), ("b", torch.zeros(3))])
    by_name = {t.name: t for t in report.per_tensor}
    assert by_name["w"].zero_rows == (0, 3) and by_name["w"].zero_columns == (2,)
    assert by_name["conv"].zero_rows == () and by_name["conv"].zero_columns == (4,)
    assert by_name["b"].zero_rows is None and by_name["b"].zero_columns is None
    assert "2/5" in str(report) and "1/6" in str(report)


def test_compiled_step_matches_eager():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(4, 8)

    def loss():
        return model(x).square().mean() + regext.fused_penalty(
            model.parameters(), 1e-3, 1e-2, group="column", group_weight="sqrt_size")
    eager = loss()
    eager_grads = grads_of(eager, list(model.parameters()))
    compiled = torch.compile(loss, fullgraph=True)()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads_of(compiled, list(model.parameters())), eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_row_prox_uses_the_forward_norms_bit_for_bit(dtype):
    """The CPU proximal step sums each row and scales it in one pass (csrc/cpu/group_cpu.cpp);
    its norms must be the forward's, bit for bit: x * scale(stats) in float64, rounded once,
    with rows that take every path of the sums (zero, tiny, huge, NaN, block edges)."""
    from regext.reference import group_shrink_scale_reference
    gen = torch.Generator().manual_seed(6)
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in
          [(9, 255), (9, 256), (9, 257), (7, 1000), (5, 15), (3, 4097)]]
    ws[0][1] = 0.0
    ws[1][2] *= 1e-25
    ws[2][3] *= 1e20
    ws[3][4, 7] = float("nan")
    ws = [w.to(dtype) for w in ws]
    threshold = 0.5
    dims = [0] * len(ws)
    _, stats = torch.ops.regext.group_penalty_forward(
        ws, dims, torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
        False)
    got = [w.clone() for w in ws]
    regext.prox_group_l2_(got, threshold, group="row")
    row = 0
    for w, g in zip(ws, got):
        scale = group_shrink_scale_reference(stats[row:row + w.shape[0], 1],
                                             torch.tensor(threshold, dtype=torch.float64))
        row += w.shape[0]
        unchanged = scale == 1.0
        want = torch.where(unchanged[:, None], w, (w.double() * scale[:, None]).to(dtype))
        same = (g == want) | (g.isnan() & want.isnan())
        assert bool(same.all()), (w.shape, (g.double() - want.double()).abs().max())
