"""One rank of the multi-process DTensor tests of the training-loop features
(run by tests/test_inplace_distributed.py; helpers from tests/_dist_worker.py).

    python tests/_inplace_dist_worker.py RANK WORLD_SIZE OUT_DIR

Each case compares add_penalty_grad_, Penalty, prox_l1_, prox_group_l2_ and
sparsity on DTensor parameters (sharded, replicated, mixed with plain tensors)
with the same call on the full tensors in one process, and counts collectives.
"""

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_worker import (check_grad, count_collectives, distribute,  # noqa: E402
                          expect_no_collective, expect_one_all_reduce, full_tensors,
                          mesh_1d, reference)

CASES = {}


def case(fn):
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


SHAPES = [(5, 3), (4,), (3, 5), (2, 2), (7,)]


def _setup(seed, placements_fn):
    from torch.distributed.tensor import Replicate, Shard
    full = full_tensors(SHAPES, [torch.float64] * len(SHAPES), seed=seed)
    placements = placements_fn(Shard, Replicate)
    return full, distribute(full, mesh_1d(dist.get_world_size()), placements)


def _mixed(Shard, Replicate):
    return [[Shard(0)], [Replicate()], [Shard(1)], None, [Shard(0)]]


@case
def case_add_penalty_grad_public(rank, world):
    import regext
    from torch.distributed.tensor import distribute_tensor
    full, params = _setup(21, _mixed)
    before = full_tensors(SHAPES, [torch.float64] * len(SHAPES), seed=22)
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


@case
def case_penalty_object(rank, world):
    import regext
    full, params = _setup(23, _mixed)
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


@case
def case_prox_l1_on_shards(rank, world):
    import regext
    full, params = _setup(24, _mixed)
    expected = [t.clone() for t in full]
    regext.prox_l1_(expected, 0.5)
    with count_collectives() as log:
        regext.prox_l1_(params, 0.5)
    expect_no_collective(log)
    for i, (p, e) in enumerate(zip(params, expected)):
        got = p.full_tensor() if hasattr(p, "full_tensor") else p
        assert torch.equal(got.detach(), e), f"tensor {i}"


@case
def case_prox_group_l2_global_norms(rank, world):
    import regext
    full, params = _setup(25, _mixed)
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


@case
def case_sparsity_counts_whole_tensors_once(rank, world):
    import regext
    full, _ = _setup(26, _mixed)
    for t in full:
        t[t.abs() < 0.7] = 0.0
    from torch.distributed.tensor import Replicate, Shard
    params = distribute(full, mesh_1d(world), _mixed(Shard, Replicate), requires_grad=False)
    with count_collectives() as log:
        report = regext.sparsity_report(params)
    expect_one_all_reduce(log)
    expected = regext.sparsity_report(full)
    assert [t.zeros for t in report.per_tensor] == [t.zeros for t in expected.per_tensor]
    assert report.numel == expected.numel and report.fraction == expected.fraction


def main():
    rank, world, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    import regext  # noqa: F401
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, fn in CASES.items():
            try:
                fn(rank, world)
                results[name] = {"status": "ok"}
            except Exception:
                results[name] = {"status": "fail", "why": traceback.format_exc()}
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
