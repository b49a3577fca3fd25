"""Bad input gets a clear error naming argument, position and dtype; nothing is touched."""

import math

import pytest
import torch

import regext
from conftest import scalar


@pytest.mark.parametrize("name", ["l1", "l2"])
@pytest.mark.parametrize("bad", [-0.1, math.inf, -math.inf, math.nan, "0.1", None, True])
def test_bad_coefficient_raises_value_error_naming_it(name, bad):
    p = torch.randn(3, requires_grad=True)
    kwargs = {"l1": 0.1, "l2": 0.1, name: bad}
    with pytest.raises(ValueError, match=rf"fused_penalty: {name} must be a finite number >= 0"):
        regext.fused_penalty([p], **kwargs)


@pytest.mark.parametrize("bad, pattern", [
    (torch.arange(4), r"params\[2\] has dtype torch.int64"),
    (torch.ones(3, dtype=torch.bool), r"params\[2\] has dtype torch.bool"),
    (torch.randn(3, dtype=torch.complex64), r"params\[2\] has dtype torch.complex64"),
    (torch.randn(4, 4).to_sparse(), r"params\[2\] has layout torch.sparse_coo"),
    ([1.0, 2.0], r"params\[2\] is a list, not a Tensor"),
    (3.0, r"params\[2\] is a float, not a Tensor"),
    (None, r"params\[2\] is a NoneType, not a Tensor"),
])
def test_bad_element_raises_type_error_with_position(bad, pattern):
    good = [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    with pytest.raises(TypeError, match=pattern):
        regext.fused_penalty(good + [bad] + [torch.randn(5)], 0.1, 0.1)
    assert all(p.grad is None for p in good)


def test_error_message_names_device():
    with pytest.raises(TypeError, match=r"device cpu"):
        regext.fused_penalty([torch.randn(2), torch.arange(3)], 0.1)


def test_non_iterable_and_single_tensor_rejected():
    with pytest.raises(TypeError, match="iterable of tensors"):
        regext.fused_penalty(42, 0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        regext.fused_penalty(torch.randn(3), 0.1)


def test_bad_element_late_in_long_list_raises_before_computing():
    params = [torch.randn(10, requires_grad=True) for _ in range(50)]
    params[37] = torch.arange(10)
    before = [p.detach().clone() for p in params]
    with pytest.raises(TypeError, match=r"params\[37\]"):
        regext.fused_penalty(iter(params), 0.1, 0.1)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_ops_check_their_arguments_too():
    with pytest.raises(TypeError, match=r"params\[1\] has dtype Long"):
        torch.ops.regext.penalty_forward([torch.randn(2), torch.arange(3)], scalar(0.1), scalar(0.1), False)
    with pytest.raises(ValueError, match="l2 must be a finite number"):
        torch.ops.regext.penalty_forward([torch.randn(2)], scalar(0.1), scalar(-1.0), False)
    with pytest.raises(RuntimeError, match="stats must be a contiguous float64"):
        torch.ops.regext.penalty_backward(torch.tensor(1.0), [torch.randn(2)],
                                          torch.zeros(2, 2), scalar(0.1), scalar(0.1), False)


def _written_cases():
    from op_samples import OPS, cases
    return [(name, index, pos) for name, index in cases(first_only=True)
            for pos in OPS[name].mutated]


@pytest.mark.parametrize("name, index, pos", _written_cases())
def test_ops_name_an_expanded_tensor_they_would_write(name, index, pos):
    """Every operator that writes a list refuses a stride-0 (expanded) tensor in it
    with a ValueError naming the argument, the position, shape, stride and dtype,
    before writing anything (torch's own overlap check named no argument)."""
    from op_samples import clone_args, sample
    args = list(clone_args(sample(name, index)))
    arg = getattr(torch.ops.regext, name).default._schema.arguments[pos].name
    written = args[pos]
    i = next(k for k, t in enumerate(written) if t.numel() > 1)
    t = written[i]
    written[i] = torch.zeros(1, dtype=t.dtype, device=t.device).expand(t.shape)
    before = [w.clone() for w in written]
    c10_name = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                torch.bfloat16: "BFloat16"}[t.dtype]
    pattern = (rf"regext::{name}: {arg}\[{i}\] has overlapping memory \(an expanded tensor, "
               rf"shape \[.*\], stride \[.*\], dtype {c10_name}\)")
    with pytest.raises(ValueError, match=pattern):
        getattr(torch.ops.regext, name)(*args)
    for w, b in zip(written, before):
        assert torch.equal(w, b)
