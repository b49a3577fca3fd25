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


def expect_error(fn, *fragments):
    try:
        fn()
    except ValueError as e:
        missing = [f for f in fragments if f not in str(e)]
        if missing:
            raise AssertionError(f"error lacks {missing}: {e}")
        return
    raise AssertionError("no error raised: a silently wrong result")


def every_entry_point_refuses(model, *fragments):
    """fused_penalty, add_penalty_grad_, the prox operators, sparsity and Penalty all
    raise before computing or modifying anything."""
    import regext
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    expect_error(lambda: regext.fused_penalty(params, L1, L2), "fused_penalty", *fragments)
    expect_error(lambda: regext.add_penalty_grad_(params, L1, L2), "add_penalty_grad_",
                 *fragments)
    expect_error(lambda: regext.prox_l1_(params, 0.1), "prox_l1_", *fragments)
    expect_error(lambda: regext.prox_group_l2_(params, 0.1), "prox_group_l2_", *fragments)
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
            out[name] = {"status": "fail", "why": traceback.format_exc()}
    return out


def zero3_cases(rank, world):
    import deepspeed
    import regext
    want = reference()
    try:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        config = {"train_batch_size": world, "zero_optimization": {"stage": 3},
                  "zero_allow_untested_optimizer": True}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        module = engine.module
        every_entry_point_refuses(module, "ZeRO-3", "GatheredParameters", "NOT_AVAILABLE")
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            got = float(regext.fused_penalty(params, L1, L2))
            got_pen = float(regext.Penalty(module, L1, L2)().detach())
        assert abs(got - want) <= 1e-6 * want, (got, want)
        assert abs(got_pen - want) <= 1e-6 * want, (got_pen, want)
        return {"zero3": {"status": "ok", "why": f"{got} == {want}"}}
    except Exception:
        return {"zero3": {"status": "fail", "why": traceback.format_exc()}}


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
