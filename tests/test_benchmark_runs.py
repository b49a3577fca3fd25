"""The benchmark (benchmarks/bench_penalty.py) runs end to end and writes what it
promises: results.json with its schema, every timed variant checked against the
loop, and PNG charts. No speed is ever asserted."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import regext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
BENCH = os.path.join(BENCH_DIR, "bench_penalty.py")
ROW_KEYS = {"set", "variant", "phase", "device", "median_ms", "speedup_vs_loop", "gbps",
            "pct_of_ceiling"}
TIMEOUT_S = 900  # --quick takes under a minute on an idle 2-core CPU; CI may be loaded


def _run(args, prelude=""):
    """Runs the benchmark in a subprocess; `prelude` is Python run before it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    code = (f"import runpy, sys\n{prelude}\nsys.argv = {[BENCH] + args!r}\n"
            f"runpy.run_path({BENCH!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def _check_rows(rows):
    for row in rows:
        assert ROW_KEYS <= row.keys(), row
        assert row["check_passed"] is True, row
        assert row["device"] == "cpu"
        assert row["variant"] in ("loop", "foreach", "compiled", "regext", "regext_inplace",
                                  "foreach_norm2")
        assert row["phase"] in ("forward", "forward+backward")
        if row["variant"] == "foreach_norm2":  # the one-pass yardstick: forward only
            assert row["phase"] == "forward" and row.get("reference_pass") is True
        assert row["median_ms"] > 0 and row["gbps"] > 0 and row["pct_of_ceiling"] > 0
        if row["variant"] == "loop":
            assert row["speedup_vs_loop"] == 1.0
        else:
            assert row["speedup_vs_loop"] > 0


def test_quick_benchmark_writes_json_table_and_charts(tmp_path):
    proc = _run(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    env = data["env"]
    assert {"torch", "device_name", "threads", "ceiling_gbps", "command",
            "cpu_capability"} <= env.keys()
    assert env["torch"] == torch.__version__ and env["ceiling_gbps"] > 0
    assert env["cpu_capability"] == regext.cpu_capability()
    assert data["failures"] == []
    assert f"CPU kernels: {regext.cpu_capability()}" in proc.stdout  # the header line
    bandwidth = data["bandwidth"]
    assert {r["op"] for r in bandwidth} >= {"forward", "backward (write)", "accumulate",
                                            "prox_l1_", "prox_group_l2_"}
    for row in bandwidth:
        assert row["regext_gbps"] > 0 and row["torch_gbps"] > 0 and row["ratio"] > 0

    rows = data["results"]
    _check_rows(rows)
    _check_rows(data["scaling"])
    assert {r["set"] for r in rows} == {"resnet18", "small500"}
    expected = {"loop", "foreach", "regext", "foreach_norm2", "regext_inplace"}
    for s in ("resnet18", "small500"):
        assert {r["variant"] for r in rows if r["set"] == s} == expected
        for phase in ("forward", "forward+backward"):
            assert any(r["set"] == s and r["phase"] == phase for r in rows)
    assert {r["sweep"] for r in data["scaling"]} == {"count", "size"}

    assert "median ms" in proc.stdout and "vs loop" in proc.stdout  # the table
    markdown = (tmp_path / "results.md").read_text()
    assert "one `torch._foreach_norm(params, 2)` pass" in markdown
    assert "## Per-thread bandwidth" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("speedup.png", "scaling.png"):
            with open(tmp_path / png, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_benchmark_runs_without_tqdm_and_matplotlib(tmp_path):
    # A GPU machine may lack both: plain progress lines, no charts, same JSON.
    block = "sys.modules['tqdm'] = None\nsys.modules['matplotlib'] = None"
    proc = _run(["--quick", "--sets", "small500", "--out", str(tmp_path)], prelude=block)
    data = json.loads((tmp_path / "results.json").read_text())
    _check_rows(data["results"])
    assert {r["set"] for r in data["results"]} == {"small500"}
    assert not (tmp_path / "speedup.png").exists()
    assert "no PNG charts" in proc.stderr and "[1/" in proc.stderr


@pytest.fixture(scope="module")
def bench():
    """The benchmark module, imported (it puts benchmarks/ on sys.path itself)."""
    spec = importlib.util.spec_from_file_location("bench_penalty", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_json_is_written_only_where_asked(bench, tmp_path, monkeypatch):
    """report.write_json, which every benchmark's --out goes through: results.json in
    the folder (made if needed), and nothing for None or an empty --out ""."""
    monkeypatch.chdir(tmp_path)
    bench.report.write_json(None, {"a": 1})
    bench.report.write_json("", {"a": 1})
    assert os.listdir(tmp_path) == []
    bench.report.write_json(str(tmp_path / "new" / "dir"), {"a": [1.5, "x"]})
    with open(tmp_path / "new" / "dir" / "results.json") as f:
        assert json.load(f) == {"a": [1.5, "x"]}


def test_parameter_sets_match_the_models(bench):
    sets = bench.param_sets
    for name, (n_tensors, n_params) in sets.PARAMETER_COUNTS.items():
        shapes = sets.PARAM_SETS[name][0]()
        assert (len(shapes), sets.numel(shapes)) == (n_tensors, n_params), name
    small = sets.small500()
    assert len(small) == 500
    assert min(sets.numel([s]) for s in small) >= 1024
    assert max(sets.numel([s]) for s in small) <= 16384
    assert sets.numel(sets.split_shapes(1000, 7)) == 1000


def test_checks_reject_a_wrong_variant(bench):
    params = bench.param_sets.make_params([(40, 30), (30,), (500,)], torch.device("cpu"))
    ref = bench.reference(params)
    clock = bench.timing.Clock("cpu")
    good = bench.Variant("regext", lambda ps: regext.fused_penalty(ps, bench.L1, bench.L2))
    off = bench.Variant("off", lambda ps: regext.fused_penalty(ps, bench.L1, bench.L2) * 1.01)
    # right value, wrong gradient (the L2 term's gradient dropped)
    detached = bench.Variant("grad", lambda ps: (
        regext.fused_penalty(ps, bench.L1, 0.0)
        + bench.L2 * sum(torch.linalg.vector_norm(p.detach()) for p in ps)))
    for phase in bench.PHASES:
        assert bench.check_variant(good, phase, params, ref, clock)["check_passed"]
        assert not bench.check_variant(off, phase, params, ref, clock)["check_passed"]
    assert bench.check_variant(detached, "forward", params, ref, clock)["check_passed"]
    assert not bench.check_variant(detached, "forward+backward", params, ref,
                                   clock)["check_passed"]


def test_compiled_variant_is_checked_and_its_compile_time_recorded(bench):
    params = bench.param_sets.make_params([(64, 32), (32,), (300,)], torch.device("cpu"))
    ref = bench.reference(params)
    compiled = bench.make_compiled()
    try:
        for phase in bench.PHASES:
            result = bench.check_variant(compiled, phase, params, ref, bench.timing.Clock("cpu"))
            assert result["check_passed"], result
        summary = bench.compile_summary(compiled.compile_info)
        assert summary["first_forward_ms"] > 0 and summary["first_forward+backward_ms"] > 0
    finally:
        torch._dynamo.reset()


def test_run_set_times_every_variant_including_inplace(bench):
    logged = []
    device = torch.device("cpu")
    variants = bench.make_variants(device, False, logged.append)
    assert [v.name for v in variants] == ["loop", "foreach", "regext", "regext_inplace",
                                          "foreach_norm2"]
    cfg = {"max_copies": 3, "warmup_rounds": 1}
    progress = bench.report.Progress(total=3)
    rows, failures = bench.run_set("tiny", [(30, 20), (20,), (1000,)], variants, device, cfg,
                                   bench.timing.Clock(device), 1 << 20, progress,
                                   bench.Budget(0.05, 2, 3))
    progress.close()
    assert failures == []
    got = {(r["variant"], r["phase"]) for r in rows}
    assert got == {(v, p) for v in ("loop", "foreach", "regext") for p in bench.PHASES} | {
        ("regext_inplace", "forward+backward"), ("foreach_norm2", "forward")}
    n_bytes = 4 * (600 + 20 + 1000)
    for row in rows:
        assert row["check_passed"] and row["samples"] >= 2 and row["rotation_copies"] == 3
        factor = 1 if row["phase"] == "forward" else 4 if row["variant"] == "regext_inplace" else 3
        assert row["bytes"] == factor * n_bytes


def run_scaled_down(script, out):
    """benchmarks/<script> with shapes scaled down 100x and two repeats, writing to `out`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, script), "--scale", "0.01",
                           "--repeats", "2", "--warmup", "1", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_inplace_benchmark_runs(tmp_path):
    """benchmarks/bench_inplace.py on GPT-2-small shapes scaled down 100x."""
    run_scaled_down("bench_inplace.py", tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["median_ms"]) == {"regext_inplace", "compiled_loop", "foreach_add",
                                      "regext_autograd"}
    assert data["max_grad_diff_vs_compiled_loop"] < 1e-6
    assert data["env"]["cpu_capability"] == regext.cpu_capability()


def test_structured_benchmark_runs(tmp_path):
    """benchmarks/bench_structured.py on both sets scaled down 100x: every variant is
    checked against float64 before it is timed, and the run writes its results."""
    run_scaled_down("bench_structured.py", tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    variants = {(r["set"], r["phase"], r["variant"]) for r in data["results"]}
    for s in ("resnet18", "gpt2_small"):
        for v in ("regext", "torch_loop", "foreach_mul"):
            assert (s, "prox", v) in variants
        for v in ("regext_row", "regext_tensor", "torch_loop_row"):
            assert (s, "fwd+bwd", v) in variants
    for check in data["checks"].values():
        assert check["max_rel_err_vs_float64"] < 1e-4
    zeroed = [c["rows_zeroed"] for k, c in data["checks"].items() if k.endswith("prox/regext")]
    assert all(0 < z < 1 for z in zeroed)  # the step zeroes some groups, not all
    assert (tmp_path / "results.md").stat().st_size > 0


def test_aliasing_benchmark_runs(tmp_path):
    """benchmarks/bench_aliasing.py --quick (2,000 tensors, 3 rounds): every list's
    result checked against the reference loop, every variant timed, the dup/no_dup
    ratios reported (not asserted: no speed is)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "bench_aliasing.py"), "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["failures"] == [] and data["env"]["tensors"] == 2000
    ops = ("prox_l1_", "add_penalty_grad_")
    assert set(data["median_ms"]) == {f"{op} {name}" for op in ops
                                      for name in ("no_dup", "dup_end", "dup_mid")} | {
        "prox torch_loop no_dup", "grad torch_loop no_dup"}
    assert all(ms > 0 for ms in data["median_ms"].values())
    assert set(data["ratio_to_no_dup"]) == {f"{op} {name}" for op in ops
                                            for name in ("dup_end", "dup_mid")}
    assert "checks against the reference loop: passed" in proc.stdout
    assert "/ no_dup = " in proc.stdout
