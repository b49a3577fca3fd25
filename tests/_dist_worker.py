"""One rank of the multi-process DTensor / FSDP2 tests (run by tests/test_distributed.py).

    python tests/_dist_worker.py RANK WORLD_SIZE OUT_DIR

MASTER_ADDR / MASTER_PORT come from the environment (127.0.0.1 and a free port).
Every case runs on every rank, in the same order, against the single-process
result on the full tensors (each rank builds the same full tensors from a seed);
the outcome of each case is written to OUT_DIR/rank<RANK>.json for the test to
assert on. A case that fails is recorded and the next one runs; process-group
timeouts and the launcher's deadline bound a case that would hang.
"""

import contextlib
import datetime
import gc
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.utils._python_dispatch

CASES = {}  # name -> (function, smallest world size it needs, whether it needs fully_shard)


def case(min_world=2, fsdp=False):
    def register(fn):
        CASES[fn.__name__.removeprefix("case_")] = (fn, min_world, fsdp)
        return fn
    return register


class Skip(Exception):
    """A case that cannot run in this torch build; the message says why."""


# --------------------------------------------------------------------------- helpers

class _CollectiveLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every c10d / functional-collective operator that is dispatched.

    It sees collectives however they are issued: torch.distributed.* calls
    (c10d::allreduce_, allgather_, ...) and DTensor redistributions
    (_c10d_functional::*). Wait / wrapper ops are not collectives and are skipped.
    """

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "c10d" in func.namespace and "wait_tensor" not in name and "_wrap_" not in name:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_collectives():
    """Counts collectives three ways while the block runs; yields a dict with

    'all_reduce': calls of torch.distributed.all_reduce (wrapped meanwhile);
    'ops': the c10d / functional-collective operators dispatched;
    'backend': the gloo collectives the profiler saw ("gloo:all_reduce", ...),
    which catches a collective however it was issued.
    """
    log = {"ops": [], "all_reduce": 0, "backend": []}
    real = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        log["all_reduce"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    mode = _CollectiveLog()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    try:
        with profiler, mode:
            yield log
    finally:
        dist.all_reduce = real
        log["ops"] = list(mode.ops)
        log["backend"] = [e.name for e in profiler.events() if e.name.startswith("gloo:")]


def expect_one_all_reduce(log):
    assert (log["all_reduce"] == 1 and log["ops"] == ["c10d.allreduce_.default"]
            and log["backend"] == ["gloo:all_reduce"]), (
        f"expected exactly one all_reduce, got {log}")


def expect_no_collective(log):
    assert log == {"ops": [], "all_reduce": 0, "backend": []}, f"expected none, got {log}"


def full_tensors(shapes, dtypes, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in zip(shapes, dtypes):
        out.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
    return out


def reference(full, l1, l2, l2_squared=False, requires=None):
    """Single-process regext on the full tensors: (value, grads)."""
    import regext
    leaves = [t.detach().clone().requires_grad_(True) for t in full]
    value = regext.fused_penalty(leaves, l1, l2, l2_squared=l2_squared)
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), grads


def tol(dtype):
    return {torch.float64: dict(rtol=1e-12, atol=1e-12),
            torch.float32: dict(rtol=1e-6, atol=1e-7)}[dtype]


def check_grad(i, grad, param, expected, placements=True):
    from torch.distributed.tensor import DTensor
    if isinstance(param, DTensor):
        assert isinstance(grad, DTensor), f"grad {i} is a {type(grad).__name__}, not a DTensor"
        if placements:
            assert tuple(grad.placements) == tuple(param.placements), (
                f"grad {i} placements {grad.placements} != param's {param.placements}")
            assert grad.to_local().shape == param.to_local().shape, f"grad {i} local shape"
        assert grad.shape == param.shape, f"grad {i} global shape"
        assert grad.to_local().dtype == param.dtype
        grad = grad.full_tensor()  # a collective, outside any count
    torch.testing.assert_close(grad, expected, **tol(param.dtype), msg=lambda m: f"grad {i}: {m}")


def distribute(full, mesh, placements_list, requires_grad=True):
    from torch.distributed.tensor import distribute_tensor
    out = []
    for t, placements in zip(full, placements_list):
        if placements is None:
            out.append(t.detach().clone().requires_grad_(requires_grad))
        else:
            out.append(distribute_tensor(t.detach().clone(), mesh, placements)
                       .requires_grad_(requires_grad))
    return out


def run_and_compare(params, full, l1, l2, l2_squared=False, expect_collective=True):
    """fused_penalty on the distributed params vs the single process; returns the value."""
    import regext
    with count_collectives() as log:
        value = regext.fused_penalty(params, l1, l2, l2_squared=l2_squared)
    (expect_one_all_reduce if expect_collective else expect_no_collective)(log)
    assert type(value) is torch.Tensor and value.dim() == 0
    ref_value, ref_grads = reference(full, l1, l2, l2_squared)
    assert value.dtype == ref_value.dtype, (value.dtype, ref_value.dtype)
    torch.testing.assert_close(value, ref_value, **tol(value.dtype))
    with count_collectives() as log:
        grads = torch.autograd.grad(value, params)
    expect_no_collective(log)  # the backward needs no communication
    for i, (g, p, r) in enumerate(zip(grads, params, ref_grads)):
        check_grad(i, g, p, r)
    return value


# ----------------------------------------------------------------------------- cases

def mesh_1d(world):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world,))


# Shapes with sizes not divisible by 2 or 4 and with ranks that get nothing.
UNEVEN = [(5, 3), (3,), (1, 4), (0,), (7, 2), (2, 3, 2)]


@case()
def case_shard0(rank, world):
    from torch.distributed.tensor import Shard
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float32, torch.float64,
              torch.float32]
    full = full_tensors(UNEVEN, dtypes, seed=1)
    params = distribute(full, mesh_1d(world), [[Shard(0)]] * len(full))
    empty = [tuple(p.to_local().shape) for p in params if p.to_local().numel() == 0]
    if rank == world - 1:
        assert empty, "the last rank should hold empty shards in this case"
    run_and_compare(params, full, 0.3, 0.7)
    run_and_compare(params, full, 0.3, 0.7, l2_squared=True)


GROUP_SHAPES = [(5, 3), (3,), (1, 4), (7, 2), (2, 3, 2), (4, 5)]


def group_reference(full, l1, l2, **group):
    """Single-process regext group lasso on the full tensors: (value, grads)."""
    import regext
    leaves = [t.detach().clone().requires_grad_(True) for t in full]
    value = regext.fused_penalty(leaves, l1, l2, **group)
    return value.detach(), torch.autograd.grad(value, leaves)


@case()
def case_group_lasso_on_shards(rank, world):
    """group='row' | 'column' (and sqrt_size weights) on Shard(0), Shard(1),
    Replicate and plain tensors: the value and the gradients of the whole tensors,
    one all_reduce for the whole list, none in the backward; add_penalty_grad_ too."""
    from torch.distributed.tensor import Replicate, Shard
    import regext
    mesh = mesh_1d(world)
    dtypes = [torch.float64, torch.float32, torch.float64, torch.float64, torch.float32,
              torch.float64]
    full = full_tensors(GROUP_SHAPES, dtypes, seed=21)
    layouts = [[Shard(0)], [Shard(0)], [Shard(1)], [Replicate()], [Shard(1)], None]
    for group in ("row", "column"):
        for weight in (None, "sqrt_size"):
            options = dict(group=group, group_weight=weight)
            params = distribute(full, mesh, layouts)
            with count_collectives() as log:
                value = regext.fused_penalty(params, 0.3, 0.7, **options)
            expect_one_all_reduce(log)
            ref_value, ref_grads = group_reference(full, 0.3, 0.7, **options)
            torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
            with count_collectives() as log:
                grads = torch.autograd.grad(value, params)
            expect_no_collective(log)
            for i, (g, p, r) in enumerate(zip(grads, params, ref_grads)):
                check_grad(i, g, p, r)
            with count_collectives() as log:
                added = regext.add_penalty_grad_(params, 0.3, 0.7, **options)
            expect_one_all_reduce(log)
            torch.testing.assert_close(added, ref_value, rtol=1e-6, atol=1e-7)
            for i, (p, r) in enumerate(zip(params, ref_grads)):
                check_grad(i, p.grad, p, r)


@case()
def case_group_lasso_prox_and_penalty_on_shards(rank, world):
    """prox_group_l2_(group=...) with the whole groups' norms (a threshold that zeroes
    some groups and shrinks others), Penalty with group='row' (value, prox_), against
    the single-process operators on the full tensors."""
    from torch.distributed.tensor import Shard
    import regext
    mesh = mesh_1d(world)
    full = full_tensors([(6, 4), (5,), (3, 7)], [torch.float64] * 3, seed=22)
    with torch.no_grad():
        full[0][2].mul_(0.01)  # a row that the threshold zeroes
        full[2][:, 3].mul_(0.01)  # a column too
    for group in ("row", "column"):
        for weight in (None, "sqrt_size"):
            params = distribute(full, mesh, [[Shard(0)], [Shard(0)], [Shard(1)]],
                                requires_grad=False)
            want = [t.clone() for t in full]
            regext.prox_group_l2_(want, 0.05, group=group, group_weight=weight)
            with count_collectives() as log:
                regext.prox_group_l2_(params, 0.05, group=group, group_weight=weight)
            expect_one_all_reduce(log)
            for i, (p, w) in enumerate(zip(params, want)):
                torch.testing.assert_close(p.full_tensor(), w, rtol=1e-12, atol=1e-15,
                                           msg=lambda m: f"{group} {weight} tensor {i}: {m}")
                assert torch.equal(p.full_tensor() == 0, w == 0)
    params = distribute(full, mesh, [[Shard(0)], [Shard(0)], [Shard(1)]])
    pen = regext.Penalty([(f"p{i}", p) for i, p in enumerate(params)], l1=0.01, l2=0.2,
                         group="row")
    ref = regext.Penalty([(f"p{i}", t.clone().requires_grad_()) for i, t in enumerate(full)],
                         l1=0.01, l2=0.2, group="row")
    torch.testing.assert_close(pen().detach(), ref().detach(), rtol=1e-12, atol=1e-12)
    pen.prox_(0.1)
    ref.prox_(0.1)
    for p, r in zip(params, ref.parameters()):
        torch.testing.assert_close(p.full_tensor().detach(), r.detach(), rtol=1e-12, atol=1e-15)


@case()
def case_shard1(rank, world):
    from torch.distributed.tensor import Shard
    shapes = [(3, 5), (2, 7), (4, 1), (6, 3), (2, 2, 5)]
    full = full_tensors(shapes, [torch.float64] * len(shapes), seed=2)
    params = distribute(full, mesh_1d(world), [[Shard(1)]] * len(full))
    run_and_compare(params, full, 0.25, 1.5)


@case()
def case_float32_only(rank, world):
    from torch.distributed.tensor import Shard
    full = full_tensors(UNEVEN, [torch.float32] * len(UNEVEN), seed=3)
    params = distribute(full, mesh_1d(world), [[Shard(0)]] * len(full))
    value = run_and_compare(params, full, 1e-3, 2e-3)
    assert value.dtype == torch.float32


@case()
def case_replicated_only(rank, world):
    from torch.distributed.tensor import Replicate
    full = full_tensors(UNEVEN, [torch.float64] * len(UNEVEN), seed=4)
    params = distribute(full, mesh_1d(world), [[Replicate()]] * len(full))
    # Nothing to combine: every rank already holds every tensor whole.
    run_and_compare(params, full, 0.5, 0.5, expect_collective=False)


@case()
def case_mixed_sharded_replicated_plain(rank, world):
    from torch.distributed.tensor import Replicate, Shard
    shapes = [(5, 3), (4,), (3, 5), (2, 2), (7,), (1, 3)]
    full = full_tensors(shapes, [torch.float64] * len(shapes), seed=5)
    placements = [[Shard(0)], [Replicate()], [Shard(1)], None, [Replicate()], [Shard(0)]]
    params = distribute(full, mesh_1d(world), placements)
    # Replicated tensors and plain tensors count once, not world_size times.
    run_and_compare(params, full, 0.1, 0.9)
    run_and_compare(params, full, 0.1, 0.9, l2_squared=True)


@case()
def case_same_on_every_rank(rank, world):
    from torch.distributed.tensor import Shard
    import regext
    full = full_tensors(UNEVEN, [torch.float32] * len(UNEVEN), seed=6)
    params = distribute(full, mesh_1d(world), [[Shard(0)]] * len(full))
    value = regext.fused_penalty(params, 0.2, 0.4).detach()
    everyone = [torch.zeros((), dtype=value.dtype) for _ in range(world)]
    dist.all_gather(everyone, value)
    assert all(torch.equal(v, value) for v in everyone), f"values differ: {everyone}"


@case()
def case_frozen_params(rank, world):
    from torch.distributed.tensor import Shard
    import regext
    shapes = [(5, 3), (3,), (7, 2)]
    full = full_tensors(shapes, [torch.float64] * 3, seed=7)
    params = distribute(full, mesh_1d(world), [[Shard(0)]] * 3)
    params[1].requires_grad_(False)
    value = regext.fused_penalty(params, 0.3, 0.6)
    g0, g2 = torch.autograd.grad(value, [params[0], params[2]])
    _, ref = reference(full, 0.3, 0.6)
    check_grad(0, g0, params[0], ref[0])
    check_grad(2, g2, params[2], ref[2])


@case()
def case_backward_accumulates_into_grad(rank, world):
    from torch.distributed.tensor import Shard
    import regext
    full = full_tensors(UNEVEN, [torch.float64] * len(UNEVEN), seed=8)
    params = distribute(full, mesh_1d(world), [[Shard(0)]] * len(full))
    for _ in range(2):
        regext.fused_penalty(params, 0.2, 0.8).backward()
    _, ref = reference(full, 0.2, 0.8)
    for i, (p, r) in enumerate(zip(params, ref)):
        check_grad(i, p.grad, p, 2 * r)


@case()
def case_double_backward(rank, world):
    from torch.distributed.tensor import Shard
    import regext
    shapes = [(5, 3), (3,), (7, 2)]
    full = full_tensors(shapes, [torch.float64] * 3, seed=9)
    params = distribute(full, mesh_1d(world), [[Shard(0)]] * 3)
    value = regext.fused_penalty(params, 0.2, 0.8)
    grads = torch.autograd.grad(value, params, create_graph=True)
    gp = sum((g * g).sum() for g in grads)
    second = torch.autograd.grad(gp, params)

    leaves = [t.detach().clone().requires_grad_(True) for t in full]
    ref_value = regext.fused_penalty(leaves, 0.2, 0.8)
    ref_grads = torch.autograd.grad(ref_value, leaves, create_graph=True)
    ref_second = torch.autograd.grad(sum((g * g).sum() for g in ref_grads), leaves)
    for i, (g, p, r) in enumerate(zip(grads, params, ref_grads)):
        check_grad(i, g.detach(), p, r.detach())
    # Second derivatives are stock DTensor autograd (their placements are DTensor's
    # choice); the values must match.
    for i, (g, p, r) in enumerate(zip(second, params, ref_second)):
        check_grad(i, g, p, r, placements=False)


@case()
def case_double_backward_keeps_the_plain_backward_accuracy(rank, world):
    """create_graph=True on shards: the first derivative equals the plain backward's
    (float64 norms of the whole tensors: 2e19 and 1e-25 elements keep their range) and
    the second derivative equals the single-process one."""
    from torch.distributed.tensor import Replicate, Shard
    import regext
    full = [torch.full((8, 3), 2e19), torch.full((6,), 1e-25)]
    full += full_tensors([(4, 4)], [torch.float32], seed=31)  # the same on every rank
    full[0][1:] = 0.0
    params = distribute(full, mesh_1d(world), [[Shard(0)], [Shard(0)], [Replicate()]])
    value = regext.fused_penalty(params, 0.0, 1.0)
    grads = torch.autograd.grad(value, params, create_graph=True)
    plain = torch.autograd.grad(regext.fused_penalty(params, 0.0, 1.0), params)
    for i, (g, q, p) in enumerate(zip(grads, plain, params)):
        assert torch.equal(g.detach().full_tensor(), q.full_tensor()), i
        assert tuple(g.placements) == tuple(p.placements), i
    vs = [torch.full_like(t, 0.5) for t in full]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in
                                  zip(grads, distribute(vs, mesh_1d(world),
                                                        [[Shard(0)], [Shard(0)], [Replicate()]],
                                                        requires_grad=False))), params)
    leaves = [t.clone().requires_grad_(True) for t in full]
    ref_grads = torch.autograd.grad(regext.fused_penalty(leaves, 0.0, 1.0), leaves,
                                    create_graph=True)
    ref_hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(ref_grads, vs)), leaves)
    for i, (h, p, r) in enumerate(zip(hvp, params, ref_hvp)):
        check_grad(i, h, p, r)


@case()
def case_global_stats(rank, world):
    from torch.distributed.tensor import Replicate, Shard
    from regext.distributed import global_stats
    full = full_tensors(UNEVEN, [torch.float32] * len(UNEVEN), seed=10)
    placements = [[Shard(0)], [Replicate()], [Shard(1)], None, [Shard(0)], [Shard(2)]]
    params = distribute(full, mesh_1d(world), placements)
    with count_collectives() as log:
        local, stats = global_stats(params)
    expect_one_all_reduce(log)
    _, ref = torch.ops.regext.penalty_forward(full, torch.scalar_tensor(0.0, dtype=torch.float64), torch.scalar_tensor(0.0, dtype=torch.float64), False)
    torch.testing.assert_close(stats, ref, rtol=1e-12, atol=1e-12)
    for p, t, placement in zip(params, local, placements):
        if placement is None:
            assert t is p
        else:
            assert t.shape == p.to_local().shape and t.data_ptr() == p.to_local().data_ptr()


@case()
def case_add_penalty_grad_dtensor(rank, world):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from regext.distributed import add_penalty_grad_dtensor_
    shapes = [(5, 3), (4,), (3, 5), (2, 2)]
    full = full_tensors(shapes, [torch.float64] * 4, seed=11)
    placements = [[Shard(0)], [Replicate()], [Shard(1)], None]
    mesh = mesh_1d(world)
    params = distribute(full, mesh, placements)
    before = full_tensors(shapes, [torch.float64] * 4, seed=12)
    # Existing gradients on two parameters, none on the other two.
    params[0].grad = distribute_tensor(before[0].clone(), mesh, placements[0])
    params[3].grad = before[3].clone()
    with count_collectives() as log:
        value = add_penalty_grad_dtensor_(params, 0.4, 0.3)
    expect_one_all_reduce(log)
    ref_value, ref = reference(full, 0.4, 0.3)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    expected = [before[0] + ref[0], ref[1], ref[2], before[3] + ref[3]]
    for i, (p, e) in enumerate(zip(params, expected)):
        check_grad(i, p.grad, p, e)


@case()
def case_two_meshes(rank, world):
    # Two different meshes over all ranks: combined over the world group.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    mesh_a = mesh_1d(world)
    mesh_b = init_device_mesh("cpu", (1, world))
    full = full_tensors([(5, 3), (3, 7), (2,)], [torch.float64] * 3, seed=13)
    params = distribute(full[:1], mesh_a, [[Shard(0)]])
    params += distribute(full[1:], mesh_b, [[Shard(0), Shard(1)], [Shard(0), Shard(0)]])
    run_and_compare(params, full, 0.6, 0.2)


@case(min_world=4)
def case_mesh_2d(rank, world):
    # (dp, tp) = (2, world/2): shards on one, the other or both mesh dims, with
    # replicated dims that must not be double-counted; one world all_reduce.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    shapes = [(5, 7), (5,), (6, 3), (3, 2), (4, 4), (1, 5)]
    placements = [[Shard(0), Shard(1)], [Shard(0), Replicate()], [Replicate(), Shard(0)],
                  [Replicate(), Replicate()], [Shard(0), Shard(0)], [Shard(1), Replicate()]]
    full = full_tensors(shapes, [torch.float64] * len(shapes), seed=14)
    params = distribute(full, mesh, placements)
    run_and_compare(params, full, 0.35, 0.65)
    run_and_compare(params, full, 0.35, 0.65, l2_squared=True)


@case(min_world=4)
def case_mesh_2d_hsdp(rank, world):
    # HSDP: (replicate, shard) mesh; sums only within the shard dimension's group.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    shapes = [(5, 7), (3,), (1, 2)]
    full = full_tensors(shapes, [torch.float64] * 3, seed=15)
    params = distribute(full, mesh, [[Replicate(), Shard(0)]] * 3)
    import regext
    real = dist.all_reduce
    groups = []

    def spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        groups.append(group)
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = spy
    try:
        value = regext.fused_penalty(params, 0.5, 0.5)
    finally:
        dist.all_reduce = real
    assert len(groups) == 1 and dist.get_process_group_ranks(groups[0]) == \
        dist.get_process_group_ranks(mesh.get_group("shard")), "not the shard group"
    run_and_compare(params, full, 0.5, 0.5)
    assert value.item() == regext.fused_penalty(params, 0.5, 0.5).item()


@case()
def case_errors(rank, world):
    from torch.distributed.tensor import DTensor, Partial, Shard
    import regext
    mesh = mesh_1d(world)
    partial = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
    sharded = distribute(full_tensors([(4,)], [torch.float32], 16), mesh, [[Shard(0)]])[0]
    with count_collectives() as log:
        try:
            regext.fused_penalty([torch.ones(2), partial], 0.1, 0.1)
        except NotImplementedError as e:
            assert "params[1]" in str(e) and "Partial" in str(e), str(e)
        else:
            raise AssertionError("a Partial DTensor was accepted")
        try:
            regext.fused_penalty([sharded, torch.ones(2, device="meta")], 0.1, 0.1)
        except ValueError as e:
            assert "one device" in str(e), str(e)
        else:
            raise AssertionError("local tensors on two devices were accepted")
    # add_penalty_grad_dtensor_: a gradient whose placements differ from its
    # parameter's is refused before anything is sent or written.
    from torch.distributed.tensor import Replicate
    from regext.distributed import add_penalty_grad_dtensor_
    other = distribute(full_tensors([(4,)], [torch.float32], 16), mesh, [[Shard(0)]])[0]
    wrong = distribute(full_tensors([(4,)], [torch.float32], 17), mesh, [[Replicate()]])[0]
    sharded.grad = None
    other.grad = wrong.detach()
    with count_collectives() as log2:
        try:
            add_penalty_grad_dtensor_([sharded, other], 0.1, 0.1)
        except ValueError as e:
            assert "params[1].grad" in str(e) and "placements" in str(e), str(e)
        else:
            raise AssertionError("a Replicate gradient of a Shard(0) parameter was accepted")
    assert sharded.grad is None, "a gradient was written before the checks passed"
    expect_no_collective(log)  # errors are raised before any communication
    expect_no_collective(log2)


@case()
def case_torch_func_transforms_refuse_dtensors_clearly(rank, world):
    """Under torch.func (grad, vmap) DTensor parameters raise NotImplementedError naming
    the transforms, before any collective; plain autograd still works after it."""
    from torch.distributed.tensor import Shard
    import regext
    full = full_tensors([(4, 3)], [torch.float64], seed=27)
    w = distribute(full, mesh_1d(world), [[Shard(0)]])[0]
    calls = [
        lambda: torch.func.grad(lambda w: regext.fused_penalty([w], 0.1, 0.2))(w),
        lambda: torch.func.grad(  # a DTensor closed over by the transformed function
            lambda x: (x * x).sum() + regext.fused_penalty([w], 0.1, 0.2))(torch.ones(2)),
        lambda: torch.func.vmap(lambda w: regext.fused_penalty([w], 0.1, 0.2))(w),
    ]
    with count_collectives() as log:
        for call in calls:
            try:
                call()
            except NotImplementedError as e:
                assert "DTensor" in str(e) and "torch.func" in str(e), str(e)
            else:
                raise AssertionError("a DTensor under a torch.func transform did not raise")
    expect_no_collective(log)
    run_and_compare([w], full, 0.1, 0.2)


@case(fsdp=True)
def case_fsdp2_training(rank, world):
    """FSDP2 (fully_shard) training with the penalty vs one process on the full batch."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise Skip(f"torch.distributed.fsdp.fully_shard is not available: {e}")
    import copy
    from torch import nn
    from torch.distributed.tensor import DTensor
    import regext

    mesh = mesh_1d(world)
    try:  # FSDP2 itself, without regext, on CPU tensors and gloo
        smoke = nn.Linear(3, 2)
        fully_shard(smoke, mesh=mesh)
        smoke(torch.ones(1, 3)).sum().backward()
    except Exception as e:
        raise Skip(f"FSDP2 fully_shard does not run on CPU with gloo in torch "
                   f"{torch.__version__}: {type(e).__name__}: {e}")

    torch.manual_seed(0)
    # Sizes 5, 3, 2 rows: uneven shards, and empty ones on 4 ranks.
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(),
                          nn.Linear(3, 2)).double()
    ref_model = copy.deepcopy(model)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root keeps model[4]'s parameters
    l1, l2 = 1e-2, 5e-2
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(17)
    for step in range(3):
        xs = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(world)]
        ys = [torch.randn(4, 2, generator=gen, dtype=torch.float64) for _ in range(world)]
        # Step 0: penalty before the forward (all parameters sharded DTensors).
        # Steps 1, 2: after it, when the root's parameters are unsharded plain
        # tensors: a mixed list whose gradients take FSDP2's reduce-scatter path.
        if step == 0:
            with count_collectives() as log:
                penalty = regext.fused_penalty(model.parameters(), l1, l2)
            expect_one_all_reduce(log)
            loss = nn.functional.mse_loss(model(xs[rank]), ys[rank]) + penalty
        else:
            out = model(xs[rank])
            kinds = {type(p).__name__ for p in model.parameters()}
            assert "DTensor" in kinds and len(kinds) == 2, kinds
            penalty = regext.fused_penalty(model.parameters(), l1, l2)
            loss = nn.functional.mse_loss(out, ys[rank]) + penalty
        opt.zero_grad()
        loss.backward()

        # One process: the mean of the ranks' losses, plus the penalty once.
        ref_opt.zero_grad()
        data = sum(nn.functional.mse_loss(ref_model(x), y) for x, y in zip(xs, ys)) / world
        ref_penalty = regext.fused_penalty(ref_model.parameters(), l1, l2)
        (data + ref_penalty).backward()
        torch.testing.assert_close(penalty.detach(), ref_penalty.detach(), rtol=1e-12, atol=0)
        for i, (p, r) in enumerate(zip(model.parameters(), ref_model.parameters())):
            assert isinstance(p.grad, DTensor)
            check_grad(i, p.grad, p, r.grad)
        opt.step()
        ref_opt.step()
    for i, (p, r) in enumerate(zip(model.parameters(), ref_model.parameters())):
        torch.testing.assert_close(p.full_tensor(), r.detach(), rtol=1e-10, atol=1e-12)


# -------------------------------------- training-loop features on DTensor parameters
# add_penalty_grad_, Penalty, prox_l1_, prox_group_l2_ and sparsity on DTensors
# (sharded, replicated, mixed with plain tensors) against the same call on the full
# tensors in one process, with their collectives counted.

INPLACE_SHAPES = [(5, 3), (4,), (3, 5), (2, 2), (7,)]


def _setup_inplace(seed, placements_fn):
    from torch.distributed.tensor import Replicate, Shard
    full = full_tensors(INPLACE_SHAPES, [torch.float64] * len(INPLACE_SHAPES), seed=seed)
    placements = placements_fn(Shard, Replicate)
    return full, distribute(full, mesh_1d(dist.get_world_size()), placements)


def _mixed_placements(Shard, Replicate):
    return [[Shard(0)], [Replicate()], [Shard(1)], None, [Shard(0)]]


@case()
def case_add_penalty_grad_public(rank, world):
    import regext
    from torch.distributed.tensor import distribute_tensor
    full, params = _setup_inplace(21, _mixed_placements)
    before = full_tensors(INPLACE_SHAPES, [torch.float64] * len(INPLACE_SHAPES), seed=22)
    params[0].grad = distribute_tensor(before[0].clone(), params[0].device_mesh,
                                       params[0].placements)
    params[3].grad = before[3].clone()
    with count_collectives() as log:
        value = regext.add_penalty_grad_(params, 0.4, 0.3)
    expect_one_all_reduce(log)
    ref_value, ref = reference(full, 0.4, 0.3)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    for i, p in enumerate(params):
        expected = ref[i] + (before[i] if i in (0, 3) else 0)
        check_grad(i, p.grad, p, expected)


@case()
def case_penalty_object(rank, world):
    import regext
    full, params = _setup_inplace(23, _mixed_placements)
    named = [(f"layer{i}.{'bias' if p.dim() == 1 else 'weight'}", p)
             for i, p in enumerate(params)]
    pen = regext.Penalty(named, l1=0.2, l2=0.5, exclude="*bias")
    selected = [i for i, (n, _) in enumerate(named) if not n.endswith("bias")]
    ref_value, ref = reference([full[i] for i in selected], 0.2, 0.5)
    with count_collectives() as log:
        value = pen()
    expect_one_all_reduce(log)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(value, pen.parameters())
    for k, (g, i) in enumerate(zip(grads, selected)):
        check_grad(i, g, params[i], ref[k])
    with count_collectives() as log:
        value = pen.add_grad_()
    expect_one_all_reduce(log)
    for k, i in enumerate(selected):
        check_grad(i, params[i].grad, params[i], ref[k])
    for i in set(range(len(params))) - set(selected):
        assert params[i].grad is None


@case()
def case_prox_l1_on_shards(rank, world):
    import regext
    full, params = _setup_inplace(24, _mixed_placements)
    expected = [t.clone() for t in full]
    regext.prox_l1_(expected, 0.5)
    with count_collectives() as log:
        regext.prox_l1_(params, 0.5)
    expect_no_collective(log)
    for i, (p, e) in enumerate(zip(params, expected)):
        got = p.full_tensor() if hasattr(p, "full_tensor") else p
        assert torch.equal(got.detach(), e), f"tensor {i}"


@case()
def case_prox_group_l2_global_norms(rank, world):
    import regext
    full, params = _setup_inplace(25, _mixed_placements)
    params.append(params[0])  # listed twice: shrunk twice, in order
    full = full + [full[0]]
    expected = [t.clone() for t in full[:-1]]
    expected.append(expected[0])
    regext.prox_group_l2_(expected, 1.5)
    with count_collectives() as log:
        regext.prox_group_l2_(params, 1.5)
    assert log["all_reduce"] == 2, log  # one per run of distinct tensors
    for i, (p, e) in enumerate(zip(params, expected)):
        got = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(got.detach(), e, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"tensor {i}: {m}")


@case()
def case_sparsity_counts_whole_tensors_once(rank, world):
    import regext
    full, _ = _setup_inplace(26, _mixed_placements)
    for t in full:
        t[t.abs() < 0.7] = 0.0
    from torch.distributed.tensor import Replicate, Shard
    params = distribute(full, mesh_1d(world), _mixed_placements(Shard, Replicate), requires_grad=False)
    with count_collectives() as log:
        report = regext.sparsity_report(params)
    expect_one_all_reduce(log)
    expected = regext.sparsity_report(full)
    assert [t.zeros for t in report.per_tensor] == [t.zeros for t in expected.per_tensor]
    assert report.numel == expected.numel and report.fraction == expected.fraction


@case()
def case_metric_prox_on_shards(rank, world):
    """prox_l1_ / prox_l2_squared_ in an AdamW's metric: each rank steps its local
    shards with the local shards of exp_avg_sq (no collective), equal to the float64
    reference on the full tensors and the full state; the group lasso in the metric
    refuses DTensors clearly."""
    import regext
    from regext.reference import prox_metric_reference
    full, params = _setup_inplace(27, _mixed_placements)
    opt = torch.optim.AdamW(params, lr=0.05, foreach=False)
    for p in params:
        p.grad = torch.ones_like(p) if not hasattr(p, "full_tensor") else p.detach() * 0 + 0.3
    opt.step()
    before = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for p in params]
    state = [opt.state[p]["exp_avg_sq"] for p in params]
    full_state = [s.full_tensor() if hasattr(s, "full_tensor") else s for s in state]
    with count_collectives() as log:
        regext.prox_l1_(params, 0.02, metric=opt)
        regext.prox_l2_squared_(params, 0.01, metric=opt)
    expect_no_collective(log)
    scale = (1 - 0.999 ** 1) ** -0.5
    l1_rows = torch.tensor([[0.02, 0.0, scale, 1e-8]] * len(params), dtype=torch.float64)
    ridge_rows = torch.tensor([[0.0, 0.02, scale, 1e-8]] * len(params), dtype=torch.float64)
    prox_metric_reference(before, full_state, [], l1_rows)
    prox_metric_reference(before, full_state, [], ridge_rows)
    # (1 - beta2^t)^-1/2 here and in regext may differ in the last bit.
    for i, (p, e) in enumerate(zip(params, before)):
        got = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(got.detach(), e, rtol=1e-14, atol=0,
                                   msg=lambda m: f"tensor {i}: {m}")
        assert torch.equal(got == 0, e == 0), f"tensor {i}: zeros"
    try:
        regext.prox_group_l2_(params, 0.1, metric=opt)
    except NotImplementedError as e:
        assert "metric" in str(e) and "euclidean" in str(e), str(e)
    else:
        raise AssertionError("the group lasso in the metric did not refuse DTensors")


# ------------------------------------------------------------------------------ main

def main():
    rank, world, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    import regext  # noqa: F401  (loads the operators)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, (fn, min_world, _) in CASES.items():
            if only and name not in only:
                continue
            if world < min_world:
                results[name] = {"status": "skip", "why": f"needs {min_world} ranks"}
                continue
            try:
                fn(rank, world)
                results[name] = {"status": "ok"}
            except Skip as e:
                results[name] = {"status": "skip", "why": str(e)}
            except Exception:
                results[name] = {"status": "fail", "why": traceback.format_exc()}
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f)
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        # The cases' FSDP2 modules hold the process group in reference cycles: collect
        # them while the interpreter is alive (examples/distributed_fsdp2.py says why).
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
