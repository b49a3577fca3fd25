"""examples/digits_pruning.py runs (--fast) and its pruning is exact: the network with
its all-zero neurons removed computes the same function. No assertion on accuracy
or speed."""

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_demo():
    spec = importlib.util.spec_from_file_location(
        "digits_pruning", os.path.join(ROOT, "examples", "digits_pruning.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_removing_zero_neurons_keeps_the_function():
    demo = load_demo()
    model = demo.make_mlp(seed=3, hidden=16)
    with torch.no_grad():
        model[0].weight[[1, 5, 6]] = 0.0   # neurons of hidden layer 1 with no input
        model[0].bias[5] = 0.7             # ... one of which outputs a constant
        model[2].weight[[0, 15]] = 0.0
        model[2].bias[15] = -0.2
    small = demo.prune(model)
    sizes = [m.out_features for m in small if isinstance(m, torch.nn.Linear)]
    assert sizes == [13, 14, 10]
    x = torch.randn(200, 64)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_digits_pruning_demo_runs_and_writes_its_outputs(tmp_path):
    pytest.importorskip("sklearn")
    demo = load_demo()
    rows = demo.run(str(tmp_path), fast=True)
    assert (tmp_path / "table.md").stat().st_size > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "neurons.png").stat().st_size > 0
    none, lasso = rows[0], rows[-1]
    assert none["l2"] == 0 and none["params"] == none["pruned_params"]
    assert lasso["pruned_params"] < lasso["params"]  # whole neurons removed
    for r in rows:
        # The same function: at most a float32 tie flips one of the 597 test images.
        assert abs(r["accuracy"] - r["pruned_accuracy"]) <= 1 / 597 + 1e-9
