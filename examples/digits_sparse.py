"""The painter's few colours on real data: L1 by proximal steps keeps the pixels
that matter and drops the rest.

scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package: no
download) train the same MLP 64-64-10 three ways, with the same seed, batches
and learning-rate schedule:

  none   no penalty
  L2^2   squared L2 (weight decay): Penalty(l2=..., l2_squared=True).attach(opt, "grad")
  L1     L1 by proximal steps:       Penalty(l1=...).attach(opt, "prox")

and prints test accuracy, the share of weights that are exactly zero, and how many
of the 64 input pixels still carry any weight into the first layer. It saves
pixels.png (the first layer's weight mass per input pixel, as an 8x8 image, per
variant) and sweep.png (test accuracy against sparsity over a sweep of l1), and
table.md, in --out.

    pip install --no-build-isolation -e ".[examples]"
    python examples/digits_sparse.py [--out DIR] [--fast]

CPU, well under a minute (--fast: a few seconds, for tests).
"""

import argparse
import os
import time

import torch
from torch import nn

import regext

EPOCHS, BATCH, LR = 60, 64, 0.1


def load(seed=0):
    """(train, test) of standardized digits: 1,200 and 597 images, 64 pixels each."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[order], y[order]
    return (X[:1200], y[:1200]), (X[1200:], y[1200:])


def make_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(variant, coef, data, *, epochs, seed=0):
    """SGD with momentum and a cosine schedule; the penalty attached to the optimizer.
    Returns the trained model."""
    (X, y), _ = data
    model = make_mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    steps = epochs * ((len(y) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if variant == "L2^2":
        regext.Penalty(model, l2=coef, l2_squared=True, exclude="*bias").attach(opt, "grad")
    elif variant == "L1":
        regext.Penalty(model, l1=coef, exclude="*bias").attach(opt, "prox")
    fit(model, opt, sched, X, y, epochs=epochs, seed=seed)
    return model


def fit(model, opt, sched, X, y, *, epochs, seed=0, batch=BATCH):
    """Cross-entropy epochs over shuffled batches; the schedule steps every batch."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
            sched.step()


@torch.no_grad()
def evaluate(model, data):
    _, (X, y) = data
    accuracy = (model(X).argmax(1) == y).float().mean().item()
    weights = [model[0].weight, model[2].weight]
    pixel_mass = model[0].weight.abs().sum(0)  # per input pixel
    return {"accuracy": accuracy, "zeros": regext.sparsity(weights),
            "pixels": int((pixel_mass > 0).sum()), "pixel_mass": pixel_mass.reshape(8, 8)}


def run(out, fast):
    data = load()
    epochs = 8 if fast else EPOCHS
    variants = {"none": 0.0, "L2^2": 5e-4, "L1": 4e-3}
    results, seconds = {}, {}
    for name, coef in variants.items():
        start = time.perf_counter()
        results[name] = evaluate(train(name, coef, data, epochs=epochs), data)
        seconds[name] = time.perf_counter() - start
    sweep = []
    for l1 in ([1e-3, 1e-2] if fast else [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]):
        r = evaluate(train("L1", l1, data, epochs=epochs), data)
        sweep.append({"l1": l1, **r})
    lines = ["| variant | test accuracy | % exact-zero weights | input pixels with weight (of 64) "
             "| seconds |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['accuracy']:.1f}% | {100 * r['zeros']:.1f} | "
                     f"{r['pixels']} | {seconds[name]:.1f} |")
    lines += ["", "| l1 | test accuracy | % exact-zero weights | input pixels with weight |",
              "|---:|---:|---:|---:|"]
    lines += [f"| {s['l1']:g} | {100 * s['accuracy']:.1f}% | {100 * s['zeros']:.1f} | "
              f"{s['pixels']} |" for s in sweep]
    table = "\n".join(lines)
    print(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(out, results, sweep)
    return results, sweep


def plot(out, results, sweep):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no pictures")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4))
    for ax, (name, r) in zip(axes, results.items()):
        mass = r["pixel_mass"]
        ax.imshow(mass / mass.max().clamp_min(1e-12), cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"{name}: {r['pixels']} pixels, {100 * r['accuracy']:.1f}%", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("first-layer weight mass per input pixel (digits, 8x8)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pixels.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [100 * s["zeros"] for s in sweep]
    ax.plot(xs, [100 * s["accuracy"] for s in sweep], marker="o")
    for s, x in zip(sweep, xs):
        ax.annotate(f"l1={s['l1']:g}\n{s['pixels']} px", (x, 100 * s["accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("% exact-zero weights")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("L1 by proximal steps: accuracy against sparsity", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits_out")
    parser.add_argument("--fast", action="store_true", help="few epochs, two sweep points")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    run(args.out, args.fast)


if __name__ == "__main__":
    main()
