"""add_penalty_grad_, Penalty, prox_l1_, prox_group_l2_ and sparsity on DTensor
parameters, two gloo ranks (cases in tests/_inplace_dist_worker.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import regext

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available()
                       or not torch.distributed.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
    pytest.mark.skipif(sys.platform == "win32", reason="multi-process gloo: Linux/macOS"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_inplace_dist_worker.py")
WORLD = 2
DEADLINE_S = float(os.environ.get("REGEXT_DIST_TIMEOUT", "150"))

sys.path.insert(0, HERE)
from _inplace_dist_worker import CASES  # noqa: E402


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("inplace_dist")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root = os.path.dirname(os.path.dirname(os.path.abspath(regext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(WORLD), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=DEADLINE_S)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outputs.append("(killed after the deadline)")
    per_rank = []
    for r in range(WORLD):
        path = out / f"rank{r}.json"
        per_rank.append(json.loads(path.read_text()) if path.exists() else {})
    return per_rank, "\n".join(f"--- rank {r} ---\n{o[-3000:]}" for r, o in enumerate(outputs))


@pytest.mark.parametrize("name", list(CASES))
def test_case(results, name):
    per_rank, output = results
    outcomes = [r.get(name) for r in per_rank]
    if any(o is None for o in outcomes):
        pytest.fail(f"case {name!r} did not report on every rank:\n{output}")
    failures = [f"rank {r}:\n{o['why']}" for r, o in enumerate(outcomes) if o["status"] != "ok"]
    assert not failures, "\n".join(failures)
