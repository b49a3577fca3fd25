"""A Penalty attached to a torch.optim optimizer: its gradient before every step, or
its proximal step after every step with each parameter's own learning rate
(Penalty.attach documents the behaviour; this is the machinery)."""

import warnings

import torch

from regext._metric import (OptimizerMetric, family_of, is_euclidean, optimizer_name,
                            unwrap_optimizer)
from regext._dtensor import has_dtensor
from regext._validation import coefficient
from regext.prox import check_no_dtensor_groups

MODES = ("grad", "prox")
METRICS = ("auto", "optimizer", "euclidean")


class PenaltyAttachment:
    """The hooks of one Penalty on one optimizer; ``remove()`` takes them off.

    Built by :meth:`regext.Penalty.attach`. ``mode``, ``warmup_steps``, ``penalty``,
    ``optimizer`` (the real optimizer, unwrapped), ``metric`` (as asked) and
    ``in_metric`` (whether the proximal step is taken in the optimizer's own metric)
    are readable attributes.
    """

    def __init__(self, penalty, optimizer, mode, warmup_steps=0, metric="auto"):
        func = "Penalty.attach"
        if mode not in MODES:
            raise ValueError(f"{func}: mode must be 'grad' or 'prox', got {mode!r}")
        if metric not in METRICS:
            raise ValueError(f"{func}: metric must be 'auto', 'optimizer' or 'euclidean', "
                             f"got {metric!r}")
        if mode == "grad" and metric != "auto":
            raise ValueError(f"{func}: metric={metric!r} applies to mode='prox' only (grad "
                             f"mode adds the penalty's gradient, which has no metric)")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{func}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        optimizer = unwrap_optimizer(func, optimizer)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # Frozen parameters are left out of every call, so an optimizer built from the
        # trainable ones only (as the Hugging Face Trainer builds it) is enough.
        missing = [name for name, p in penalty.named_parameters()
                   if id(p) not in held and p.requires_grad]
        if missing:
            raise ValueError(f"{func}: {missing[0]} is selected by the Penalty but the "
                             f"optimizer does not hold it ({len(missing)} such parameters); "
                             f"exclude it from the Penalty or add it to the optimizer")
        self.penalty, self.optimizer = penalty, optimizer
        self.mode, self.warmup_steps, self.metric = mode, warmup_steps, metric
        self._metric = self._resolve_metric(func) if mode == "prox" else None
        if mode == "grad":
            self._handles = [optimizer.register_step_pre_hook(self._add_grad),
                             optimizer.register_step_post_hook(self._advance)]
        else:
            self._handles = [optimizer.register_step_post_hook(self._prox)]

    def _resolve_metric(self, func):
        """The OptimizerMetric of the proximal steps, or None for the Euclidean step."""
        if self.metric == "euclidean" or is_euclidean(self.optimizer):
            return None
        if family_of(self.optimizer) is None:
            if self.metric == "optimizer":
                OptimizerMetric(func, self.optimizer)  # raises the ValueError
            warnings.warn(f"{func}: regext does not know the metric of "
                          f"{optimizer_name(self.optimizer)}; its proximal steps are the "
                          f"Euclidean ones (threshold lr·l1 for every weight), which an "
                          f"optimizer that normalizes its steps barely feels. Pass "
                          f"metric=\"euclidean\" to say that is intended", stacklevel=4)
            return None
        for group in self.penalty.groups:
            l2 = group.l2
            if (not group.l2_squared and isinstance(l2, (int, float)) and l2 > 0
                    and has_dtensor(group.params)):
                check_no_dtensor_groups(func, group.params)  # raises, naming the way out
        return OptimizerMetric(func, self.optimizer)

    @property
    def in_metric(self):
        """Whether the proximal steps are taken in the optimizer's own metric."""
        return self._metric is not None

    @property
    def active(self):
        """Whether the hooks are on (False after ``remove()``)."""
        return bool(self._handles)

    def _applies(self):
        return self.penalty.step >= self.warmup_steps

    def _add_penalty_grad(self, optimizer):
        # A fused optimizer under GradScaler sees still-scaled gradients here.
        return self.penalty.add_grad_(scale=getattr(optimizer, "grad_scale", None))

    def _add_grad(self, optimizer, args, kwargs):
        if not self._applies():
            return None
        # args are step()'s positional arguments, the optimizer itself first.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._add_penalty_grad(optimizer)
            return None
        # step(closure) (LBFGS; Lightning's automatic optimization for every optimizer):
        # the closure zeroes the gradients and runs backward inside step(), after this
        # hook, so a gradient added now would be erased. Add it after every evaluation
        # of the closure instead, and return the penalized loss: LBFGS's line search
        # compares the losses the closure returns.
        def penalized_closure():
            loss = closure()
            value = self._add_penalty_grad(optimizer)
            if isinstance(loss, torch.Tensor):
                return loss + value.to(loss.device, loss.dtype)
            return loss if loss is None else loss + float(value)

        if "closure" in kwargs:
            return args, {**kwargs, "closure": penalized_closure}
        return (args[0], penalized_closure, *args[2:]), kwargs

    def _advance(self, optimizer, args, kwargs):
        self.penalty.step += 1

    def _prox(self, optimizer, args, kwargs):
        if self._applies():
            # A fused optimizer under GradScaler runs step() even when it skips the
            # update for inf/NaN gradients: then every learning rate becomes 0 here,
            # on the device (reading found_inf on the host would synchronize).
            found_inf = getattr(optimizer, "found_inf", None)
            for group in optimizer.param_groups:
                lr = coefficient("Penalty.attach", "lr", group["lr"])
                if found_inf is not None:
                    lr = lr * (found_inf == 0)
                self.penalty.prox_(lr, only={id(p) for p in group["params"]},
                                   metric=self._metric)
        self.penalty.step += 1

    def remove(self):
        """Detaches the penalty: later steps are exactly as without it. The Penalty
        can then be attached again (to this or another optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self):
        metric = "" if self.mode == "grad" else (
            f", metric={'optimizer' if self.in_metric else 'euclidean'}")
        return (f"PenaltyAttachment(mode={self.mode!r}{metric}, warmup_steps={self.warmup_steps}, "
                f"{type(self.optimizer).__name__}, step {self.penalty.step}"
                f"{'' if self.active else ', removed'})")
