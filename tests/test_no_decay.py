"""exclude="no_decay": the rule the Hugging Face Trainer and timm use to leave
parameters out of weight decay (regext.no_decay)."""

import warnings

import pytest
import torch
from torch import nn

import regext


class RMSNorm(nn.Module):  # Llama-style, a class torch does not know
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class WeirdNorm2d(nn.Module):  # a norm layer with a 2-D parameter: left out by class
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n, n))


class Normalize(nn.Module):  # not a norm layer by name ("Normal...")
    def __init__(self, n):
        super().__init__()
        self.proj = nn.Parameter(torch.ones(n, n))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.relative_attention_bias = nn.Embedding(6, 2)  # T5: an embedding, stays
        self.attn = nn.MultiheadAttention(4, 2)
        self.LayerNorm = nn.LayerNorm(4)
        self.ln_rms = RMSNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.odd = WeirdNorm2d(3)
        self.normalize = Normalize(3)
        self.head = nn.Linear(4, 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.scalar = nn.Parameter(torch.tensor(1.0))

    def no_weight_decay(self):
        return {"pos_embed"}


def test_the_rule_on_every_kind_of_parameter():
    model = Block()
    left_out = regext.no_decay_names(model)
    assert left_out == {
        "attn.in_proj_bias", "attn.out_proj.bias", "LayerNorm.weight", "LayerNorm.bias",
        "ln_rms.weight", "bn.weight", "bn.bias", "odd.scale", "head.bias", "pos_embed",
        "scalar"}
    pen = regext.Penalty(model, l2=0.1, exclude="no_decay")
    assert set(pen.names) == {"emb.weight", "relative_attention_bias.weight",
                              "attn.in_proj_weight", "attn.out_proj.weight",
                              "normalize.proj", "head.weight"}
    assert set(pen.excluded) == left_out


def test_combined_with_patterns_and_with_named_pairs():
    model = Block()
    pen = regext.Penalty(model, l2=0.1, exclude=["no_decay", "emb.*"])
    assert "emb.weight" in pen.excluded and "head.weight" in pen.names
    # (name, tensor) pairs: no modules, so the shape and name rules only.
    pairs = regext.Penalty(model.named_parameters(), l2=0.1, exclude="no_decay")
    assert {"odd.scale", "pos_embed"} <= set(pairs.names)
    assert {"LayerNorm.weight", "head.bias", "scalar"} <= set(pairs.excluded)


def test_a_bert_model_keeps_only_its_matrices():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=16)
    model = transformers.BertForSequenceClassification(config)
    pen = regext.Penalty(model, l1=1e-4, exclude="no_decay")
    assert all(p.ndim == 2 for p in pen.parameters())
    assert not any("LayerNorm" in n or n.endswith("bias") for n in pen.names)
    assert "bert.embeddings.word_embeddings.weight" in pen.names
    # The Trainer's own rule decays the same set.
    trainer_rule = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert set(pen.names) == trainer_rule


def test_case_sensitive_patterns_warn_with_the_name_they_miss():
    model = nn.Sequential()
    model.add_module("LayerNorm", nn.LayerNorm(3))
    model.add_module("dense", nn.Linear(3, 3))
    with pytest.warns(UserWarning, match=r"exclude pattern '\*norm\*' matches no parameter "
                                         r"name; patterns are case-sensitive, and it would "
                                         r"match 'LayerNorm.weight' ignoring case; "
                                         r"exclude='no_decay'"):
        regext.Penalty(model, 0.1, exclude=["*bias", "*norm*"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regext.Penalty(model, 0.1, exclude="no_decay")  # no warning on any model
        regext.Penalty(nn.Linear(2, 2), 0.1, exclude="no_decay")
