"""regext in PyTorch Lightning: ``PenaltyCallback``.

    from regext.integrations.lightning import PenaltyCallback
    trainer = lightning.Trainer(callbacks=[PenaltyCallback(l1=1e-5, mode="prox")])

Needs ``lightning`` (``pip install 'regext[lightning]'``); ``import regext`` never
imports it.
"""

from regext.integrations._driver import PenaltyDriver, import_error

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - exercised by a subprocess test
    raise import_error(__name__, "lightning", "lightning") from e


class PenaltyCallback(Callback):
    """Applies a :class:`regext.Penalty` at every optimizer step of a Lightning run.

    Args:
        penalty: a :class:`regext.Penalty` over the LightningModule, or None (the
            default) to build ``regext.Penalty(pl_module, exclude="no_decay",
            **penalty_kwargs)`` when fitting starts (:mod:`regext.no_decay`).
        mode: ``"prox"`` (default) or ``"grad"``, as :meth:`regext.Penalty.attach`.
        warmup_steps: optimizer steps without the penalty at the start.
        metric: the metric of the proximal step, as :meth:`regext.Penalty.attach`
            (``"auto"``, the default, ``"optimizer"`` or ``"euclidean"``).
        optimizer: which of ``trainer.optimizers`` to attach to (an index; default 0,
            the first).
        log: whether to log ``"penalty"`` and ``"sparsity"`` through
            ``pl_module.log`` every ``trainer.log_every_n_steps`` optimizer steps
            (default True).
        **penalty_kwargs: ``l1``, ``l2``, ``l2_squared``, ``group``, ``group_weight``,
            ``exclude``, ``overrides`` of :class:`regext.Penalty`.

    Automatic optimization: Lightning steps every optimizer with a closure that runs
    ``training_step`` and backward inside ``optimizer.step()``; in grad mode the
    penalty gradient is added after the closure's backward (see
    :meth:`regext.Penalty.attach`), so the result equals the loop that adds
    ``regext.fused_penalty(...)`` to the loss. Manual optimization
    (``self.optimizers().step()``) works the same way. With
    ``accumulate_grad_batches`` the optimizer, and so the penalty, steps once per
    accumulated batch. Gradient clipping (``gradient_clip_val``) happens before
    ``step()``: a grad-mode penalty gradient is not clipped.

    Checkpoints: the Penalty's state (step, coefficients) is the callback's
    ``state_dict``, saved in Lightning checkpoints and restored by
    ``trainer.fit(..., ckpt_path=...)``.
    """

    def __init__(self, penalty=None, *, mode="prox", warmup_steps=0, metric="auto", optimizer=0,
                 log=True, **penalty_kwargs):
        self.driver = PenaltyDriver("PenaltyCallback", penalty, mode, warmup_steps,
                                    penalty_kwargs, metric=metric)
        if isinstance(optimizer, bool) or not isinstance(optimizer, int) or optimizer < 0:
            raise ValueError(f"PenaltyCallback: optimizer must be an index >= 0 into "
                             f"trainer.optimizers, got {optimizer!r}")
        self.optimizer_index = optimizer
        self.log = bool(log)

    @property
    def penalty(self):
        """The :class:`regext.Penalty` (None until fitting starts, unless given)."""
        return self.driver.penalty

    def on_fit_start(self, trainer, pl_module):
        optimizers = trainer.optimizers
        if self.optimizer_index >= len(optimizers):
            raise ValueError(f"PenaltyCallback: optimizer={self.optimizer_index} but the "
                             f"LightningModule configured {len(optimizers)} optimizer(s)")
        self.driver.begin(pl_module, optimizers[self.optimizer_index])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.log and self.driver.penalty is not None \
                and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            for key, value in self.driver.metrics().items():
                pl_module.log(key, value, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module):
        self.driver.end()

    def state_dict(self):
        state = self.driver.state_dict()
        return {} if state is None else {"penalty": state}

    def load_state_dict(self, state_dict):
        self.driver.load_state_dict(state_dict.get("penalty"))
