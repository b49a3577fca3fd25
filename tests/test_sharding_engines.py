"""FSDP1 and DeepSpeed ZeRO-3 (issue 21): every entry point refuses parameters that
are not whole, with an error naming the engine and what to do, before computing or
modifying anything; inside FSDP.summon_full_params / deepspeed.zero.GatheredParameters
the parameters are whole and the penalty is exact. On ZeRO-3 partitions,
add_penalty_grad_ (one training step equals the single-process step), fused_penalty's
value under no_grad and the sparsity counts are exact with one all_reduce, with the
partitions' padding poisoned. Two gloo ranks on the CPU."""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _launcher import launch  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available()
    or sys.platform == "win32", reason="needs torch.distributed with gloo on Linux/macOS")

WORKER = os.path.join(HERE, "_engines_worker.py")
# DeepSpeed builds its CPU communication op once (about 2 minutes, cached after).
DEADLINE_S = {"fsdp1": 120, "zero3": 420}
_RUNS = {}
CASES = {"fsdp1": ["fsdp1_use_orig_params_True", "fsdp1_use_orig_params_False"],
         "zero3": ["zero3", "zero3_value", "zero3_add_penalty_grad",
                   "zero3_sparsity", "zero3_nonfinite",
                   "zero3_bf16", "zero3_accumulation"]}


@pytest.mark.parametrize("engine, case", [(e, c) for e, cs in CASES.items() for c in cs])
def test_engine(engine, case, tmp_path_factory):
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    if engine not in _RUNS:  # each engine's ranks start once, for all its cases
        _RUNS[engine] = launch(WORKER, 2, tmp_path_factory.mktemp(engine), DEADLINE_S[engine],
                               {"REGEXT_ENGINE": engine, "DS_ACCELERATOR": "cpu"})
    results, output, codes = _RUNS[engine]
    outcomes = [r.get(case) for r in results]
    if any(o is None for o in outcomes):
        pytest.fail(f"{case} did not report on every rank (exit codes {codes}):\n{output}")
    failures = [f"rank {r}:\n{o['why']}" for r, o in enumerate(outcomes) if o["status"] == "fail"]
    if failures:
        pytest.fail(f"{case} failed:\n" + "\n".join(failures))
    if all(o["status"] == "skip" for o in outcomes):
        pytest.skip(outcomes[0]["why"])
    assert all(o["status"] == "ok" for o in outcomes), outcomes
