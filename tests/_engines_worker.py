"""One rank of the sharding-engine tests (run by tests/test_sharding_engines.py).

    python tests/_engines_worker.py RANK WORLD_SIZE OUT_DIR

REGEXT_ENGINE selects the engine: "fsdp1" (torch's FullyShardedDataParallel on
gloo, CPU, both use_orig_params modes) or "zero3" (DeepSpeed ZeRO-3 with
DS_ACCELERATOR=cpu and gloo). Every case writes {"status": "ok" | "fail" | "skip",
"why": ...} to OUT_DIR/rank<RANK>.json.
"""

import json
import os
import sys
import traceback

import torch
from torch import nn

L1, L2 = 0.3, 0.7


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def reference(model_factory=make_model):
    """The penalty of the whole model in this process (no engine)."""
    import regext
    model = model_factory()
    return float(regext.fused_penalty(model.parameters(), L1, L2))


def failed():
    """The current exception as a failed case, printed at once too: a rank that fails
    can leave the other waiting in a collective until the deadline kills both."""
    why = traceback.format_exc()
    print(why, flush=True)
    return {"status": "fail", "why": why}


def expect_error(fn, *fragments):
    try:
        fn()
    except ValueError as e:
        missing = [f for f in fragments if f not in str(e)]
        if missing:
            raise AssertionError(f"error lacks {missing}: {e}")
        return
    raise AssertionError("no error raised: a silently wrong result")


def every_entry_point_refuses(model, *fragments, supported=()):
    """fused_penalty, add_penalty_grad_, the prox operators, sparsity and Penalty all
    raise before computing or modifying anything (except those in `supported`)."""
    import regext
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    expect_error(lambda: regext.fused_penalty(params, L1, L2), "fused_penalty", *fragments)
    if "add_penalty_grad_" not in supported:
        expect_error(lambda: regext.add_penalty_grad_(params, L1, L2), "add_penalty_grad_",
                     *fragments)
    expect_error(lambda: regext.prox_l1_(params, 0.1), "prox_l1_", *fragments)
    expect_error(lambda: regext.prox_group_l2_(params, 0.1), "prox_group_l2_", *fragments)
    if "sparsity" not in supported:
        expect_error(lambda: regext.sparsity(params), *fragments)
    expect_error(lambda: regext.Penalty(model, L1, L2), "Penalty", *fragments)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b), "a refused call modified a parameter"


def fsdp1_cases(rank, world):
    import regext
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    want = reference()
    out = {}
    for orig in (True, False):
        name = f"fsdp1_use_orig_params_{orig}"
        try:
            model = FSDP(make_model(), use_orig_params=orig, device_id=torch.device("cpu"))
            every_entry_point_refuses(
                model, "FSDP1", "summon_full_params", "fully_shard",
                "FlatParameter" if not orig else "use_orig_params=True")
            with FSDP.summon_full_params(model):
                got = float(regext.fused_penalty(model.parameters(), L1, L2))
                pen = regext.Penalty(model, L1, L2)
                got_pen = float(pen().detach())
            assert abs(got - want) <= 1e-6 * want, (got, want)
            assert abs(got_pen - want) <= 1e-6 * want, (got_pen, want)
            # A Penalty built inside summon_full_params and called outside it is refused:
            # by regext's engine check (use_orig_params=True: FSDP's pieces), or by the
            # operators' storage check (use_orig_params=False: the module's own
            # parameters, whose storage FSDP freed).
            expect_error(lambda: pen(), "FSDP1")
            out[name] = {"status": "ok", "why": f"{got} == {want}"}
        except Exception:
            out[name] = failed()
    return out


def make_zero3_model():
    """Sizes that exercise ZeRO-3's padding on 2 ranks: the 5-element bias and
    weight split 3 + 2 (rank 1's partition ends in padding) and the 1-element bias
    1 + 0 (rank 1 holds padding only)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))


def zero3_inputs(world):
    torch.manual_seed(1)
    return torch.randn(world, 3, 6)


def zero3_engine(world, micro_steps=1):
    import deepspeed
    model = make_zero3_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {"train_batch_size": 3 * world * micro_steps, "train_micro_batch_size_per_gpu": 3,
              "gradient_accumulation_steps": micro_steps,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def poison_padding(module):
    """Writes 100 into the padding of every partition (DeepSpeed leaves it
    uninitialized): a penalty that read it would be far off."""
    import torch.distributed as dist
    poisoned = 0
    for p in module.parameters():
        size = p.ds_tensor.numel()
        real = max(0, min(size, p.ds_numel - dist.get_rank(p.ds_process_group) * size))
        if real < size:
            p.ds_tensor.data[real:] = 100.0
            poisoned += 1
    return poisoned


class CountAllReduce:
    """Counts torch.distributed.all_reduce calls inside the block."""

    def __enter__(self):
        import torch.distributed as dist
        self.calls, self.original = 0, dist.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        dist.all_reduce = self.original


def zero3_single_process_steps(steps, penalty):
    """The reference: one SGD step per entry of `steps`, each on the whole batch of
    that step (the mean of the losses of every rank and micro-batch, as DeepSpeed
    averages the ranks' gradients and scales each micro-batch's loss by 1/micro-steps),
    with the penalty's gradient if asked, and DeepSpeed's default gradient clipping
    (1.0; the norm includes the penalty's gradient, which must be in ZeRO-3's
    partitions before engine.step computes it)."""
    import regext
    model = make_zero3_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for xs in steps:
        opt.zero_grad()
        loss = sum(model(x).pow(2).sum() for x in xs) / len(xs)
        loss.backward()
        if penalty:
            regext.add_penalty_grad_(model.parameters(), L1, L2)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        assert norm > 1.0, norm  # clipping is active: it sees the penalty's gradient
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def zero3_cases(rank, world):
    import deepspeed
    import regext
    out = {}
    want = reference(make_zero3_model)
    want_sq = float(regext.fused_penalty(make_zero3_model().parameters(), L1, L2,
                                         l2_squared=True))
    try:
        engine = zero3_engine(world)
        module = engine.module
        every_entry_point_refuses(module, "ZeRO-3", "GatheredParameters", "NOT_AVAILABLE",
                                  supported=("add_penalty_grad_", "sparsity"))
        # fused_penalty with autograd is refused, pointing at add_penalty_grad_.
        expect_error(lambda: regext.fused_penalty(module.parameters(), L1, L2),
                     "fused_penalty", "add_penalty_grad_", "torch.no_grad()", "dtype")
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            got = float(regext.fused_penalty(params, L1, L2))
            got_pen = float(regext.Penalty(module, L1, L2)().detach())
        assert abs(got - want) <= 1e-6 * want, (got, want)
        assert abs(got_pen - want) <= 1e-6 * want, (got_pen, want)
        out["zero3"] = {"status": "ok", "why": f"{got} == {want}"}
    except Exception:
        out["zero3"] = failed()
        return out
    try:
        # The value on the partitions, outside GatheredParameters: one all_reduce.
        layout = [(p.ds_numel, p.ds_tensor.numel()) for p in module.parameters()]
        poisoned = poison_padding(module)
        assert poisoned == (3 if rank == 1 else 0), (poisoned, layout)
        with torch.no_grad(), CountAllReduce() as count:
            got = float(regext.fused_penalty(module.parameters(), L1, L2))
        with torch.no_grad():
            got_sq = float(regext.fused_penalty(module.parameters(), L1, L2, l2_squared=True))
        assert count.calls == 1, f"{count.calls} all_reduce calls"
        assert abs(got - want) <= 1e-6 * want, (got, want)
        assert abs(got_sq - want_sq) <= 1e-6 * want_sq, (got_sq, want_sq)
        # A plain tensor with them: whole on every rank, its penalty added once.
        extra = torch.tensor([3.0, -4.0])
        with torch.no_grad():
            got_mixed = float(regext.fused_penalty([extra] + list(module.parameters()), L1, L2))
        want_mixed = want + L1 * 7.0 + L2 * 5.0
        assert abs(got_mixed - want_mixed) <= 1e-6 * want_mixed, (got_mixed, want_mixed)
        # add_penalty_grad_ refuses a plain tensor that requires grad among them, before
        # any communication, naming it and what to do.
        expect_error(lambda: regext.add_penalty_grad_(
            list(module.parameters()) + [torch.ones(2, requires_grad=True)], L1, L2),
            "add_penalty_grad_", "params[4]", "requires grad", "separately", "dtype")
        out["zero3_value"] = {"status": "ok", "why": f"{got} == {want}, 1 all_reduce"}
    except Exception:
        out["zero3_value"] = failed()
    try:
        # One training step: engine.backward, add_penalty_grad_, engine.step equals the
        # single-process step with the penalty's gradient.
        xs = zero3_inputs(world)
        with_penalty = zero3_single_process_steps([xs], penalty=True)
        without = zero3_single_process_steps([xs], penalty=False)
        assert min(float((a - b).abs().max()) for a, b in zip(with_penalty, without)) > 1e-3
        loss = engine(xs[rank]).pow(2).sum()
        engine.backward(loss)
        statuses = {p.ds_status.name for p in module.parameters()}
        with CountAllReduce() as count:
            value = float(regext.add_penalty_grad_(module.parameters(), L1, L2))
        assert count.calls == 1, f"{count.calls} all_reduce calls"
        assert abs(value - want) <= 1e-6 * want, (value, want)
        engine.step()
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            got = [p.detach().clone() for p in params]
        for (name_p, _), g, w, wo in zip(module.named_parameters(), got, with_penalty, without):
            err = float((g - w).abs().max())
            assert err <= 1e-6, f"{name_p}: off by {err} (vs. no penalty: " \
                                f"{float((g - wo).abs().max())})"
        # The value of the stepped model, on its partitions, equals the reference's.
        ref = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
        with torch.no_grad():
            for p, w in zip(ref.parameters(), with_penalty):
                p.copy_(w)
            stepped = float(regext.fused_penalty(module.parameters(), L1, L2))
        want_stepped = float(regext.fused_penalty(ref.parameters(), L1, L2).detach())
        assert abs(stepped - want_stepped) <= 1e-6 * want_stepped, (stepped, want_stepped)
        out["zero3_add_penalty_grad"] = {
            "status": "ok", "why": f"statuses after backward {sorted(statuses)}; value {value}"}
    except Exception:
        out["zero3_add_penalty_grad"] = failed()
    try:
        # Exact zeros on the partitions: every other real element and all the padding
        # set to 0; the report must count the real ones only (one all_reduce).
        import torch.distributed as dist
        for p in module.parameters():
            size = p.ds_tensor.numel()
            real = max(0, min(size, p.ds_numel - dist.get_rank(p.ds_process_group) * size))
            p.ds_tensor.data[:real:2] = 0.0
            p.ds_tensor.data[real:] = 0.0
        with CountAllReduce() as count:
            report = regext.sparsity_report(module)
        assert count.calls == 1, f"{count.calls} all_reduce calls"
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            whole = [(n, p.detach().clone()) for n, p in module.named_parameters()]
        want_report = regext.sparsity_report(whole)
        got_rows = [(t.name, t.shape, t.zeros, t.numel) for t in report.per_tensor]
        want_rows = [(t.name, t.shape, t.zeros, t.numel) for t in want_report.per_tensor]
        assert got_rows == want_rows, (got_rows, want_rows)
        assert report.zeros == want_report.zeros > 0 and report.numel == want_report.numel
        assert all(t.zero_rows is None and t.zero_columns is None for t in report.per_tensor)
        frac = regext.sparsity(module.parameters())
        assert frac == want_report.fraction, (frac, want_report.fraction)
        out["zero3_sparsity"] = {"status": "ok", "why": f"{report.zeros}/{report.numel} zeros"}
    except Exception:
        out["zero3_sparsity"] = failed()
    try:
        # error_if_nonfinite: an inf in rank 0's piece only; the global rows make every
        # rank raise the same error, naming the parameter with its whole shape.
        first = next(iter(module.parameters()))
        if rank == 0:
            first.ds_tensor.data[0] = float("inf")
        try:
            with torch.no_grad():
                regext.fused_penalty(module.parameters(), L1, L2, error_if_nonfinite=True)
        except RuntimeError as e:
            assert "params[0]" in str(e) and "(5, 6)" in str(e), str(e)
        else:
            raise AssertionError("no error for an infinite penalty")
        out["zero3_nonfinite"] = {"status": "ok", "why": "raised on every rank"}
    except Exception:
        out["zero3_nonfinite"] = failed()
    try:
        out["zero3_bf16"] = zero3_bf16_case(rank, world)
    except Exception:
        out["zero3_bf16"] = failed()
    try:
        out["zero3_accumulation"] = zero3_accumulation_case(rank, world)
    except Exception:
        out["zero3_accumulation"] = failed()
    return out


def zero3_accumulation_case(rank, world, micro_steps=2):
    """Gradient accumulation, as docs/distributed.md says to use it: every micro-step
    calls engine.backward and engine.step; add_penalty_grad_ runs once per optimizer
    step, where engine.is_gradient_accumulation_boundary(). Two optimizer steps equal
    two single-process steps on the mean loss of all micro-batches of all ranks (as
    DeepSpeed scales each micro-step's loss by 1/micro_steps and averages the ranks)
    with the penalty's gradient and the default clipping."""
    import deepspeed
    import regext
    engine = zero3_engine(world, micro_steps)
    module = engine.module
    torch.manual_seed(2)
    batches = torch.randn(2, world, micro_steps, 3, 6)  # [optimizer step, rank, micro-step]
    calls = 0
    for step in range(2):
        for k in range(micro_steps):
            engine.backward(engine(batches[step, rank, k]).pow(2).sum())
            if engine.is_gradient_accumulation_boundary():
                regext.add_penalty_grad_(module.parameters(), L1, L2)
                calls += 1
            engine.step()
    assert calls == 2, calls
    want = zero3_single_process_steps([batches[step].flatten(0, 1) for step in range(2)],
                                      penalty=True)
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        got = [p.detach().clone() for p in params]
    errors = [float((g - w).abs().max()) for g, w in zip(got, want)]
    assert max(errors) <= 1e-6, errors
    return {"status": "ok", "why": f"{micro_steps} micro-steps, 2 steps, max error {max(errors)}"}


def zero3_bf16_case(rank, world):
    """bf16 parameters (their partitions bf16, the gradient partitions bf16 too, as
    DeepSpeed accumulates them): add_penalty_grad_ adds the exact gradient of the
    whole parameters, computed in float32 from the bf16 values; what lands in the
    partition is that sum rounded to the partition's dtype, and nothing else."""
    import deepspeed
    import regext
    from deepspeed.utils import safe_get_local_grad
    import torch.distributed as dist
    model = make_zero3_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {"train_batch_size": 3 * world, "train_micro_batch_size_per_gpu": 3,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    module = engine.module
    engine.backward(engine(zero3_inputs(world)[rank].bfloat16()).float().pow(2).sum())
    params = list(module.parameters())
    before = [safe_get_local_grad(p).clone() for p in params]
    value = float(regext.add_penalty_grad_(params, L1, L2))
    after = [safe_get_local_grad(p).clone() for p in params]
    with deepspeed.zero.GatheredParameters(params):
        whole = [p.detach().float().clone().requires_grad_() for p in params]
    want = regext.fused_penalty(whole, L1, L2)
    grads = torch.autograd.grad(want, whole)
    assert abs(value - float(want)) <= 1e-6 * float(want), (value, float(want))
    for p, b, a, g in zip(params, before, after, grads):
        assert p.ds_tensor.dtype == torch.bfloat16, p.ds_tensor.dtype
        size = p.ds_tensor.numel()
        real = max(0, min(size, p.ds_numel - dist.get_rank(p.ds_process_group) * size))
        piece = g.flatten()[dist.get_rank(p.ds_process_group) * size:][:real]
        exact = b[:real] + piece  # float32: safe_get_local_grad's dtype
        # DeepSpeed 0.19 keeps bf16 gradient partitions (rounded); a float32 one: exact.
        assert (torch.equal(a[:real], exact.bfloat16().float())
                or float((a[:real] - exact).abs().max(initial=0.0)) <= 1e-6), (a[:real], exact)
        assert torch.equal(a[real:], b[real:]), "the padding's gradient changed"
        assert real == 0 or float(piece.abs().max()) > 1e-3  # the penalty did add
    return {"status": "ok", "why": f"value {value}, gradient dtype {before[0].dtype}"}


def main():
    rank, world, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    engine = os.environ["REGEXT_ENGINE"]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if engine == "zero3":
        os.environ["DS_ACCELERATOR"] = "cpu"
        try:
            import deepspeed
        except ImportError as e:
            results = {"zero3": {"status": "skip", "why": f"deepspeed is not installed: {e}"}}
        else:
            deepspeed.init_distributed(dist_backend="gloo")
            results = zero3_cases(rank, world)
    else:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        results = fsdp1_cases(rank, world)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
