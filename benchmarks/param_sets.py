"""Parameter sets for the benchmark: the shapes of real models' parameters.

Each set is the list of shapes `model.parameters()` yields, in that order, written
out from the published architectures (torchvision's ResNet-18/50, GPT-2 small as in
Hugging Face's GPT2Model with tied embeddings), so torchvision and transformers are
not needed. `PARAMETER_COUNTS` holds the totals the shapes must add up to; the test
suite checks them.
"""

import math

import torch


def _conv_bn(shapes, out_ch, in_ch, k):
    """A bias-free conv followed by a BatchNorm: conv weight, BN weight, BN bias."""
    shapes += [(out_ch, in_ch, k, k), (out_ch,), (out_ch,)]


def _resnet(block, layers):
    """torchvision's ResNet: stem, four stages of `block`, then the classifier."""
    expansion = 1 if block == "basic" else 4
    shapes = []
    _conv_bn(shapes, 64, 3, 7)  # stem: conv1 7x7/2 + bn1
    inplanes = 64
    for stage, blocks in enumerate(layers):
        planes = 64 * 2 ** stage
        stride = 1 if stage == 0 else 2
        for b in range(blocks):
            s = stride if b == 0 else 1
            if block == "basic":
                _conv_bn(shapes, planes, inplanes, 3)
                _conv_bn(shapes, planes, planes, 3)
            else:
                _conv_bn(shapes, planes, inplanes, 1)
                _conv_bn(shapes, planes, planes, 3)
                _conv_bn(shapes, planes * 4, planes, 1)
            if s != 1 or inplanes != planes * expansion:  # downsample: 1x1 conv + BN
                _conv_bn(shapes, planes * expansion, inplanes, 1)
            inplanes = planes * expansion
    shapes += [(1000, 512 * expansion), (1000,)]  # fc
    return shapes


def resnet18():
    return _resnet("basic", [2, 2, 2, 2])


def resnet50():
    return _resnet("bottleneck", [3, 4, 6, 3])


def gpt2_small():
    """GPT-2 small (124M): 12 layers, d_model 768, vocab 50257, context 1024.

    Hugging Face's Conv1D stores weights as (in, out); the LM head is tied to wte,
    so model.parameters() yields wte once.
    """
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [(d,), (d,),                    # ln_1
                   (d, 3 * d), (3 * d,),          # attn.c_attn
                   (d, d), (d,),                  # attn.c_proj
                   (d,), (d,),                    # ln_2
                   (d, 4 * d), (4 * d,),          # mlp.c_fc
                   (4 * d, d), (d,)]              # mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def mlp_wide():
    """A wide MLP, 1024 -> 4096 -> 4096 -> 4096 -> 1024: few, large tensors."""
    widths = [1024, 4096, 4096, 4096, 1024]
    shapes = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        shapes += [(fan_out, fan_in), (fan_out,)]
    return shapes


def small500():
    """500 small tensors of 1Ki to 16Ki elements: shape (rows, 64), rows 16..256
    spaced geometrically; many tensors, little data (~11 MB in float32)."""
    return [(round(16 * 16 ** (i / 499)), 64) for i in range(500)]


PARAM_SETS = {
    "resnet18": (resnet18, "ResNet-18 (torchvision): convs, BatchNorms, fc"),
    "resnet50": (resnet50, "ResNet-50 (torchvision): convs, BatchNorms, fc"),
    "gpt2_small": (gpt2_small, "GPT-2 small transformer, 124M parameters"),
    "mlp_wide": (mlp_wide, "wide MLP 1024-4096-4096-4096-1024"),
    "small500": (small500, "500 small tensors, 1Ki-16Ki elements each"),
}

# Totals the shapes must reproduce (torchvision's and Hugging Face's models).
PARAMETER_COUNTS = {
    "resnet18": (62, 11_689_512),
    "resnet50": (161, 25_557_032),
    "gpt2_small": (148, 124_439_808),
}


def numel(shapes):
    return sum(math.prod(s) for s in shapes)


def make_params(shapes, device, dtype=torch.float32, seed=0):
    """Leaf tensors that require grad, drawn N(0, 0.02^2) (GPT-2's init scale):
    never zero, so the L1 gradient sign(x) is well defined."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(0.02 * torch.randn(s, generator=gen, device=device, dtype=dtype)).requires_grad_()
            for s in shapes]


def clone_params(params):
    """A copy with its own memory (for rotating inputs), same values."""
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def split_shapes(total, count):
    """`count` 1-D tensors sharing `total` elements (the last takes the rest): the
    shapes of the scaling sweeps."""
    base = total // count
    sizes = [base] * count
    sizes[-1] += total - base * count
    return [(n,) for n in sizes]

