"""A Penalty attached to a torch.optim optimizer: its gradient before every step, or
its proximal step after every step with each parameter's own learning rate
(Penalty.attach documents the behaviour; this is the machinery)."""

import torch

from regext._validation import coefficient

MODES = ("grad", "prox")


class PenaltyAttachment:
    """The hooks of one Penalty on one optimizer; ``remove()`` takes them off.

    Built by :meth:`regext.Penalty.attach`. ``mode``, ``warmup_steps``, ``penalty``
    and ``optimizer`` are readable attributes.
    """

    def __init__(self, penalty, optimizer, mode, warmup_steps=0):
        func = "Penalty.attach"
        if mode not in MODES:
            raise ValueError(f"{func}: mode must be 'grad' or 'prox', got {mode!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{func}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer,
                                                                  "register_step_pre_hook"):
            raise TypeError(f"{func}: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in penalty.named_parameters() if id(p) not in held]
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

    def _applies(self):
        return self.penalty.step >= self.warmup_steps

    def _add_grad(self, optimizer, args, kwargs):
        if self._applies():
            # A fused optimizer under GradScaler sees still-scaled gradients here.
            self.penalty.add_grad_(scale=getattr(optimizer, "grad_scale", None))

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
        """Detaches the penalty: later steps are exactly as without it."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self):
        return (f"PenaltyAttachment(mode={self.mode!r}, warmup_steps={self.warmup_steps}, "
                f"{type(self.optimizer).__name__}, step {self.penalty.step})")
