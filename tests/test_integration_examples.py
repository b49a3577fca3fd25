"""examples/hf_trainer.py and examples/lightning_callback.py run (few steps) and say
what they claim: logged penalty and sparsity, the no_decay selection, the step count."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_trainer_example(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    logged, pen = load("hf_trainer").run(str(tmp_path), steps=8)
    assert [e["step"] for e in logged] == [4, 8]
    assert all(e["penalty"] > 0 and 0 <= e["sparsity"] <= 1 for e in logged)
    assert logged[-1]["sparsity"] < 1  # a small l1: most weights stay
    assert pen.step == 8 and all(p.ndim >= 2 for p in pen.parameters())
    assert "penalized" in capsys.readouterr().out


def test_lightning_example(capsys):
    pytest.importorskip("lightning")
    metrics, strength = load("lightning_callback").run(steps=40)
    assert {"penalty", "sparsity", "loss"} <= set(metrics)
    assert metrics["penalty"] > 0 and strength.shape == (24,)
    assert "weight mass per input" in capsys.readouterr().out
