"""regext in the Hugging Face Trainer: an L1 penalty by proximal steps on a small
BERT classifier, with the "no_decay" rule, gradient accumulation and a checkpoint.

    python examples/hf_trainer.py [--out DIR] [--steps N]

Everything is built locally (a BertConfig, random token data): no download. It
prints the logged penalty and sparsity and the parameters the callback penalized.
Needs `pip install 'regext[transformers]'`.
"""

import argparse
import tempfile

import torch
import transformers

from regext.integrations.transformers import PenaltyCallback


def make_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def make_data(n=128, length=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=gen)
    labels = (ids[:, 0] % 2).long()  # a learnable rule: the parity of the first token
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


def run(out_dir, steps=12):
    model = make_model()
    callback = PenaltyCallback(l1=1e-5, mode="prox")  # Penalty(model, exclude="no_decay")
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=4, save_steps=steps,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=make_data(),
                                   callbacks=[callback])
    trainer.train()
    logged = [e for e in trainer.state.log_history if "penalty" in e]
    for entry in logged:
        print(f"step {entry['step']:3d}  loss {entry['loss']:.4f}  penalty {entry['penalty']:.4f}"
              f"  sparsity {entry['sparsity']:.3%}")
    pen = callback.penalty
    print(f"penalized {len(pen.names)} tensors, left out {len(pen.excluded)} "
          f"(biases, LayerNorms: the Trainer's no_decay rule); pen.step = {pen.step}")
    return logged, pen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if args.out:
        run(args.out, args.steps)
    else:
        with tempfile.TemporaryDirectory() as out:
            run(out, args.steps)


if __name__ == "__main__":
    main()
