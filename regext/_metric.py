"""An optimizer's diagonal metric, read from its state: what the proximal steps take
with ``metric=`` (and ``Penalty.attach(mode="prox")`` by default).

An optimizer of the Adam family moves coordinate i by about ``lr·m_i / denom_i``:
its step is a gradient step in the metric ``D = diag(denom) / lr``, and the proximal
step that completes it is the penalty's proximal map in that metric (the scaled
proximal mapping of Lee, Sun & Saunders, "Proximal Newton-type methods for
minimizing composite functions", SIAM J. Optim. 2014). For the L1 penalty that is
soft-thresholding of coordinate i at ``lr·l1 / denom_i``. ``denom`` is what the
optimizer divides its update by, read from its state after its step:

    Adam, AdamW   sqrt(v / (1 - beta2^t)) + eps, v = exp_avg_sq (max_exp_avg_sq with amsgrad)
    Adagrad       sqrt(sum) + eps, and the step size lr / (1 + (t - 1)·lr_decay)
    RMSprop       sqrt(square_avg) + eps; centered: sqrt(square_avg - grad_avg²) + eps
    SGD           1: the Euclidean step

(subclasses included; foreach, fused, capturable and amsgrad variants; every
hyperparameter per param group). Each tensor's coefficients (Adam's bias correction,
eps, Adagrad's decayed step) form one row of a float64 table built on the
parameters' device from the optimizer's step tensors, so a capturable or fused
optimizer's device-side steps are never read on the host.
"""

import torch

ADAM, ADAGRAD, RMSPROP, SGD = "Adam", "Adagrad", "RMSprop", "SGD"

# (class, family) in the order isinstance is tried.
_FAMILIES = ((torch.optim.Adam, ADAM), (torch.optim.AdamW, ADAM), (torch.optim.Adagrad, ADAGRAD),
             (torch.optim.RMSprop, RMSPROP), (torch.optim.SGD, SGD))

KNOWN = "Adam, AdamW, Adagrad, RMSprop and SGD (and their subclasses)"


def family_of(optimizer):
    """ADAM, ADAGRAD, RMSPROP or SGD for the optimizers whose metric regext knows,
    else None."""
    for cls, family in _FAMILIES:
        if isinstance(optimizer, cls):
            return family
    return None


def is_euclidean(optimizer):
    """True when the optimizer's metric is the Euclidean one (SGD)."""
    return family_of(optimizer) == SGD


class MetricTerms:
    """What regext::prox_metric_ needs for some parameters of one device, beside the
    step sizes: the tensors (only those the optimizer has state for), their second
    moments, their means (centered RMSprop) or None, and three float64 columns on
    their device: ``scale`` (multiplies sqrt(v - m²)), ``eps`` and ``step_factor``
    (the optimizer's step size over its lr: Adagrad's decay, else 1)."""

    def __init__(self, params, moments, means, scale, eps, step_factor):
        self.params, self.moments, self.means = params, moments, means
        self.scale, self.eps, self.step_factor = scale, eps, step_factor

    def coefs(self, l1_step, ridge_step):
        """The [n, 4] table (l1_step, ridge_step, scale, eps) of prox_metric_; both
        steps are 0-dim tensors (CPU or this device) and scale with step_factor."""
        dtype = torch.float64
        return torch.stack([l1_step.to(dtype) * self.step_factor,
                            ridge_step.to(dtype) * self.step_factor, self.scale, self.eps], dim=1)


class OptimizerMetric:
    """The metric of one optimizer (already unwrapped, of a known family): which
    param group and state each parameter has. The map from parameters to groups is
    rebuilt when the groups change (``add_param_group``)."""

    def __init__(self, func, optimizer, remedy='metric="euclidean"'):
        self.optimizer = optimizer
        self.family = family_of(optimizer)
        if self.family is None:
            raise ValueError(unknown_message(func, optimizer, "the step is asked for in the "
                                             "optimizer's metric", remedy))
        self._key = None
        self._group_of = {}

    def _groups(self):
        groups = self.optimizer.param_groups
        key = (len(groups), tuple(len(g["params"]) for g in groups),
               tuple(id(g["params"][0]) if g["params"] else 0 for g in groups))
        if key != self._key:
            self._group_of = {id(p): g for g in groups for p in g["params"]}
            self._key = key
        return self._group_of

    def check_holds(self, func, params, names=None):
        """ValueError naming the first of `params` the optimizer does not hold."""
        group_of = self._groups()
        for i, p in enumerate(params):
            if id(p) not in group_of:
                what = names[i] if names is not None else f"params[{i}]"
                raise ValueError(f"{func}: {what} is not a parameter of the "
                                 f"{type(self.optimizer).__name__} given as metric; its metric "
                                 f"is read from that optimizer's state")

    def terms(self, func, params, names=None):
        """[MetricTerms] for `params`, one per (device, centered or not); parameters
        the optimizer holds no state for (it has not stepped them yet: there is no
        metric) are left out. ValueError names a parameter the optimizer does not hold."""
        self.check_holds(func, params, names)
        group_of = self._groups()
        parts = {}
        for i, p in enumerate(params):
            group = group_of[id(p)]
            state = self.optimizer.state.get(p)
            found = _state_of(self.family, group, state) if state else None
            if found is None:
                continue  # not stepped yet: no metric, no step
            moment, mean, step = found
            # Every state tensor is checked here, before the first operator call of
            # the step writes anything (one call per device and kind of state).
            for what, s in (("second moment", moment), ("mean gradient", mean)):
                if s is not None:
                    _check_state_like(func, what, s, p, names[i] if names is not None
                                      else f"params[{i}]")
            key = (p.device, mean is not None)
            part = parts.setdefault(key, ([], [], [], [], []))
            for column, value in zip(part, (p, moment, mean, step, group)):
                column.append(value)
        return [self._terms(*part) for part in parts.values()]

    def _terms(self, params, moments, means, steps, groups):
        device = params[0].device
        # The hyperparameters are numbers on the host: one float64 table, copied to the
        # device once (from pinned memory: the copy never waits for the device).
        betas = [_beta2(g) for g in groups]
        on_device = any(isinstance(b, torch.Tensor) and b.device.type != "cpu" for b in betas)
        host = torch.tensor([[float(g["eps"]), float(g.get("lr_decay", 0.0)),
                              0.0 if on_device else float(b)] for g, b in zip(groups, betas)],
                            dtype=torch.float64)
        eps, decay, beta2 = _to_device(host, device).unbind(1)
        t = _steps(steps, device)
        # Step 0: the state exists but the optimizer has not stepped the tensor (a
        # fused optimizer's first step that AMP skipped): no metric yet, and no step
        # (its row's step sizes are 0). Decided on the device, never read here.
        stepped = t > 0
        scale = factor = torch.ones_like(eps)
        if self.family == ADAM:
            if on_device:  # betas given as device tensors: never read on the host
                beta2 = torch.stack([_to_device(torch.as_tensor(b, dtype=torch.float64), device)
                                     .reshape(()) for b in betas])
            # 1 / sqrt(1 - beta2^t): Adam's bias correction of v, per tensor.
            scale = torch.where(stepped, (1.0 - torch.pow(beta2, t)).rsqrt(), scale)
        elif self.family == ADAGRAD:
            # Adagrad's step size is lr / (1 + (t - 1)·lr_decay).
            factor = 1.0 / (1.0 + (t - 1.0) * decay)
        factor = torch.where(stepped, factor, torch.zeros_like(factor))
        means = None if means[0] is None else means
        return MetricTerms(params, moments, means, scale, eps, factor)


def _check_state_like(func, what, state, p, label):
    """The optimizer's `what` of parameter `label` must have its dtype, shape and
    device (the metric step reads them element by element)."""
    if state.dtype != p.dtype:
        raise TypeError(f"{func}: the optimizer's {what} of {label} has dtype {state.dtype} "
                        f"but the parameter has dtype {p.dtype}; the metric step reads the "
                        f"state in the parameter's dtype")
    if state.shape != p.shape or state.device != p.device:
        raise ValueError(f"{func}: the optimizer's {what} of {label} has shape "
                         f"{tuple(state.shape)} on {state.device} but the parameter has shape "
                         f"{tuple(p.shape)} on {p.device} (dtype {p.dtype}); the metric step "
                         f"needs them alike")


def _beta2(group):
    """Adam's beta2 (a number, or a tensor: torch allows both), 0 for other families."""
    return group["betas"][1] if "betas" in group else 0.0


def _to_device(t, device):
    """`t` moved to `device` without synchronizing (a CPU tensor is pinned first for
    CUDA, so that the copy is asynchronous)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _state_of(family, group, state):
    """(second moment, mean or None, step) of one parameter, or None when the
    optimizer has no state for it yet."""
    if family == ADAM:
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        if key not in state or "step" not in state:
            return None
        return state[key], None, state["step"]
    if family == ADAGRAD:
        if "sum" not in state or "step" not in state:
            return None
        return state["sum"], None, state["step"]
    if "square_avg" not in state:  # RMSprop
        return None
    mean = state.get("grad_avg") if group.get("centered", False) else None
    return state["square_avg"], mean, state.get("step", 1.0)


def _steps(steps, device):
    """The step counts as one float64 tensor on `device`: stacked where they lie (a
    fused or capturable optimizer keeps them on the device, others on the CPU), then
    moved without a synchronization (a host-to-device copy does not wait for the
    device). Older state dicts may hold plain numbers."""
    steps = [s if isinstance(s, torch.Tensor) else torch.tensor(float(s)) for s in steps]
    where = steps[0].device
    if any(s.device != where for s in steps):
        steps = [s.to(device) for s in steps]
        where = device
    t = torch.stack([s.reshape(()) for s in steps]).to(torch.float64)
    return t if where == device else _to_device(t, device)


def optimizer_name(optimizer):
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def unknown_message(func, optimizer, how, remedy='metric="euclidean"'):
    return (f"{func}: {how}, but regext does not know the metric of "
            f"{optimizer_name(optimizer)} (it knows {KNOWN}); pass {remedy} for the "
            f"Euclidean proximal step (the one SGD takes)")


def unwrap_optimizer(func, optimizer):
    """The torch.optim.Optimizer that really steps, behind the wrappers training
    frameworks hand out.

    accelerate's ``AcceleratedOptimizer`` (what the Hugging Face Trainer gives its
    callbacks), Lightning's ``LightningOptimizer`` and DeepSpeed's wrappers hold the
    real optimizer as ``.optimizer`` (or ``._optimizer``) and call its ``step()``; they
    pass for Optimizers (accelerate's subclasses it, Lightning's imitates its class)
    but never ran ``Optimizer.__init__``, so they have no step hooks of their own.
    Hooks registered on the inner optimizer run whenever the wrapper really steps
    (accelerate skips the step on accumulation micro-batches, and so do the hooks).
    """
    for _ in range(8):  # wrappers of wrappers; a cycle would be a bug elsewhere
        if "_optimizer_step_pre_hooks" in getattr(optimizer, "__dict__", ()):
            return optimizer  # a real Optimizer: it ran Optimizer.__init__
        if isinstance(optimizer, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(f"{func}: got the LR scheduler {type(optimizer).__name__}; pass the "
                            f"optimizer it schedules (scheduler.optimizer)")
        inner = next((v for v in (getattr(optimizer, "optimizer", None),
                                  getattr(optimizer, "_optimizer", None))
                      if isinstance(v, torch.optim.Optimizer) and v is not optimizer), None)
        if inner is None:
            break
        optimizer = inner
    raise TypeError(f"{func}: optimizer must be a torch.optim.Optimizer, or a wrapper that holds "
                    f"one as .optimizer (accelerate's AcceleratedOptimizer, Lightning's "
                    f"LightningOptimizer); got {type(optimizer).__name__}")
