"""Quick start: regext.fused_penalty against the seed's per-parameter loop.

Builds a small MLP, computes the L1 + L2 penalty both ways, checks that values
and gradients agree, and times forward+backward of each (median of repeats).
    python examples/quickstart.py
"""

import platform
import statistics
import time

import torch
from torch import nn

import regext
from regext.reference import penalty_loop


def median_ms(fn, params, repeats=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        for p in params:
            p.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(24)])
    params = list(model.parameters())
    l1, l2 = 1e-5, 1e-4

    fused = regext.fused_penalty(model.parameters(), l1, l2)
    loop = penalty_loop(params, l1, l2)
    g_fused = torch.autograd.grad(fused, params)
    g_loop = torch.autograd.grad(loop, params)
    max_grad_diff = max((a - b).abs().max().item() for a, b in zip(g_fused, g_loop))
    print(f"penalty (regext) = {fused.item():.8f}")
    print(f"penalty (loop)   = {loop.item():.8f}   |diff| = {abs(fused - loop).item():.2e}")
    print(f"max |grad diff|  = {max_grad_diff:.2e} over {len(params)} tensors")

    t_fused = median_ms(lambda: regext.fused_penalty(params, l1, l2).backward(), params)
    t_loop = median_ms(lambda: penalty_loop(params, l1, l2).backward(), params)
    print(f"forward+backward: loop {t_loop:.2f} ms, regext {t_fused:.2f} ms "
          f"(medians of 30) -> regext is {speed_verdict(t_loop, t_fused)} than the loop")
    print(f"on {cpu_name()}, {torch.get_num_threads()} threads, "
          f"CPU kernels {regext.cpu_capability()}, torch {torch.__version__}")


def cpu_name():
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def speed_verdict(t_loop, t_fused):
    """'N.NNx faster' or 'N.NNx slower', as measured (never 'faster' for a slowdown)."""
    if t_fused <= t_loop:
        return f"{t_loop / t_fused:.2f}x faster"
    return f"{t_fused / t_loop:.2f}x slower"


if __name__ == "__main__":
    main()
