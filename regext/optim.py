"""A Penalty attached to a torch.optim optimizer: its gradient before every step, or
its proximal step after every step with each parameter's own learning rate
(Penalty.attach documents the behaviour; this is the machinery)."""

import torch

from regext._validation import coefficient

MODES = ("grad", "prox")


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


class PenaltyAttachment:
    """The hooks of one Penalty on one optimizer; ``remove()`` takes them off.

    Built by :meth:`regext.Penalty.attach`. ``mode``, ``warmup_steps``, ``penalty``
    and ``optimizer`` (the real optimizer, unwrapped) are readable attributes.
    """

    def __init__(self, penalty, optimizer, mode, warmup_steps=0):
        func = "Penalty.attach"
        if mode not in MODES:
            raise ValueError(f"{func}: mode must be 'grad' or 'prox', got {mode!r}")
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
        self.mode, self.warmup_steps = mode, warmup_steps
        if mode == "grad":
            self._handles = [optimizer.register_step_pre_hook(self._add_grad),
                             optimizer.register_step_post_hook(self._advance)]
        else:
            self._handles = [optimizer.register_step_post_hook(self._prox)]

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
                self.penalty.prox_(lr, only={id(p) for p in group["params"]})
        self.penalty.step += 1

    def remove(self):
        """Detaches the penalty: later steps are exactly as without it. The Penalty
        can then be attached again (to this or another optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self):
        return (f"PenaltyAttachment(mode={self.mode!r}, warmup_steps={self.warmup_steps}, "
                f"{type(self.optimizer).__name__}, step {self.penalty.step}"
                f"{'' if self.active else ', removed'})")
