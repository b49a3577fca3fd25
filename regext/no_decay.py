"""The "no_decay" selection rule: which parameters training stacks leave out of
weight decay, so that ``regext.Penalty(model, exclude="no_decay")`` penalizes what
AdamW's ``weight_decay`` would decay in the Hugging Face Trainer or timm.

The rule (the union of two sources, with one deliberate difference):
- transformers ``Trainer.get_decay_parameter_names`` (v4.x-5.x): parameters of
  ``nn.LayerNorm`` modules, and names that, lowercased, contain ``bias``,
  ``layernorm`` or ``rmsnorm``, or a ``norm`` / ``*_norm`` component;
- timm ``param_groups_weight_decay``: ``param.ndim <= 1``, names ending in
  ``.bias``, and the names in ``model.no_weight_decay()``.

regext leaves out:
1. every tensor with ``ndim <= 1`` (biases, norm scales, scalars);
2. every parameter whose last name component ends in ``bias`` (``head.bias``,
   ``attn.in_proj_bias``). Unlike transformers' substring test, a 2-D embedding
   whose *module* is called ``..._bias`` (T5's ``relative_attention_bias.weight``)
   stays penalized: embeddings stay penalized;
3. every parameter held directly by a normalization module: torch's
   (``BatchNorm*``, ``InstanceNorm*``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``,
   ``LocalResponseNorm``, and their subclasses) and custom ones recognized by class
   name: any class in the module's MRO whose name contains ``Norm`` not followed by
   ``al`` (``LlamaRMSNorm``, ``T5LayerNorm``, ``LayerNorm2d``, ``BatchNormAct2d``;
   not ``Normalize``);
4. names whose lowercased dotted form has a ``layernorm`` or ``rmsnorm``
   substring, or a component that is ``norm`` or ends in ``_norm`` (transformers'
   name patterns: a norm module of an unrecognized class);
5. the names returned by ``model.no_weight_decay()`` when the root module has that
   method (timm's ViTs: ``pos_embed``, ``cls_token``), matched exactly or as glob
   patterns.
Rules 3 and 5 need the module; given only ``(name, tensor)`` pairs, rules 1, 2
and 4 apply.
"""

import fnmatch
import re

import torch
from torch import nn

PRESET = "no_decay"

_NORM_CLASS_NAME = re.compile(r"Norm(?!al)")
_NORM_NAME = re.compile(r"layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def _torch_norm_classes():
    classes = [nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm]
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        classes.append(nn.RMSNorm)
    return tuple(classes)


def is_norm_layer(module: nn.Module) -> bool:
    """True for a normalization module: one of torch's norm classes (or a subclass),
    or a class whose name, or a base class's name, contains ``Norm`` not followed by
    ``al`` (Llama's ``LlamaRMSNorm``, T5's ``T5LayerNorm``, timm's ``LayerNorm2d``)."""
    if isinstance(module, _torch_norm_classes()):
        return True
    return any(_NORM_CLASS_NAME.search(cls.__name__) for cls in type(module).__mro__
               if cls not in (nn.Module, object))


def _by_name_and_shape(name: str, p: torch.Tensor) -> bool:
    """Rules 1, 2 and 4: decided from the name and the tensor alone."""
    return (p.ndim <= 1 or name.rsplit(".", 1)[-1].endswith("bias")
            or _NORM_NAME.search(name.lower()) is not None)


def no_decay_names(source) -> set:
    """The names of the parameters the "no_decay" rule leaves out (module docstring).

    Args:
        source: an ``nn.Module`` (all five rules) or an iterable of ``(name, tensor)``
            pairs (rules 1, 2 and 4).

    Returns:
        A set of parameter names, as ``module.named_parameters()`` spells them (a tied
        parameter under its first name).
    """
    if not isinstance(source, nn.Module):
        return {name for name, p in source if _by_name_and_shape(name, p)}
    names = {name for name, p in source.named_parameters() if _by_name_and_shape(name, p)}
    canonical = {id(p): name for name, p in source.named_parameters()}
    for module in source.modules():
        if is_norm_layer(module):
            for p in module.parameters(recurse=False):
                if id(p) in canonical:
                    names.add(canonical[id(p)])
    listed = getattr(source, "no_weight_decay", None)
    if callable(listed):
        patterns = tuple(listed())
        names.update(name for name in canonical.values()
                     if any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in patterns))
    return names
