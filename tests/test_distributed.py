"""DTensor / FSDP2 parameters across processes: values, gradients, one collective.

Each world size starts its ranks once (tests/_dist_worker.py, gloo on 127.0.0.1
with a free port, bounded by a deadline) and runs every case there; the tests
below assert on each case's outcome on every rank. Each case compares the value
and the gradients with regext on the full tensors in one process, and counts the
collectives of the call.
"""

import os
import sys

import pytest
import torch

import regext

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(),
                       reason="torch.distributed is not available in this torch build"),
    pytest.mark.skipif(torch.distributed.is_available()
                       and not torch.distributed.is_gloo_available(),
                       reason="the gloo backend is not available in this torch build"),
    pytest.mark.skipif(sys.platform == "win32",
                       reason="multi-process gloo tests run on Linux and macOS only"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dist_worker.py")
WORLD_SIZES = [2, 4]
# The whole group of ranks, all cases included, must finish within this.
DEADLINE_S = float(os.environ.get("REGEXT_DIST_TIMEOUT", "150"))

sys.path.insert(0, HERE)
from _dist_worker import CASES  # noqa: E402
from _launcher import launch  # noqa: E402


def _launch(world, out_dir):
    return launch(WORKER, world, out_dir, DEADLINE_S)



_RUNS = {}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    if world not in _RUNS:
        _RUNS[world] = _launch(world, tmp_path_factory.mktemp(f"dist_world{world}"))
    return world, _RUNS[world]


@pytest.mark.parametrize("name", list(CASES))
def test_case(world_results, name):
    world, (results, output, _) = world_results
    outcomes = [r.get(name) for r in results]
    if any(o is None for o in outcomes):
        pytest.fail(f"case {name!r} did not report on every rank (world {world}):\n{output}")
    failures = [f"rank {r}:\n{o['why']}" for r, o in enumerate(outcomes)
                if o["status"] == "fail"]
    if failures:
        pytest.fail(f"case {name!r} failed (world {world}):\n" + "\n".join(failures))
    if all(o["status"] == "skip" for o in outcomes):
        pytest.skip(outcomes[0]["why"])
    assert all(o["status"] == "ok" for o in outcomes), outcomes


def test_all_ranks_exited_cleanly(world_results):
    world, (results, output, exit_codes) = world_results
    assert exit_codes == [0] * world, f"exit codes {exit_codes} (world {world}):\n{output}"
    assert all(results), f"a rank wrote no results (world {world}):\n{output}"
