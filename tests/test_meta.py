"""Parameters on the meta device: meta results from the fake kernels, no memory touched.

The fake kernels in regext/_meta.py are registered with torch.library.register_fake,
which also serves the Meta dispatch key. A meta tensor has shape, dtype and
strides but no storage: any attempt to compute would fail, and the 2**40-element
tensors below would not fit in any machine's memory if anything materialized them.
"""

import pytest
import torch

import regext

from op_samples import cases, clone_args, flatten, sample
from conftest import scalar


def _to_meta(args):
    def meta(a):
        if isinstance(a, torch.Tensor):
            return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [meta(t) for t in a]
        return a
    return tuple(meta(a) for a in args)


@pytest.mark.parametrize("name, index", cases())
def test_every_operator_on_meta_tensors_gives_the_cpu_result_metadata(name, index):
    """The fake kernel: meta outputs with the CPU kernel's shapes, dtypes and strides."""
    args = sample(name, index)
    op = getattr(torch.ops.regext, name)
    meta = flatten(op(*_to_meta(clone_args(args))))
    cpu = flatten(op(*clone_args(args)))
    assert len(meta) == len(cpu)
    for m, c in zip(meta, cpu):
        assert m.device.type == "meta"
        assert (m.shape, m.dtype, m.stride()) == (c.shape, c.dtype, c.stride())


def test_meta_params_give_a_meta_result():
    p = torch.empty(3, 4, device="meta", requires_grad=True)
    out = regext.fused_penalty([p], 0.1, 0.2)
    assert out.device.type == "meta" and out.shape == () and out.dtype == torch.float32
    assert out.requires_grad


@pytest.mark.parametrize("l2_squared", [False, True])
def test_huge_meta_params_forward_and_backward_without_memory(l2_squared):
    huge = torch.empty(2**20, 2**20, device="meta", requires_grad=True)  # 2**40 elements
    half = torch.empty(3, 5, 7, 2, device="meta", dtype=torch.float16)
    half = half.to(memory_format=torch.channels_last).requires_grad_()
    frozen = torch.empty(2**30, device="meta", dtype=torch.bfloat16)
    out = regext.fused_penalty([huge, half, frozen], 0.1, 0.2, l2_squared=l2_squared)
    assert out.device.type == "meta" and out.dtype == torch.float32
    out.backward()
    assert huge.grad.device.type == "meta" and huge.grad.shape == huge.shape
    assert half.grad.dtype == torch.float16 and half.grad.stride() == half.stride()
    assert frozen.grad is None


def test_meta_result_dtype_follows_the_float64_rule():
    ps = [torch.empty(4, device="meta", dtype=dt, requires_grad=True)
          for dt in (torch.float16, torch.float64, torch.float32)]
    assert regext.fused_penalty(ps, 0.1, 0.2).dtype == torch.float64
    assert regext.fused_penalty(ps[:1], 0.1, 0.2).dtype == torch.float32


def test_meta_double_backward():
    p = torch.empty(5, 3, device="meta", dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(regext.fused_penalty([p], 0.3, 0.4), [p], create_graph=True)
    assert g.device.type == "meta" and g.shape == p.shape and g.requires_grad
    (gg,) = torch.autograd.grad(g.sum(), [p])
    assert gg.device.type == "meta" and gg.shape == p.shape


def test_meta_ops_directly():
    params = [torch.empty(2**20, 2**20, device="meta"), torch.empty(0, 3, device="meta")]
    total, stats = torch.ops.regext.penalty_forward(params, scalar(0.1), scalar(0.2), False)
    assert total.device.type == "meta" and stats.shape == (2, 2) and stats.dtype == torch.float64
    grads = torch.ops.regext.penalty_backward(torch.empty((), device="meta"), params, stats,
                                              scalar(0.1), scalar(0.2), False)
    assert [g.shape for g in grads] == [p.shape for p in params]
    torch.ops.regext.penalty_grad_accumulate_([torch.empty_like(p) for p in params], params,
                                              stats, scalar(0.1), scalar(0.2), False)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last", "sliced",
                                    "expanded", "zero_size", "scalar"])
def test_meta_gradients_match_cpu_gradients_in_shape_dtype_and_strides(layout):
    """The fake backward allocates as the real CPU kernel does."""

    def make(device):
        base = torch.zeros(4, 6, 5, 3, dtype=torch.bfloat16, device=device)
        view = {"contiguous": base, "transposed": base.transpose(1, 3),
                "channels_last": base.contiguous(memory_format=torch.channels_last),
                "sliced": base[::2, 1::2], "expanded": base[:, :1].expand(4, 6, 5, 3),
                "zero_size": base[:, :0], "scalar": base[0, 0, 0, 0]}[layout]
        return view.detach().requires_grad_()

    grads = {}
    for device in ("cpu", "meta"):
        p = make(device)
        regext.fused_penalty([p], 0.1, 0.2).backward()
        grads[device] = p.grad
    cpu, meta = grads["cpu"], grads["meta"]
    assert meta.device.type == "meta"
    assert (meta.shape, meta.dtype, meta.stride()) == (cpu.shape, cpu.dtype, cpu.stride())


def test_meta_mixed_with_real_tensors_is_rejected_before_computing():
    """Meta and real tensors cannot be summed; say so, naming the position, up front."""
    real = [torch.randn(3, requires_grad=True) for _ in range(4)]
    meta = torch.empty(3, device="meta", requires_grad=True)
    for params, pos in ((real[:2] + [meta] + real[2:], 2), ([meta] + real, 1)):
        with pytest.raises(TypeError, match=rf"params\[{pos}\].*(meta|cpu)"):
            regext.fused_penalty(params, 0.1, 0.2)
    assert all(p.grad is None for p in real)
