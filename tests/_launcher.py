"""Starting the ranks of a multi-process test: gloo on 127.0.0.1 with a free port,
every rank bounded by one deadline; results are read from OUT_DIR/rank<R>.json."""

import json
import os
import socket
import subprocess
import sys
import time

import regext


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker, world, out_dir, deadline_s, extra_env=None):
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
    env.update(extra_env or {})
    procs = [subprocess.Popen([sys.executable, worker, str(r), str(world), str(out_dir)],
                              env=env, stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + deadline_s
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
        output.insert(0, f"the ranks did not finish within {deadline_s:.0f} s; killed")
    return results, "\n".join(output), [p.returncode for p in procs]
