"""DTensor / FSDP2 parameters across processes: values, gradients, one collective.

Each world size starts its ranks once (tests/_dist_worker.py, gloo on 127.0.0.1
with a free port, bounded by a deadline) and runs every case there; the tests
below assert on each case's outcome on every rank. Each case compares the value
and the gradients with regext on the full tensors in one process, and counts the
collectives of the call.
"""

import json
import os
import socket
import subprocess
import sys
import time

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


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, out_dir):
    """Runs `world` ranks of the worker; returns (results per rank, their output)."""
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    # The ranks import the same regext (and its built operators) as this process.
    root = os.path.dirname(os.path.dirname(os.path.abspath(regext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    logs = [open(os.path.join(out_dir, f"log{r}.txt"), "w+") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(out_dir)],
                              env=env, stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + DEADLINE_S
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    output = []
    for r, log in enumerate(logs):
        log.seek(0)
        output.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n" + log.read()[-4000:])
        log.close()
    results = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    if timed_out:
        output.insert(0, f"the ranks did not finish within {DEADLINE_S:.0f} s; killed")
    return results, "\n".join(output), [p.returncode for p in procs]


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
