"""Structured sparsity on real data: the group lasso over neurons switches whole
hidden units off, and the network they leave is physically smaller and faster.

scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package: no
download) train an MLP 64-256-256-10 with SGD, with and without a row-group lasso on
its two hidden layers (each row of a Linear weight is one neuron's incoming weights):

    pen = regext.Penalty(model, l2=..., group="row", group_weight="sqrt_size",
                         exclude=lambda name, p: p.ndim < 2 or name.startswith("4."))
    pen.attach(opt, mode="prox")    # group soft-thresholding after every step

A neuron whose incoming row is exactly zero outputs the constant relu(bias), so it
can be removed: its constant contribution is folded into the next layer's bias
(`prune`). The script prints, per l2 (the first row: no penalty), the test accuracy
of the trained network and of the pruned one (the same up to float32 rounding), the
neurons left per hidden layer, the parameter count, and CPU inference time of both
(torch.utils.benchmark, batch of 4096). It saves table.md and neurons.png (which
neurons survive, and the 8x8 input patterns of the first layer's survivors) in --out.

    pip install --no-build-isolation -e ".[examples]"
    python examples/digits_pruning.py [--out DIR] [--fast]

CPU, about a minute (--fast: a few seconds, for tests).
"""

import argparse
import os
import sys

import torch
from torch import nn
from torch.utils import benchmark

import regext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_sparse import fit, load  # noqa: E402  (the same data, split and loop)

EPOCHS, BATCH, LR, HIDDEN = 40, 64, 0.1, 256


def make_mlp(seed, hidden=HIDDEN):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def train(l2, data, *, epochs, seed=0):
    """SGD with momentum and a cosine schedule; with l2 > 0, the row-group lasso on the
    two hidden layers' weights by proximal steps."""
    (X, y), _ = data
    model = make_mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    steps = epochs * ((len(y) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if l2 > 0:
        pen = regext.Penalty(model, l2=l2, group="row", group_weight="sqrt_size",
                             exclude=lambda name, p: p.ndim < 2 or name.startswith("4."))
        pen.attach(opt, mode="prox")
    fit(model, opt, sched, X, y, epochs=epochs, seed=seed)
    return model


@torch.no_grad()
def prune(model):
    """The same function with every hidden neuron whose incoming weight row is all zero
    removed: such a neuron outputs relu(bias) whatever the input, which is added to
    the next layer's bias instead. The rows come from regext.sparsity_report."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    report = {t.name: t for t in regext.sparsity_report(model).per_tensor}
    new, keep_in = [], torch.arange(layers[0].in_features)
    for i, layer in enumerate(layers):
        index = 2 * i  # the Linear's position in the Sequential (ReLUs between)
        dead = set(report[f"{index}.weight"].zero_rows) if i + 1 < len(layers) else set()
        keep_out = torch.tensor([j for j in range(layer.out_features) if j not in dead],
                                dtype=torch.long)
        weight = layer.weight[keep_out][:, keep_in]
        bias = layer.bias[keep_out].clone()
        if i > 0:  # the removed inputs' constant outputs, folded into this bias
            removed = torch.tensor(sorted(set(range(layer.in_features)) - set(keep_in.tolist())),
                                   dtype=torch.long)
            if len(removed):
                constant = torch.relu(layers[i - 1].bias[removed])
                bias += (layer.weight[:, removed] @ constant)[keep_out]
        small = nn.Linear(len(keep_in), len(keep_out))
        small.weight.copy_(weight)
        small.bias.copy_(bias)
        new.append(small)
        keep_in = keep_out
    return nn.Sequential(*[m for layer in new[:-1] for m in (layer, nn.ReLU())], new[-1])


@torch.no_grad()
def accuracy(model, data):
    _, (X, y) = data
    return (model(X).argmax(1) == y).float().mean().item()


def inference_ms(models, rounds=3, seed=0):
    """Median ms per forward pass of a 4096-image batch for each model, timed in
    alternation (rounds x torch.utils.benchmark blocked_autorange), best round kept:
    on a shared machine the other load then hits both alike."""
    x = torch.rand(4096, 64, generator=torch.Generator().manual_seed(seed))
    best = [float("inf")] * len(models)
    with torch.no_grad():
        for _ in range(rounds):
            for i, model in enumerate(models):
                timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x},
                                        num_threads=torch.get_num_threads())
                best[i] = min(best[i], timer.blocked_autorange(min_run_time=0.2).median * 1e3)
    return best


def count(model):
    return sum(p.numel() for p in model.parameters())


def run(out, fast):
    data = load()
    epochs = 6 if fast else EPOCHS
    rows, pictures = [], {}
    for l2 in ([0.0, 1e-2] if fast else [0.0, 1e-3, 2e-3, 5e-3, 1e-2]):
        model = train(l2, data, epochs=epochs)
        small = prune(model)
        hidden = [m.out_features for m in small if isinstance(m, nn.Linear)][:-1]
        big_ms, small_ms = inference_ms([model, small], rounds=1 if fast else 3)
        rows.append({"l2": l2, "accuracy": accuracy(model, data),
                     "pruned_accuracy": accuracy(small, data), "hidden": hidden,
                     "params": count(model), "pruned_params": count(small),
                     "ms": big_ms, "pruned_ms": small_ms})
        pictures[l2] = model
    lines = ["| l2 (row groups) | test accuracy | after removal | neurons left (of 256, 256) "
             "| parameters | CPU inference, batch 4096 |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['l2']:g} | {100 * r['accuracy']:.1f}% | {100 * r['pruned_accuracy']:.1f}% | "
            f"{r['hidden'][0]}, {r['hidden'][1]} | {r['params']:,} -> {r['pruned_params']:,} | "
            f"{r['ms']:.2f} ms -> {r['pruned_ms']:.2f} ms |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(out, pictures)
    return rows


def plot(out, models):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no picture")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    l2 = sorted(models)[len(models) // 2 + 1] if len(models) > 2 else max(models)
    model = models[l2]
    side = int(HIDDEN ** 0.5)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, index, title in ((axes[0], 0, "hidden layer 1"), (axes[1], 2, "hidden layer 2")):
        norms = model[index].weight.detach().norm(dim=1)
        alive = int((norms > 0).sum())
        ax.imshow((norms / norms.max()).reshape(side, side), cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"{title}: {alive} of {HIDDEN} neurons left\n(black: removed)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    w = model[0].weight.detach()
    alive = (w.norm(dim=1) > 0).nonzero().flatten()[:64]
    grid = torch.zeros(8 * 9, 8 * 9)
    for k, j in enumerate(alive.tolist()):
        r, c = divmod(k, 8)
        patch = w[j].reshape(8, 8)
        grid[9 * r:9 * r + 8, 9 * c:9 * c + 8] = patch / patch.abs().max()
    axes[2].imshow(grid, cmap="RdBu", vmin=-1, vmax=1)
    axes[2].set_title("input weights of surviving layer-1 neurons", fontsize=9)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    fig.suptitle(f"row-group lasso, l2={l2:g}, group_weight='sqrt_size' (digits, MLP 64-256-256-10)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "neurons.png"), dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "digits_pruning"))
    parser.add_argument("--fast", action="store_true", help="a few epochs (for tests)")
    args = parser.parse_args()
    run(args.out, args.fast)


if __name__ == "__main__":
    main()
