"""Reference implementations: the loop regext replaces, and exact baselines.

`penalty_loop` is the seed document's per-parameter loop, written so that it
runs on any device; tests compare values and gradients against it, and the
benchmarks time it. `penalty_float64` is the ground truth for accuracy.
`penalty_foreach` is the best one can do with stock torch._foreach_norm.
"""

import torch


def _start(params):
    # torch.tensor(0.) in the seed: a float32 zero, promoted by float64 norms.
    device = params[0].device if params else torch.device("cpu")
    return torch.zeros((), device=device)


def penalty_loop(params, l1=0.0, l2=0.0, *, l2_squared=False):
    """l1 * sum ||p||_1 + l2 * sum ||p||_2, one torch.norm per parameter."""
    params = list(params)
    l1_reg = _start(params)
    for p in params:
        l1_reg = l1_reg + torch.norm(p, 1)
    l2_reg = _start(params)
    for p in params:
        l2_reg = l2_reg + (p.pow(2).sum() if l2_squared else torch.norm(p, 2))
    return l1 * l1_reg + l2 * l2_reg


def penalty_float64(params, l1=0.0, l2=0.0, *, l2_squared=False):
    """The same penalty computed in float64 throughout (differentiable)."""
    params = [p.double() for p in params]
    l1_reg = sum((p.abs().sum() for p in params), torch.zeros((), dtype=torch.float64))
    l2_terms = (p.pow(2).sum() if l2_squared else torch.linalg.vector_norm(p) for p in params)
    l2_reg = sum(l2_terms, torch.zeros((), dtype=torch.float64))
    return l1 * l1_reg + l2 * l2_reg


def penalty_foreach(params, l1=0.0, l2=0.0, *, l2_squared=False):
    """The same penalty from two torch._foreach_norm calls (all tensors one dtype)."""
    params = list(params)
    if not params:
        return torch.zeros(())
    l1_reg = torch.stack(torch._foreach_norm(params, 1)).sum()
    norms = torch.stack(torch._foreach_norm(params, 2))
    l2_reg = norms.pow(2).sum() if l2_squared else norms.sum()
    return l1 * l1_reg + l2 * l2_reg
