"""The gradient of the penalty for autograd, shared by both autograd Functions
(regext.penalty for plain tensors, regext.distributed for DTensor shards)."""

import torch


def backward_grads(grad_total, params, stats, rows, l1, l2, l2_squared):
    """``grad_total * d(penalty)/d(params[i])`` for every tensor of `params`, whose
    sums are row ``rows[i]`` of `stats` (None: row i).

    With grad mode off (a plain backward): one penalty_backward call, from the
    forward's float64 sums. With grad mode on (``create_graph=True``): built from
    differentiable torch ops, so that second derivatives are exact.
    """
    if torch.is_grad_enabled():
        return [differentiable_grad(grad_total, p, l1, l2, l2_squared) for p in params]
    if not params:
        return []
    return list(torch.ops.regext.penalty_backward(grad_total, params, stats, l1, l2, l2_squared,
                                                  rows))


def differentiable_grad(grad_total, p, l1, l2, l2_squared):
    """d(penalty)/dp * grad_total as a differentiable expression (double backward)."""
    x = p.to(torch.float64 if p.dtype == torch.float64 else torch.float32)
    if l2_squared:
        linear = 2.0 * x
    else:
        norm = torch.linalg.vector_norm(x)
        # x / ||x||, and 0 for an all-zero tensor; the guarded denominator keeps
        # the second derivative free of 0/0 there. A NaN norm stays NaN.
        linear = x / torch.where(norm == 0, torch.ones_like(norm), norm)
    return (grad_total.to(x.dtype) * (l1 * torch.sign(x) + l2 * linear)).to(p.dtype)
