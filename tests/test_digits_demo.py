"""examples/digits_sparse.py runs (--fast) on scikit-learn's digits and tells its
story: only L1 by proximal steps makes exact zeros. No assertion on accuracy or speed."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_demo_runs_and_writes_its_outputs(tmp_path):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location(
        "digits_sparse", os.path.join(ROOT, "examples", "digits_sparse.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    results, sweep = demo.run(str(tmp_path), fast=True)
    assert (tmp_path / "table.md").stat().st_size > 0
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("pixels.png", "sweep.png"):
            assert (tmp_path / name).stat().st_size > 0
    assert results["none"]["zeros"] == 0.0 and results["L2^2"]["zeros"] == 0.0
    assert results["L1"]["zeros"] > 0.0
    assert [s["zeros"] for s in sweep] == sorted(s["zeros"] for s in sweep)  # more l1, more zeros
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0 <= r["pixels"] <= 64
