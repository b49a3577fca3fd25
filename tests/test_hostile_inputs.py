"""A bad element anywhere in a long list: a clear error, raised before any work.

"Before any work" is checked three ways: no regext operator runs (the profiler
records every dispatched op), no parameter or gradient changes, and no gradient
is created. Messages name the position, the dtype and the device.
"""

import pytest
import torch

import regext
from conftest import scalar

BAD_AT = 37
N = 50


def _bad_elements():
    cases = [
        ("int64", lambda: torch.arange(6), r"has dtype torch.int64 \(device cpu\)"),
        ("int32", lambda: torch.arange(6, dtype=torch.int32), r"has dtype torch.int32"),
        ("uint8", lambda: torch.zeros(6, dtype=torch.uint8), r"has dtype torch.uint8"),
        ("bool", lambda: torch.ones(6, dtype=torch.bool), r"has dtype torch.bool"),
        ("complex64", lambda: torch.randn(6, dtype=torch.complex64),
         r"has dtype torch.complex64 \(device cpu\)"),
        ("float8", lambda: torch.zeros(6).to(torch.float8_e4m3fn),
         r"has dtype torch.float8_e4m3fn"),
        ("sparse_coo", lambda: torch.randn(4, 4).to_sparse(),
         r"has layout torch.sparse_coo \(dtype torch.float32, device cpu\)"),
        ("sparse_csr", lambda: torch.randn(4, 4).to_sparse_csr(), r"has layout torch.sparse_csr"),
        ("nested", lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
         r"is a nested tensor \(dtype torch.float32, device cpu\)"),
        ("jagged", lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)],
                                                       layout=torch.jagged),
         r"is a nested tensor \(dtype torch.float32, device cpu\)"),
        ("meta", lambda: torch.empty(6, device="meta"),
         r"is on meta \(dtype torch.float32\) but params\[0\] is on cpu"),
        ("None", lambda: None, r"is a NoneType, not a Tensor"),
        ("float", lambda: 1.5, r"is a float, not a Tensor"),
        ("ndarray", lambda: __import__("numpy").ones(3), r"is a ndarray, not a Tensor"),
        ("list", lambda: [torch.randn(2)], r"is a list, not a Tensor"),
    ]
    if hasattr(torch.Tensor, "to_mkldnn") and torch.backends.mkldnn.is_available():
        cases.append(("mkldnn", lambda: torch.randn(4, 4).to_mkldnn(), r"has layout torch._mkldnn"))
    return cases


BAD = _bad_elements()


def _long_list(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(int(n), generator=gen).requires_grad_()
            for n in torch.randint(1, 3000, (N,), generator=gen)]


def _regext_ops_run(fn):
    """Calls fn(); returns the names of the regext operators that ran (profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("regext::")]


def _snapshot(params):
    return [p.detach().clone() for p in params], [
        None if p.grad is None else p.grad.clone() for p in params]


def _assert_untouched(params, snapshot, grads_were_none):
    values, grads = snapshot
    for i, (p, v, g) in enumerate(zip(params, values, grads)):
        assert torch.equal(p.detach(), v), f"params[{i}] changed"
        if grads_were_none:
            assert p.grad is None, f"params[{i}] got a gradient"
        else:
            assert torch.equal(p.grad, g), f"params[{i}].grad changed"


@pytest.mark.parametrize("name, make, message", BAD, ids=[b[0] for b in BAD])
def test_fused_penalty_rejects_bad_element_at_37_before_any_work(name, make, message):
    params = _long_list()
    snapshot = _snapshot(params)
    bad = list(params)
    bad[BAD_AT] = make()

    def call():
        with pytest.raises(TypeError, match=rf"^fused_penalty: params\[{BAD_AT}\] {message}"):
            regext.fused_penalty(iter(bad), 0.1, 0.2)

    assert _regext_ops_run(call) == []
    _assert_untouched(params, snapshot, grads_were_none=True)
    # The same list without the bad element works, and its ops do show in the profiler.
    ops = _regext_ops_run(lambda: regext.fused_penalty(params, 0.1, 0.2).backward())
    assert "regext::penalty_forward" in ops and "regext::penalty_backward" in ops


def test_bad_coefficient_rejected_before_any_work():
    params = _long_list()
    for kwargs in ({"l1": -1.0}, {"l2": float("nan")}, {"l1": float("inf")}):
        args = {"l1": 0.1, "l2": 0.2, **kwargs}
        assert _regext_ops_run(lambda: pytest.raises(
            ValueError, regext.fused_penalty, params, **args)) == []
    assert all(p.grad is None for p in params)


def test_errors_from_the_ops_name_position_and_dtype():
    """torch.ops.regext.* are public too: their own checks name the position."""
    params = [torch.randn(3) for _ in range(N)]
    params[BAD_AT] = torch.zeros(3, dtype=torch.int16)
    with pytest.raises(TypeError, match=rf"params\[{BAD_AT}\] has dtype Short"):
        torch.ops.regext.penalty_forward(params, scalar(0.1), scalar(0.2), False)
    params[BAD_AT] = torch.randn(3, dtype=torch.float64)[::2]  # fine: any dense dtype mix
    torch.ops.regext.penalty_forward(params, scalar(0.1), scalar(0.2), False)


def test_accumulate_op_checks_everything_before_writing():
    params = [torch.randn(5) for _ in range(N)]
    _, stats = torch.ops.regext.penalty_forward(params, scalar(0.1), scalar(0.2), False)
    grads = [torch.ones(5) for _ in range(N)]
    grads[BAD_AT] = torch.ones(6)  # wrong shape, late in the list
    with pytest.raises(RuntimeError, match=rf"grads\[{BAD_AT}\] has shape \[6\]"):
        torch.ops.regext.penalty_grad_accumulate_(grads, params, stats, scalar(0.1), scalar(0.2), False)
    grads[BAD_AT] = torch.ones(5, dtype=torch.float64)  # wrong dtype
    with pytest.raises(TypeError, match=rf"grads\[{BAD_AT}\] has dtype Double"):
        torch.ops.regext.penalty_grad_accumulate_(grads, params, stats, scalar(0.1), scalar(0.2), False)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)


needs_add_penalty_grad = pytest.mark.skipif(
    not hasattr(regext, "add_penalty_grad_"), reason="regext.add_penalty_grad_ not merged yet")


@needs_add_penalty_grad
@pytest.mark.parametrize("name, make, message", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("grads_exist", [False, True])
def test_add_penalty_grad_rejects_bad_element_at_37_leaving_grads_alone(name, make, message,
                                                                        grads_exist):
    params = _long_list()
    if grads_exist:
        for p in params:
            p.grad = torch.randn_like(p)
    snapshot = _snapshot(params)
    bad = list(params)
    bad[BAD_AT] = make()

    def call():
        with pytest.raises(TypeError, match=rf"params\[{BAD_AT}\]"):
            regext.add_penalty_grad_(iter(bad), 0.1, 0.2)

    assert _regext_ops_run(call) == []
    _assert_untouched(params, snapshot, grads_were_none=not grads_exist)



def test_a_tensor_whose_storage_was_freed_is_refused_not_read():
    """FSDP1 frees unsharded parameters by resizing their storage to 0 bytes; a view
    that kept its shape would be read out of bounds (torch's own x.sum() crashes)."""
    x = torch.randn(5, 6)
    ok = torch.randn(3)
    x.untyped_storage().resize_(0)
    for call in (lambda: regext.fused_penalty([ok, x], 0.1, 0.2),
                 lambda: regext.add_penalty_grad_([ok, x.requires_grad_()], 0.1, 0.2),
                 lambda: regext.prox_l1_([ok, x.detach()], 0.1),
                 lambda: regext.fused_penalty([ok, x], 0.1, 0.2, group="row")):
        with pytest.raises(ValueError, match=r"params\[1\] \(shape \[5, 6\], dtype Float\) needs "
                                             r"120 bytes of storage but its storage holds 0: its "
                                             r"memory was freed"):
            call()
