"""regext.integrations.lightning.PenaltyCallback in real Lightning runs (CPU):
automatic optimization (closures) with SGD and AdamW, manual optimization, logging,
checkpoints; grad mode with SGD equals the loop that adds the penalty to the loss."""

import pytest
import torch
from torch import nn

import regext

L = pytest.importorskip("lightning.pytorch")
from regext.integrations.lightning import PenaltyCallback  # noqa: E402

L1, L2 = 0.02, 0.03


def loader(seed=1, n=64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = torch.randn(n, 2, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class Module(L.LightningModule):
    def __init__(self, optimizer="sgd", manual=False, penalty_in_loss=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2))
        self.kind, self.penalty_in_loss = optimizer, penalty_in_loss
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.penalty_in_loss:
            loss = loss + regext.fused_penalty(
                [p for n, p in self.named_parameters() if n not in regext.no_decay_names(self)],
                L1, L2)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        if self.kind == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def fit(module, callbacks, tmp_path, max_steps=6, ckpt_path=None, **kwargs):
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=callbacks,
                        default_root_dir=str(tmp_path), log_every_n_steps=1, **kwargs)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_grad_mode_with_sgd_equals_the_penalty_in_the_loss(tmp_path, manual):
    got = Module("sgd", manual=manual)
    callback = PenaltyCallback(l1=L1, l2=L2, mode="grad")
    fit(got, [callback], tmp_path)
    want = Module("sgd", manual=manual, penalty_in_loss=True)
    fit(want, [], tmp_path)
    for p, q in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert callback.penalty.step == 6
    plain = Module("sgd", manual=manual)
    fit(plain, [], tmp_path)
    assert any(not torch.allclose(p, q) for p, q in zip(got.parameters(), plain.parameters()))


@pytest.mark.parametrize("metric", ["auto", "euclidean"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_prox_mode_equals_prox_by_hand_and_logs(tmp_path, optimizer, metric):
    """By hand: Penalty.prox_ with the optimizer as metric (the default: AdamW's own
    metric, SGD's Euclidean one) or without (metric="euclidean")."""
    l1 = 0.5 if metric == "euclidean" or optimizer == "sgd" else 0.02
    got = Module(optimizer)
    callback = PenaltyCallback(l1=l1, mode="prox", metric=metric)
    trainer = fit(got, [callback], tmp_path)
    assert callback.penalty.step == 6
    assert {"penalty", "sparsity"} <= set(trainer.logged_metrics)
    assert float(trainer.logged_metrics["sparsity"]) > 0  # exact zeros from the prox step

    class ByHand(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.pen = regext.Penalty(pl_module, l1=l1, exclude="no_decay")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            self.pen.prox_(opt.param_groups[0]["lr"], metric=opt if metric == "auto" else None)

    want = Module(optimizer)
    fit(want, [ByHand()], tmp_path)
    for p, q in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_checkpoint_saves_and_restores_the_penalty_state(tmp_path):
    module = Module("adamw")
    callback = PenaltyCallback(l1=lambda s: 0.01 * s, l2=torch.tensor(0.02), mode="prox")
    trainer = fit(module, [callback], tmp_path, max_steps=4)
    callback.penalty.l2.fill_(0.05)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    fresh_l2 = torch.tensor(0.0)
    fresh = PenaltyCallback(l1=lambda s: 0.01 * s, l2=fresh_l2, mode="prox")
    fit(Module("adamw"), [fresh], tmp_path, max_steps=6, ckpt_path=str(path))
    assert fresh.penalty.step == 6 and fresh.penalty.l2 is fresh_l2
    assert float(fresh_l2) == pytest.approx(0.05)


def test_a_missing_framework_names_the_extra():
    import subprocess
    import sys
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "try:\n    import regext.integrations.lightning\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "pip install 'regext[lightning]'" in out
    code = code.replace("'lightning'] = None; sys.modules['lightning.pytorch']",
                        "'transformers']").replace("integrations.lightning",
                                                   "integrations.transformers")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "pip install 'regext[transformers]'" in out


def test_import_regext_imports_no_framework():
    import subprocess
    import sys
    code = ("import sys, regext; print(sorted(m for m in ('transformers', 'lightning', "
            "'accelerate', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
