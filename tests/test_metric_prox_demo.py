"""examples/metric_prox.py runs (--fast) and tells its story: at the same l1, AdamW's
Euclidean proximal step barely makes zeros while the step in its metric does, and in
the lasso the metric step keeps exactly the inputs that matter, as SGD does. No
assertion on accuracy or speed."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metric_prox_demo_runs_and_tells_its_story(tmp_path):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location(
        "metric_prox", os.path.join(ROOT, "examples", "metric_prox.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    digits, lasso = demo.run(str(tmp_path), fast=True)
    assert (tmp_path / "table.md").stat().st_size > 0
    assert digits["AdamW, no penalty"]["zeros"] == 0.0
    euclidean = digits["AdamW, L1, Euclidean step"]["zeros"]
    metric = digits["AdamW, L1, metric step"]["zeros"]
    assert metric > 10 * max(euclidean, 1e-3)
    relevant = list(range(len(demo.RELEVANT)))
    assert lasso["SGD"]["kept"] == relevant
    assert lasso["AdamW, metric step"]["kept"] == relevant
    assert len(lasso["AdamW, Euclidean step"]["kept"]) > 2 * len(relevant)
    for r in digits.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0 <= r["pixels"] <= 64
