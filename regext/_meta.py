"""Fake (meta) kernels: output shapes and dtypes without computing anything.

They let torch.compile, torch.export and FakeTensor tracing go through the
regext operators, and make parameters on the meta device give meta results.
"""

import torch


def result_dtype(params):
    """The penalty's dtype: float64 if any parameter is float64, else float32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _device_of(params, **coefficients):
    """The parameters' device; coefficients must be on the CPU or on it (as the
    kernels check: a tensor on another device would otherwise route the call here)."""
    torch._check(len(params) > 0, lambda: "regext: params must not be empty")
    device = params[0].device
    for name, c in coefficients.items():
        torch._check(c.device.type == "cpu" or c.device == device,
                     lambda: f"regext: {name} is on {c.device} but the parameters are on "
                             f"{device}; put it on the CPU or on {device}")
    return device


@torch.library.register_fake("regext::penalty_forward")
def _penalty_forward_fake(params, l1, l2, l2_squared):
    device = _device_of(params, l1=l1, l2=l2)
    total = torch.empty((), dtype=result_dtype(params), device=device)
    stats = torch.empty((len(params), 2), dtype=torch.float64, device=device)
    return total, stats


@torch.library.register_fake("regext::penalty_backward")
def _penalty_backward_fake(grad_total, params, stats, l1, l2, l2_squared, stats_rows=None):
    _device_of(params, l1=l1, l2=l2)
    # The kernels allocate each gradient with empty_like(param), as here.
    return [torch.empty_like(p) for p in params]


@torch.library.register_fake("regext::penalty_grad_accumulate_")
def _penalty_grad_accumulate_fake(grads, params, stats, l1, l2, l2_squared, stats_rows=None):
    _device_of(params, l1=l1, l2=l2)


@torch.library.register_fake("regext::penalty_forward_accumulate_")
def _penalty_forward_accumulate_fake(grads, params, l1, l2, l2_squared):
    return _penalty_forward_fake(params, l1, l2, l2_squared)


@torch.library.register_fake("regext::prox_l1_")
def _prox_l1_fake(params, threshold):
    _device_of(params, threshold=threshold)


@torch.library.register_fake("regext::prox_group_l2_")
def _prox_group_l2_fake(params, threshold):
    _device_of(params, threshold=threshold)


@torch.library.register_fake("regext::prox_metric_")
def _prox_metric_fake(params, moments, means, coefs):
    device = _device_of(params)
    torch._check(len(moments) == len(params),
                 lambda: f"regext: moments has {len(moments)} tensors but params has {len(params)}")
    torch._check(len(means) in (0, len(params)),
                 lambda: f"regext: means has {len(means)} tensors but params has {len(params)}")
    torch._check(coefs.dtype == torch.float64 and tuple(coefs.shape) == (len(params), 4)
                 and coefs.device == device,
                 lambda: f"regext: coefs must be a float64 [{len(params)}, 4] tensor on {device}")
    for arg, state in (("moments", moments), ("means", means)):
        for t, s in enumerate(state):
            torch._check(s.device == device,
                         lambda: f"regext: {arg}[{t}] is on {s.device} but the parameters are "
                                 f"on {device}")


@torch.library.register_fake("regext::prox_group_metric_")
def _prox_group_metric_fake(params, moments, means, group_dims, coefs, sqrt_size):
    _prox_metric_fake(params, moments, means, coefs)


@torch.library.register_fake("regext::count_zeros")
def _count_zeros_fake(params):
    return torch.empty((len(params),), dtype=torch.int64, device=_device_of(params))


def _groups_of(params, group_dims):
    torch._check(len(group_dims) == len(params),
                 lambda: f"regext: group_dims has {len(group_dims)} entries but there are "
                         f"{len(params)} params")
    for t, d in enumerate(group_dims):
        torch._check(-1 <= d <= 1, lambda: f"regext: group_dims[{t}] = {d}; use -1 (the whole "
                                           f"tensor), 0 (rows) or 1 (columns)")
    return sum(1 if d < 0 or p.dim() < 2 else p.shape[d] for p, d in zip(params, group_dims))


@torch.library.register_fake("regext::group_penalty_forward")
def _group_penalty_forward_fake(params, group_dims, l1, l2, sqrt_size):
    device = _device_of(params, l1=l1, l2=l2)
    total = torch.empty((), dtype=result_dtype(params), device=device)
    stats = torch.empty((_groups_of(params, group_dims), 2), dtype=torch.float64, device=device)
    return total, stats


@torch.library.register_fake("regext::group_penalty_backward")
def _group_penalty_backward_fake(grad_total, params, group_dims, stats, l1, l2, sqrt_size,
                                 first_rows=None):
    _device_of(params, l1=l1, l2=l2)
    return [torch.empty_like(p) for p in params]


@torch.library.register_fake("regext::group_penalty_grad_accumulate_")
def _group_penalty_grad_accumulate_fake(grads, params, group_dims, stats, l1, l2, sqrt_size,
                                        first_rows=None):
    _device_of(params, l1=l1, l2=l2)


@torch.library.register_fake("regext::prox_group_lasso_")
def _prox_group_lasso_fake(params, group_dims, threshold, sqrt_size):
    _device_of(params, threshold=threshold)
