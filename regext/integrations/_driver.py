"""What both framework callbacks do, written once: build the Penalty when training
begins, attach it to the real optimizer, report its value and sparsity, and carry
its state through checkpoints. The callbacks only translate their framework's
events into these calls."""

import warnings

import torch

import regext

MODES = ("grad", "prox")
METRICS = ("auto", "optimizer", "euclidean")


def import_error(module, package, extra):
    """The ImportError for a missing framework, naming the extra that installs it."""
    return ImportError(f"{module} needs {package}, which is not installed; install it with "
                       f"pip install 'regext[{extra}]' (or pip install {package})")


class PenaltyDriver:
    """One Penalty, attached to one optimizer, for the duration of a training run.

    Args:
        penalty: a :class:`regext.Penalty`, or None to build
            ``regext.Penalty(model, exclude="no_decay", **penalty_kwargs)`` from the
            framework's model when training begins (``exclude`` in penalty_kwargs
            replaces the preset).
        mode, warmup_steps, metric: as in :meth:`regext.Penalty.attach`.
        penalty_kwargs: the Penalty's arguments (``l1``, ``l2``, ``group``, ...).
    """

    def __init__(self, func, penalty, mode, warmup_steps, penalty_kwargs, metric="auto"):
        if penalty is not None and not isinstance(penalty, regext.Penalty):
            raise TypeError(f"{func}: penalty must be a regext.Penalty or None, got "
                            f"{type(penalty).__name__}")
        if penalty is not None and penalty_kwargs:
            raise TypeError(f"{func}: give either a Penalty or the arguments to build one "
                            f"({sorted(penalty_kwargs)}), not both")
        if mode not in MODES:
            raise ValueError(f"{func}: mode must be 'grad' or 'prox', got {mode!r}")
        if metric not in METRICS or (mode == "grad" and metric != "auto"):
            raise ValueError(f"{func}: metric must be 'auto', 'optimizer' or 'euclidean' "
                             f"(and 'auto' in grad mode), got {metric!r} with mode={mode!r}")
        if penalty is None:
            # Checked now, not when training begins: a typo fails at once.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # patterns match nothing in []
                regext.Penalty([], **{"exclude": "no_decay", **penalty_kwargs})
        self.func = func
        self.penalty = penalty
        self.mode, self.warmup_steps, self.metric = mode, warmup_steps, metric
        self.penalty_kwargs = dict(penalty_kwargs)
        self.attachment = None
        self._pending_state = None

    def begin(self, model, optimizer):
        """Builds the Penalty (if needed), restores a pending checkpoint state, and
        attaches it to `optimizer` (a framework wrapper is unwrapped)."""
        if self.penalty is None:
            self.penalty = regext.Penalty(model, **{"exclude": "no_decay", **self.penalty_kwargs})
        self.end()
        if self._pending_state is not None:
            self.penalty.load_state_dict(self._pending_state)
            self._pending_state = None
        self.attachment = self.penalty.attach(optimizer, self.mode,
                                              warmup_steps=self.warmup_steps,
                                              metric=self.metric)

    def end(self):
        """Detaches the penalty (training after it is as without regext)."""
        if self.attachment is not None:
            self.attachment.remove()
            self.attachment = None

    def metrics(self):
        """{"penalty": the penalty's value now (float), "sparsity": the fraction of
        exact zeros in the penalized tensors that require grad (float)}. Reads two
        numbers from the device: call it at logging steps only."""
        if self.penalty is None:
            return {}
        with torch.no_grad():
            value = float(self.penalty())
        params = [p for p in self.penalty.parameters() if p.requires_grad]
        return {"penalty": value, "sparsity": regext.sparsity(params) if params else 0.0}

    def state_dict(self):
        """The Penalty's state (step, coefficients), or the one waiting to be applied."""
        if self.penalty is None:
            return self._pending_state
        return self.penalty.state_dict()

    def load_state_dict(self, state):
        """Restores a state now, or when the Penalty is built (training begins)."""
        if state is None:
            return
        if self.penalty is None:
            self._pending_state = state
        else:
            self.penalty.load_state_dict(state)
