"""L1 vs L2 in practice: what each penalty does to the weights, measured.

Trains the same models with five regularizers and compares them:

  none        no penalty
  L2          l2 * sum ||W||_2        (the per-tensor Euclidean norm of the original loop)
  L2^2        l2 * sum ||W||_2^2      (ridge / weight decay)
  L1 (subgr.) l1 * sum ||W||_1        by subgradient steps (its gradient added to p.grad)
  L1 (prox)   the same L1 penalty by proximal steps: SGD on the data loss, then
              regext.prox_l1_ (soft-thresholding by lr * l1)

on (a) a linear regression with 100 features of which 10 are informative, and
(b) a small MLP whose target depends on 5 of its 50 inputs. Weights are
penalized, biases are not (regext.Penalty(model, exclude="*bias")). Prints a
table (held-out loss, % exact zeros, mean |w|, time per step) and saves
coefficients.png, histograms.png and table.md in --out.

    python examples/l1_vs_l2.py [--out DIR] [--fast]

Runs on CPU in well under a minute (--fast: a few seconds, for tests).
"""

import argparse
import os
import time

import torch
from torch import nn

import regext

VARIANTS = ["none", "L2", "L2^2", "L1 (subgr.)", "L1 (prox)"]


def make_linear_data(gen, n_train=200, n_test=2000, dim=100, informative=10, noise=0.5):
    w = torch.zeros(dim)
    signs = torch.where(torch.rand(informative, generator=gen) < 0.5, -1.0, 1.0)
    w[:informative] = signs * (1.0 + 2.0 * torch.rand(informative, generator=gen))
    X = torch.randn(n_train + n_test, dim, generator=gen)
    y = X @ w + noise * torch.randn(n_train + n_test, generator=gen)
    return (X[:n_train], y[:n_train, None]), (X[n_train:], y[n_train:, None]), w


def make_mlp_data(gen, n_train=2000, n_test=4000, dim=50):
    X = torch.randn(n_train + n_test, dim, generator=gen)
    y = (torch.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2] + torch.relu(X[:, 3]) - 0.5 * X[:, 4] ** 2
         + 0.1 * torch.randn(n_train + n_test, generator=gen))
    return (X[:n_train], y[:n_train, None]), (X[n_train:], y[n_train:, None])


def train(model, variant, data, test, *, steps, lr, batch, coef, seed):
    """SGD on MSE with one regularizer; returns (held-out MSE, seconds per step)."""
    l1, l2, l2_sq = coef["l1"], coef["l2"], coef["l2^2"]
    pen = {
        "none": None,
        "L2": regext.Penalty(model, l2=l2, exclude="*bias"),
        "L2^2": regext.Penalty(model, l2=l2_sq, l2_squared=True, exclude="*bias"),
        "L1 (subgr.)": regext.Penalty(model, l1=l1, exclude="*bias"),
        "L1 (prox)": regext.Penalty(model, l1=l1, exclude="*bias"),
    }[variant]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    X, y = data
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (batch,), generator=gen) if batch else None
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        opt.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(xb), yb).backward()
        if pen is not None and variant != "L1 (prox)":
            pen.add_grad_()  # the penalty's gradient, straight into p.grad
        opt.step()
        if variant == "L1 (prox)":
            pen.prox_(lr)  # soft-threshold the weights by lr * l1: exact zeros
    seconds = (time.perf_counter() - start) / steps
    with torch.no_grad():
        held_out = nn.functional.mse_loss(model(test[0]), test[1]).item()
    return held_out, seconds


def weights(model):
    return [p for n, p in model.named_parameters() if not n.endswith("bias")]


def summarize(model, held_out, seconds):
    ws = weights(model)
    flat = torch.cat([w.detach().flatten() for w in ws])
    return {"held_out": held_out, "zeros": regext.sparsity(ws),
            "mean_abs": flat.abs().mean().item(), "ms_per_step": 1e3 * seconds}


def run_linear(fast):
    gen = torch.Generator().manual_seed(0)
    data, test, w_true = make_linear_data(gen)
    coef = {"l1": 0.1, "l2": 0.1, "l2^2": 0.01}
    rows, coefs = {}, {}
    for variant in VARIANTS:
        torch.manual_seed(1)
        model = nn.Linear(data[0].shape[1], 1)
        held_out, sec = train(model, variant, data, test, steps=150 if fast else 1500,
                              lr=0.05, batch=None, coef=coef, seed=2)
        rows[variant] = summarize(model, held_out, sec)
        w = model.weight.detach().flatten()
        rows[variant]["noise_zero"] = int((w[10:] == 0).sum())
        rows[variant]["signal_kept"] = int((w[:10] != 0).sum())
        coefs[variant] = w
    return rows, coefs, w_true, coef


def run_mlp(fast):
    gen = torch.Generator().manual_seed(10)
    data, test = make_mlp_data(gen)
    coef = {"l1": 1e-2, "l2": 0.05, "l2^2": 5e-3}
    rows, input_mass, all_weights = {}, {}, {}
    for variant in VARIANTS:
        torch.manual_seed(11)
        model = nn.Sequential(nn.Linear(50, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 1))
        held_out, sec = train(model, variant, data, test, steps=300 if fast else 3000,
                              lr=0.05, batch=128, coef=coef, seed=12)
        rows[variant] = summarize(model, held_out, sec)
        w1 = model[0].weight.detach()  # [64, 50]: column j reads input j
        column_mass = w1.abs().sum(0)
        rows[variant]["signal_share"] = (column_mass[:5].sum() / column_mass.sum()).item()
        input_mass[variant] = column_mass
        all_weights[variant] = torch.cat([w.detach().flatten() for w in weights(model)])
    return rows, input_mass, all_weights, coef


def table(title, rows, extra):
    head = (f"| {'variant':<12} | held-out MSE | % exact zeros | mean abs(w) | ms / step |"
            + "".join(f" {name} |" for name, _ in extra))
    sep = "|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|"
    lines = [f"**{title}**", "", head, sep]
    for variant, r in rows.items():
        line = (f"| {variant:<12} | {r['held_out']:>12.4f} | {100 * r['zeros']:>13.1f} | "
                f"{r['mean_abs']:>11.4f} | {r['ms_per_step']:>9.3f} |")
        line += "".join(f" {fmt(r)} |" for _, fmt in extra)
        lines.append(line)
    return "\n".join(lines)


def plot(out, lin_coefs, w_true, mlp_weights, mlp_inputs, lin_rows, mlp_rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"none": "tab:gray", "L2": "tab:blue", "L2^2": "tab:cyan",
              "L1 (subgr.)": "tab:orange", "L1 (prox)": "tab:red"}
    dim = w_true.numel()
    fig, axes = plt.subplots(len(VARIANTS), 1, figsize=(10, 11), sharex=True, sharey=True)
    for ax, variant in zip(axes, VARIANTS):
        w = lin_coefs[variant].abs().numpy()
        zero = w == 0
        x = torch.arange(dim).numpy()
        ax.bar(x[~zero], w[~zero], color=colors[variant], width=0.8)
        ax.scatter(x[zero], 0 * x[zero], marker="x", s=12, color="black", label="exactly 0",
                   zorder=3)
        ax.scatter(x[:10], w_true[:10].abs().numpy(), marker="_", s=80, color="green",
                   label="true |w|", zorder=3)
        ax.set_yscale("symlog", linthresh=1e-3)
        r = lin_rows[variant]
        ax.set_title(f"{variant}: {int(round(r['zeros'] * dim))}/{dim} coefficients exactly "
                     f"zero, held-out MSE {r['held_out']:.3f}", fontsize=10, loc="left")
        ax.axvspan(-0.5, 9.5, color="green", alpha=0.06)
        ax.set_ylabel("|w_j|")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("feature j (the first 10, shaded, are the informative ones)")
    fig.suptitle("Linear regression, 100 features, 10 informative: |coefficient| per feature "
                 "(symlog scale)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "coefficients.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(VARIANTS), figsize=(17, 6.6), sharey="row")
    for ax, variant in zip(axes[0], VARIANTS):
        w = mlp_weights[variant]
        nonzero = w[w != 0]
        ax.hist(nonzero.numpy(), bins=80, range=(-0.4, 0.4), color=colors[variant], log=True)
        zeros = int((w == 0).sum())
        if zeros:
            ax.bar([0.0], [zeros], width=0.012, color="black", log=True)
        ax.set_title(f"{variant}\n{100 * mlp_rows[variant]['zeros']:.1f}% exactly zero "
                     f"(black bar)", fontsize=10)
        ax.set_xlabel("weight value")
    axes[0][0].set_ylabel("count (log)")
    for ax, variant in zip(axes[1], VARIANTS):
        mass = mlp_inputs[variant]
        share = mass / mass.sum()
        bar_colors = ["green"] * 5 + [colors[variant]] * (mass.numel() - 5)
        ax.bar(torch.arange(mass.numel()).numpy(), share.numpy(), color=bar_colors, width=0.8)
        ax.set_title(f"{100 * mlp_rows[variant]['signal_share']:.0f}% on the 5 used inputs "
                     f"(green)", fontsize=10)
        ax.set_xlabel("input j")
    axes[1][0].set_ylabel("share of layer-1 sum abs(w)")
    fig.suptitle("MLP 50-64-64-1 (target uses inputs 0-4). Top: histogram of all weights "
                 "(biases excluded). Bottom: how layer 1 spreads its weight over the inputs")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "histograms.png"), dpi=110)
    plt.close(fig)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "results", "l1_vs_l2"))
    parser.add_argument("--fast", action="store_true", help="few steps (for tests)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add noise to the timings
    start = time.perf_counter()
    try:
        lin_rows, lin_coefs, w_true, lin_coef = run_linear(args.fast)
        mlp_rows, mlp_inputs, mlp_weights, mlp_coef = run_mlp(args.fast)
    finally:
        torch.set_num_threads(threads)

    text = "\n\n".join([
        table(f"Linear regression (100 features, 10 informative; l1={lin_coef['l1']}, "
              f"l2={lin_coef['l2']}, l2^2={lin_coef['l2^2']}; full-batch SGD)", lin_rows,
              [("noise coefs = 0 (of 90)", lambda r: f"{r['noise_zero']:>23}"),
               ("informative kept (of 10)", lambda r: f"{r['signal_kept']:>24}")]),
        table(f"MLP 50-64-64-1 (target uses 5 of 50 inputs; l1={mlp_coef['l1']}, "
              f"l2={mlp_coef['l2']}, l2^2={mlp_coef['l2^2']}; SGD, batch 128)", mlp_rows,
              [("% of layer-1 abs(w) on the 5 used inputs",
                lambda r: f"{100 * r['signal_share']:>39.1f}")]),
    ])
    text += (f"\n\nTimes: {_cpu_name()}, 1 thread, torch {torch.__version__}; the whole run "
             f"took {time.perf_counter() - start:.1f} s{' (--fast)' if args.fast else ''}.")
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    if not args.no_plots:
        plot(args.out, lin_coefs, w_true, mlp_weights, mlp_inputs, lin_rows, mlp_rows)
    print(f"\nwrote {args.out}/ (table.md"
          f"{'' if args.no_plots else ', coefficients.png, histograms.png'})")
    return lin_rows, mlp_rows


if __name__ == "__main__":
    main()
