"""l1 means the same under AdamW as under SGD: proximal steps in the optimizer's metric.

Penalty.attach(opt, mode="prox") soft-thresholds after every step. Under SGD a
threshold of lr·l1 is the exact proximal gradient step; AdamW moves every weight by
about lr whatever its gradient, so the same threshold is negligible. In the
optimizer's own metric (metric="auto", the default) weight i is thresholded at
lr·l1/denom_i instead (denom: what AdamW divides its update by), and a weight ends
at zero iff its loss gradient is below l1, as under SGD. Two experiments, same l1 in
each row group:

1. scikit-learn's digits (MLP 64-64-10, AdamW lr=1e-3, cosine schedule): no penalty,
   L1 with the Euclidean step, L1 in the metric (both l1 = 1e-3), and the Euclidean
   step with an l1 1000 times larger: test accuracy, exact zeros, input pixels that
   keep any weight.
2. A lasso: a Linear model on 24 inputs of which 4 matter (y = 2x0 - 1.5x1 + x2 +
   0.5x3 + noise), full-batch MSE, l1 = 0.2: which inputs keep a nonzero weight under
   SGD (where the two metrics coincide), AdamW with the Euclidean step and AdamW in
   its metric.

    pip install --no-build-isolation -e ".[examples]"
    python examples/metric_prox.py [--out DIR] [--fast]

CPU: about a minute (--fast: a few seconds, for tests). Writes table.md in --out.
"""

import argparse
import os
import sys

import torch
from torch import nn

import regext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_sparse import BATCH, evaluate, fit, load, make_mlp  # noqa: E402  (same data, loop)

LR, EPOCHS, DIGITS_L1 = 1e-3, 30, 1e-3
LASSO_L1, LASSO_STEPS, INPUTS, RELEVANT = 0.2, 600, 24, (2.0, -1.5, 1.0, 0.5)


def train_digits(metric, l1, data, *, epochs, seed=0):
    """AdamW (no weight decay) with the L1 penalty attached; metric None: no penalty."""
    (X, y), _ = data
    model = make_mlp(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=epochs * ((len(y) + BATCH - 1) // BATCH))
    if metric is not None:
        regext.Penalty(model, l1=l1, exclude="*bias").attach(opt, "prox", metric=metric)
    fit(model, opt, sched, X, y, epochs=epochs, seed=seed)
    return model


def lasso_data(seed=0, n=512):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, INPUTS, generator=gen)
    w = torch.zeros(INPUTS)
    w[:len(RELEVANT)] = torch.tensor(RELEVANT)
    return X, X @ w + 0.1 * torch.randn(n, generator=gen)


def train_lasso(optimizer, metric, X, y, *, steps):
    """Full-batch MSE with l1 = LASSO_L1 by proximal steps; returns the weights."""
    torch.manual_seed(0)
    model = nn.Linear(INPUTS, 1)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05) if optimizer == "SGD" else
           torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0))
    regext.Penalty(model, l1=LASSO_L1, exclude="*bias").attach(opt, "prox", metric=metric)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(X).squeeze(1), y).backward()
        opt.step()
    return model.weight.detach()[0].clone()


def run(out, fast):
    data = load()
    epochs = 3 if fast else EPOCHS
    digits = {}
    for name, metric, l1 in (("AdamW, no penalty", None, 0.0),
                             ("AdamW, L1, Euclidean step", "euclidean", DIGITS_L1),
                             ("AdamW, L1, metric step", "auto", DIGITS_L1),
                             ("AdamW, L1 x 1000, Euclidean step", "euclidean", 1000 * DIGITS_L1)):
        r = evaluate(train_digits(metric, l1, data, epochs=epochs), data)
        digits[name] = {**r, "l1": l1}
    X, y = lasso_data()
    lasso = {}
    for name, optimizer, metric in (("SGD", "SGD", "auto"),
                                    ("AdamW, Euclidean step", "AdamW", "euclidean"),
                                    ("AdamW, metric step", "AdamW", "auto")):
        w = train_lasso(optimizer, metric, X, y, steps=LASSO_STEPS)  # about a second
        lasso[name] = {"kept": (w != 0).nonzero().flatten().tolist(), "weights": w}

    lines = [f"Digits, AdamW lr={LR}, {epochs} epochs:", "",
             "| variant | l1 | test accuracy | % exact-zero weights | input pixels kept (of 64) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['l1']:g} | {100 * r['accuracy']:.1f}% | {100 * r['zeros']:.1f} | "
              f"{r['pixels']} |" for name, r in digits.items()]
    lines += ["", f"Lasso, {INPUTS} inputs, the first {len(RELEVANT)} matter "
              f"(weights {list(RELEVANT)}), l1={LASSO_L1}:", "",
              "| optimizer | inputs with a nonzero weight | weights of inputs 0-3 |",
              "|---|---|---|"]
    lines += [f"| {name} | {len(r['kept'])}: {r['kept']} | "
              f"{', '.join(f'{v:.3f}' for v in r['weights'][:len(RELEVANT)].tolist())} |"
              for name, r in lasso.items()]
    table = "\n".join(lines)
    print(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    return digits, lasso


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="metric_prox_out")
    parser.add_argument("--fast", action="store_true", help="few epochs and steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    run(args.out, args.fast)


if __name__ == "__main__":
    main()
