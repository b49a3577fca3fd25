"""benchmarks/bench_small_calls.py runs (--quick) and reports every row with its
baseline and goal. It checks that the benchmark runs, never how fast."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_calls_benchmark_runs(tmp_path):
    out = tmp_path / "small.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_small_calls.py"),
                          "--quick", "--json", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert "torch" in data["machine"] and "CPU capability" in data["machine"]
    rows = {r["row"]: r for r in data["results"]}
    assert len(rows) == 8
    for r in rows.values():
        assert r["baseline"] in r["median_us"] and r["ratio"] > 0
    assert "foreach_norm" in run.stdout and "seed loop" in run.stdout
