"""regext in the Hugging Face ``Trainer``: ``PenaltyCallback``.

    from regext.integrations.transformers import PenaltyCallback
    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[PenaltyCallback(l1=1e-5, mode="prox")])

Needs ``transformers`` (``pip install 'regext[transformers]'``); ``import regext``
never imports it.
"""

import torch

from regext.integrations._driver import PenaltyDriver, import_error

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised by a subprocess test
    raise import_error(__name__, "transformers", "transformers") from e

STATE_KEY = "regext.PenaltyCallback"


def _jsonable(state):
    """Penalty.state_dict() with tensors as floats: trainer_state.json is JSON."""
    def plain(v):
        return float(v) if isinstance(v, torch.Tensor) else v
    return {"step": state["step"], "l1": plain(state["l1"]), "l2": plain(state["l2"]),
            "groups": [{k: plain(v) for k, v in g.items()} for g in state["groups"]]}


class PenaltyCallback(TrainerCallback):
    """Applies a :class:`regext.Penalty` at every optimizer step of a ``Trainer``.

    Args:
        penalty: a :class:`regext.Penalty` over the Trainer's model, or None (the
            default) to build ``regext.Penalty(model, exclude="no_decay",
            **penalty_kwargs)`` when training begins: the parameters the Trainer's own
            weight decay decays (:mod:`regext.no_decay`).
        mode: ``"prox"`` (default; the proximal step after each optimizer step, with
            each param group's learning rate: exact zeros for L1) or ``"grad"`` (the
            penalty's gradient added before each step), as
            :meth:`regext.Penalty.attach`.
        warmup_steps: optimizer steps without the penalty at the start.
        metric: the metric of the proximal step, as :meth:`regext.Penalty.attach`:
            ``"auto"`` (default: the Trainer's AdamW's own metric, where ``l1`` is in
            units of the loss gradient), ``"optimizer"`` or ``"euclidean"``.
        **penalty_kwargs: ``l1``, ``l2``, ``l2_squared``, ``group``, ``group_weight``,
            ``exclude``, ``overrides`` of :class:`regext.Penalty`.

    Per optimizer step: the Trainer calls ``optimizer.step()`` once per
    ``gradient_accumulation_steps`` micro-batches; the callback's hooks sit on the
    real optimizer (inside accelerate's ``AcceleratedOptimizer``), so the penalty is
    applied once per optimizer step and ``callback.penalty.step == state.global_step``.
    Steps that AMP's GradScaler skips apply nothing.

    Logging: at every logging step the entry appended to ``state.log_history`` gets
    ``"penalty"`` (its value now) and ``"sparsity"`` (the fraction of exact zeros in
    the penalized tensors), and the ``logs`` dict handed to the callbacks after this
    one gets them too: reporting integrations (TensorBoard, W&B, ...) see them when
    they come after it; the Trainer puts ``report_to`` integrations before the
    ``callbacks`` you pass, so add this one first with
    ``trainer.callback_handler.callbacks.insert(0, callback)`` to have them report it.

    Gradient clipping (``max_grad_norm``) in grad mode: the Trainer clips the
    gradients and then calls ``optimizer.step()``; the penalty's gradient is added by
    a step pre-hook, inside ``step()``, so it is *not* clipped (as decoupled weight
    decay is not). In prox mode clipping never sees the penalty either.

    Checkpoints: when the Trainer saves, the callback stores the Penalty's state
    (step, coefficients; tensors as floats) in ``state.stateful_callbacks`` under
    ``"regext.PenaltyCallback"`` (in ``trainer_state.json``); ``resume_from_checkpoint``
    restores it when training begins, so a resumed run continues the schedules and
    coefficients where they were. (With ``restore_callback_states_from_checkpoint=True``
    the Trainer logs that it ignores this entry: it is the callback's own.)
    """

    def __init__(self, penalty=None, *, mode="prox", warmup_steps=0, metric="auto",
                 **penalty_kwargs):
        self.driver = PenaltyDriver("PenaltyCallback", penalty, mode, warmup_steps,
                                    penalty_kwargs, metric=metric)

    @property
    def penalty(self):
        """The :class:`regext.Penalty` (None until training begins, unless given)."""
        return self.driver.penalty

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("PenaltyCallback: the Trainer passed no model or optimizer "
                               "to on_train_begin; this transformers version is not "
                               "supported")
        self.driver.load_state_dict(state.stateful_callbacks.get(STATE_KEY))
        self.driver.begin(model, optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback (which runs first) has decided whether this step saves;
        # the checkpoint's trainer_state.json is written after this hook.
        if control.should_save and self.driver.penalty is not None:
            state.stateful_callbacks[STATE_KEY] = _jsonable(self.driver.state_dict())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # evaluation and final summaries: no training-step entry
        values = self.driver.metrics()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs):
        self.driver.end()
