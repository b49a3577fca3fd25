"""regext in PyTorch Lightning: the penalty gradient added inside Lightning's
closure-driven optimizer steps (grad mode), with logging through pl_module.log.

    python examples/lightning_callback.py [--steps N]

A small regression model on synthetic data where 4 of 24 inputs matter; an L1
penalty in grad mode with AdamW, then the weights of the first layer per input.
Needs `pip install 'regext[lightning]'`.
"""

import argparse

import lightning.pytorch as L
import torch
from torch import nn

from regext.integrations.lightning import PenaltyCallback


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(24, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data(n=512, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 24, generator=gen)
    y = x[:, :4] @ torch.tensor([2.0, -1.5, 1.0, 0.5]) + 0.05 * torch.randn(n, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def run(steps=120):
    module = Regressor()
    callback = PenaltyCallback(l1=1e-3, mode="grad")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback], log_every_n_steps=20)
    trainer.fit(module, data())
    metrics = {k: float(v) for k, v in trainer.logged_metrics.items()}
    print(f"after {callback.penalty.step} optimizer steps: " +
          ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    strength = module.net[0].weight.detach().abs().sum(0)
    print("first-layer weight mass per input (inputs 0-3 matter):")
    print(" ".join(f"{v:.2f}" for v in strength.tolist()))
    return metrics, strength


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    run(parser.parse_args().steps)


if __name__ == "__main__":
    main()
