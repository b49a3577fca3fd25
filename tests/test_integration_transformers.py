"""regext.integrations.transformers.PenaltyCallback in a real Hugging Face Trainer
(CPU, a tiny BertForSequenceClassification built from a BertConfig, random tokens,
AdamW, gradient accumulation 2): steps, logging, checkpoint and resume, grad mode."""

import pytest
import torch

import regext

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from regext.integrations.transformers import PenaltyCallback  # noqa: E402

STEPS = 6


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def dataset(n=48, length=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


def trainer_for(model, out, callbacks, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, learning_rate=1e-2, optim="adamw_torch",
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                  data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    kwargs.update(overrides)
    args = transformers.TrainingArguments(**kwargs)
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                callbacks=callbacks)


@pytest.mark.parametrize("metric, l1", [("auto", 2e-3), ("euclidean", 0.05)])
def test_one_penalty_step_per_optimizer_step_and_logged_values(tmp_path, metric, l1):
    """In AdamW's metric (the default) l1 is in units of the loss gradient: 2e-3 zeroes
    some weights; the Euclidean step needs 0.05 with lr 1e-2 to make any."""
    model = tiny_bert()
    callback = PenaltyCallback(l1=l1, mode="prox", metric=metric)
    trainer = trainer_for(model, tmp_path, [callback])
    trainer.train()
    pen = callback.penalty
    assert pen.step == trainer.state.global_step == STEPS  # 12 micro-batches, 6 steps
    assert set(pen.excluded) == regext.no_decay_names(model)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == STEPS
    assert all(e["penalty"] > 0 and 0.0 <= e["sparsity"] <= 1.0 for e in logged)
    # The last entry is the state at the end: value and exact zeros of the penalized tensors.
    assert logged[-1]["penalty"] == pytest.approx(float(pen().detach()), rel=1e-6)
    zeros = sum(int((p == 0).sum()) for p in pen.parameters())
    assert logged[-1]["sparsity"] == pytest.approx(zeros / sum(p.numel() for p in
                                                               pen.parameters()))
    assert 0 < zeros < sum(p.numel() for p in pen.parameters())  # some exact zeros, not all


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("mode", ["prox", "grad"])
def test_resume_from_checkpoint_ends_with_the_straight_runs_weights(tmp_path, mode):
    def schedule(step):
        return 0.02 * (1 + step)

    straight = tiny_bert()
    trainer_for(straight, tmp_path / "a", [PenaltyCallback(l1=schedule, l2=0.01, mode=mode,
                                                           warmup_steps=1)]).train()

    first = tiny_bert()
    held = PenaltyCallback(l1=schedule, l2=0.01, mode=mode, warmup_steps=1)
    trainer_for(first, tmp_path / "b", [held, StopAt(3)], save_strategy="steps",
                save_steps=3).train()
    assert held.penalty.step == 3
    resumed = tiny_bert(seed=123)  # different initial weights: the checkpoint restores them
    callback = PenaltyCallback(l1=schedule, l2=0.01, mode=mode, warmup_steps=1)
    trainer = trainer_for(resumed, tmp_path / "b", [callback], save_strategy="steps",
                          save_steps=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert callback.penalty.step == STEPS
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_restored_coefficients_reach_a_fresh_callback(tmp_path):
    model = tiny_bert()
    held = PenaltyCallback(l1=torch.tensor(0.0), mode="prox")
    trainer = trainer_for(model, tmp_path, [held, StopAt(3)], save_strategy="steps",
                          save_steps=3)
    trainer.train()
    state = trainer.state.stateful_callbacks["regext.PenaltyCallback"]
    assert state["step"] == 3 and state["l1"] == 0.0
    fresh_tensor = torch.tensor(0.7)
    fresh = PenaltyCallback(l1=fresh_tensor, mode="prox")
    trainer_for(tiny_bert(), tmp_path, [fresh], save_strategy="steps", save_steps=3,
                max_steps=4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert fresh.penalty.l1 is fresh_tensor and float(fresh_tensor) == 0.0
    assert fresh.penalty.step == 4


def test_grad_mode_equals_adding_the_gradient_by_hand_before_each_step(tmp_path):
    """Grad mode: the penalty gradient once per optimizer step, after clipping (here
    on_pre_optimizer_step, the Trainer's hook after clipping, does it by hand)."""
    class ByHand(transformers.TrainerCallback):
        def __init__(self, pen):
            self.pen = pen

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.pen.add_grad_()

    got_model = tiny_bert()
    trainer_for(got_model, tmp_path / "a", [PenaltyCallback(l1=0.03, l2=0.02,
                                                            mode="grad")]).train()
    want_model = tiny_bert()
    pen = regext.Penalty(want_model, l1=0.03, l2=0.02, exclude="no_decay")
    trainer_for(want_model, tmp_path / "b", [ByHand(pen)]).train()
    for p, q in zip(got_model.parameters(), want_model.parameters()):
        assert torch.equal(p, q)
    plain = tiny_bert()
    trainer_for(plain, tmp_path / "c", []).train()
    assert any(not torch.equal(p, q) for p, q in zip(got_model.parameters(), plain.parameters()))


def test_arguments_are_checked_at_construction():
    with pytest.raises(TypeError, match="give either a Penalty or the arguments"):
        PenaltyCallback(regext.Penalty(tiny_bert(), 0.1), l1=0.1)
    with pytest.raises(ValueError, match="mode must be 'grad' or 'prox'"):
        PenaltyCallback(l1=0.1, mode="both")
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0"):
        PenaltyCallback(l1=-1.0)
