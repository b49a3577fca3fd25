"""CUDA-only behaviour: agreement with the CPU op, many tensors, huge tensors,
CUDA graphs, launch counts and mixed devices. Skipped without a GPU and CUDA build."""

import pytest
import torch

import regext
from regext.reference import penalty_float64, penalty_loop

from conftest import TOLERANCES, grads_of
from op_samples import OPS, assert_close_outcomes, cases, outcome, param_dtype, sample

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and regext.cuda_available()),
    reason="needs a visible GPU and regext built with its CUDA kernels")


def _params(n, gen, dtype=torch.float32, max_numel=5000):
    sizes = torch.randint(0, max_numel, (n,), generator=gen).tolist()
    return [torch.randn(s, generator=gen).to(device="cuda", dtype=dtype).requires_grad_()
            for s in sizes]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("l2_squared", [False, True])
def test_cuda_matches_cpu_op_and_float64(dtype, l2_squared):
    gen = torch.Generator().manual_seed(21)
    params = _params(40, gen, dtype, max_numel=100_000)
    params.append(torch.randn(64, 48, generator=gen).to("cuda", dtype).t().requires_grad_())
    params.append(torch.randn(9, 70, generator=gen).to("cuda", dtype)[:, ::3].requires_grad_())
    cpu_params = [p.detach().cpu().requires_grad_() for p in params]
    gpu = regext.fused_penalty(params, 0.2, 0.3, l2_squared=l2_squared)
    cpu = regext.fused_penalty(cpu_params, 0.2, 0.3, l2_squared=l2_squared)
    exact = penalty_float64(cpu_params, 0.2, 0.3, l2_squared=l2_squared)
    # Both backends: within 1e-6 of float64 (1e-12 for a float64 result), in
    # different summation orders; so within twice that of each other.
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    assert abs(gpu.item() - exact.item()) <= rel * abs(exact.item())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=2 * rel, atol=0)
    # The gradients depend on the norms, which may differ in the last bits: an
    # element may round the other way (one float16 ulp is ~1e-3 relative).
    rtol, atol = TOLERANCES[dtype]
    for g, c in zip(grads_of(gpu, params), grads_of(cpu, cpu_params)):
        assert g.dtype == dtype and g.is_cuda
        torch.testing.assert_close(g.cpu(), c, rtol=rtol, atol=atol)


def test_cuda_bitwise_reproducible():
    gen = torch.Generator().manual_seed(3)
    params = _params(300, gen, max_numel=200_000)
    first = regext.fused_penalty(params, 0.1, 0.4)
    first_grads = grads_of(first, params)
    for _ in range(3):
        again = regext.fused_penalty(params, 0.1, 0.4)
        assert torch.equal(again, first)
        for a, b in zip(grads_of(again, params), first_grads):
            assert torch.equal(a, b)


def test_five_thousand_tensors_in_one_call():
    gen = torch.Generator().manual_seed(5)
    params = _params(5000, gen, max_numel=300)
    ours = regext.fused_penalty(params, 0.3, 0.7)
    loop = penalty_loop(params, 0.3, 0.7)
    torch.testing.assert_close(ours, loop, rtol=1e-5, atol=1e-5)
    for g, h in zip(grads_of(ours, params), grads_of(loop, params)):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_tensor_beyond_2_pow_31_elements():
    n = 2**31 + 1000
    needed = n * 2 * 2 + (1 << 30)  # fp16 param + fp16 grad + slack
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} free")
    p = torch.ones(n, device="cuda", dtype=torch.float16)
    p[2**31:2**31 + 500] = -2.0  # past 2**31: negative elements, then positive ones
    p.requires_grad_()
    out = regext.fused_penalty([p], 1.0, 0.0)
    # sum |x| = 2**31 + 1500 exactly (integer sums), rounded once to the float32 result:
    # float32 spacing near 2**31 is 256, so 2**31 + 1536.
    assert out.dtype == torch.float32
    assert out.item() == torch.tensor(2**31 + 1500, dtype=torch.float64).float().item()
    (g,) = torch.autograd.grad(out, [p])
    assert g[0].item() == 1.0 and g[2**31 - 1].item() == 1.0
    assert g[2**31 + 5].item() == -1.0 and g[2**31 + 499].item() == -1.0
    assert g[2**31 + 500].item() == 1.0 and g[-1].item() == 1.0
    del g, p, out
    torch.cuda.empty_cache()


def test_cuda_graph_capture_and_replay_of_a_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 8)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static_x = torch.randn(16, 64, device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        loss = model(static_x).pow(2).mean() + regext.fused_penalty(model.parameters(), 1e-3, 1e-2)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up on a side stream, as graph capture requires
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for _ in range(3):
        static_x.copy_(torch.randn(16, 64, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        eager = model(static_x).pow(2).mean() + penalty_loop(list(model.parameters()), 1e-3, 1e-2)
        torch.testing.assert_close(static_loss, eager.detach(), rtol=1e-5, atol=1e-6)
        ref_grads = torch.autograd.grad(eager, list(model.parameters()))
        for p, r in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_on_cuda():
    params = [torch.randn(33, 17, device="cuda", requires_grad=True),
              torch.randn(1000, device="cuda", requires_grad=True)]
    torch._dynamo.reset()
    f = torch.compile(lambda ps: regext.fused_penalty(ps, 0.1, 0.2), fullgraph=True)
    out = f(params)
    torch.testing.assert_close(out, regext.fused_penalty(params, 0.1, 0.2))


def test_mixed_devices_sum_on_first_device():
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(10, 10, generator=gen).cuda().requires_grad_()
    b = torch.randn(20, generator=gen).requires_grad_()
    out = regext.fused_penalty([a, b], 0.3, 0.3)
    assert out.device == a.device
    ref = penalty_float64([a.detach().cpu(), b.detach()], 0.3, 0.3)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    ga, gb = grads_of(out, [a, b])
    assert ga.is_cuda and not gb.is_cuda


@pytest.mark.parametrize("num_tensors", [10, 100, 1000])
def test_launch_count_independent_of_tensor_count(num_tensors):
    gen = torch.Generator().manual_seed(1)
    params = _params(num_tensors, gen, max_numel=2000)
    regext.fused_penalty(params, 0.1, 0.1).backward()  # warm-up
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        regext.fused_penalty(params, 0.1, 0.1).backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [n for n in names if "regext" in n]
    # forward: partial sums + combine; backward: one gradient kernel.
    assert len(ours) == 3, ours


@pytest.mark.parametrize("name, index", cases())
def test_every_operator_on_cuda_matches_its_reference(name, index):
    args = sample(name, index, device="cuda")
    got = outcome(name, getattr(torch.ops.regext, name), args)
    want = outcome(name, OPS[name].reference, args)
    assert_close_outcomes(got, want, param_dtype(args), f"{name} sample {index} on CUDA")


def test_cuda_graph_replays_a_step_with_tensor_coefficients_updated_in_place():
    """A schedule that updates device coefficient tensors between replays: the kernels
    read them on the device, so the captured step uses each replay's values."""
    torch.manual_seed(1)
    model = torch.nn.Linear(32, 8).cuda()
    l1 = torch.tensor(1e-3, device="cuda")
    l2 = torch.tensor(1e-2, device="cuda")
    threshold = torch.tensor(1e-4, device="cuda")
    static_x = torch.randn(16, 32, device="cuda")

    def step():
        model.zero_grad(set_to_none=False)
        loss = model(static_x).pow(2).mean() + regext.fused_penalty(model.parameters(), l1, l2)
        loss.backward()
        with torch.no_grad():
            regext.prox_l1_(model.parameters(), threshold)
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for k in range(1, 4):
        l1.fill_(1e-3 * k)
        l2.fill_(1e-2 * k)
        before = [p.detach().clone() for p in model.parameters()]
        graph.replay()
        torch.cuda.synchronize()
        ref = [p.clone().requires_grad_() for p in before]
        out = torch.nn.functional.linear(static_x, ref[0], ref[1]).pow(2).mean()
        eager = out + penalty_loop(ref, 1e-3 * k, 1e-2 * k)
        torch.testing.assert_close(static_loss, eager.detach(), rtol=1e-5, atol=1e-6)
