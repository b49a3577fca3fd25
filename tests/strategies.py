"""Hypothesis strategies for hostile parameter lists (used by test_properties.py).

A generated case is a list of 0-50 `TensorSpec`s: shape, dtype, memory layout,
value kind, a torch seed for the values and, optionally, NaN/inf at a few
positions. Element values come from a seeded torch.Generator rather than from
hypothesis itself (65,537-element tensors would make hypothesis far too slow);
the seed is part of the drawn example, so a failing case prints everything
needed to rebuild it, and shrinking still works on the list, the shapes and
the kinds.
"""

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# Element counts around the CPU kernels' boundaries: the 16-element vector
# body (vector_loops.cpp) and the 32768-element chunk (kChunkElems).
VECTOR_SIZES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 100, 255]
CHUNK_SIZES = [32767, 32768, 32769, 65535, 65536, 65537, 98305]
MAX_BIG_TENSORS = 3  # tensors of CHUNK_SIZES per list: keeps one example below ~0.5M elements

LAYOUTS = ["contiguous", "transposed", "permuted", "sliced", "channels_last", "expanded"]
VALUE_KINDS = ["normal", "zeros", "signed_zeros", "subnormal", "huge", "mixed", "tiny_norm",
               "constant"]
SPECIALS = [math.nan, math.inf, -math.inf]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype
    layout: str
    kind: str
    seed: int
    specials: tuple = ()  # (flat index fraction in [0, 1), value)
    requires_grad: bool = True

    def __repr__(self):  # short enough to read in a 50-tensor falsifying example
        sp = f", specials={self.specials}" if self.specials else ""
        rg = "" if self.requires_grad else ", frozen"
        return (f"Spec({self.shape}, {str(self.dtype)[6:]}, {self.layout}, {self.kind}, "
                f"seed={self.seed}{sp}{rg})")


def _factor(n, ndim, draw):
    """A random shape with `ndim` dims whose product is n (n >= 1)."""
    shape = [1] * ndim
    m, p = n, 2
    factors = []
    while p * p <= m:
        while m % p == 0:
            factors.append(p)
            m //= p
        p += 1
    if m > 1:
        factors.append(m)
    for f in factors:
        shape[draw(st.integers(0, ndim - 1))] *= f
    return tuple(shape)


@st.composite
def shapes(draw, big=False, ndim=None):
    """Shapes: scalars, zero-size dims, sizes around vector and chunk boundaries."""
    if ndim is None:
        ndim = draw(st.integers(0, 4))
    if ndim == 0:
        return ()
    if not big and draw(st.integers(0, 9)) == 0:  # one tenth: a zero-size dim
        shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
        shape[draw(st.integers(0, ndim - 1))] = 0
        return tuple(shape)
    n = draw(st.sampled_from(CHUNK_SIZES if big else VECTOR_SIZES))
    return _factor(n, ndim, draw)


@st.composite
def tensor_specs(draw, big=False, allow_specials=True, dtype=None):
    layout = draw(st.sampled_from(LAYOUTS))
    ndim = {"channels_last": 4, "transposed": draw(st.integers(2, 4)),
            "permuted": draw(st.integers(2, 4))}.get(layout)
    shape = draw(shapes(big=big, ndim=ndim))
    specials = ()
    if allow_specials and math.prod(shape) > 0 and draw(st.integers(0, 7)) == 0:
        specials = tuple(draw(st.lists(
            st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(SPECIALS)),
            min_size=1, max_size=3)))
    return TensorSpec(
        shape=shape,
        dtype=dtype if dtype is not None else draw(st.sampled_from(DTYPES)),
        layout=layout,
        kind=draw(st.sampled_from(VALUE_KINDS)),
        seed=draw(st.integers(0, 2**31 - 1)),
        specials=specials,
        requires_grad=draw(st.integers(0, 9)) > 0,  # one in ten frozen
    )


@st.composite
def spec_lists(draw, max_tensors=50, allow_specials=True):
    """0-50 specs; at most MAX_BIG_TENSORS of them span several CPU chunks.

    Half of the lists share one dtype (so float32 results are common), the
    other half mix dtypes (float64 anywhere makes the result float64).
    """
    n = draw(st.integers(0, max_tensors))
    n_big = draw(st.integers(0, min(MAX_BIG_TENSORS, n)))
    common = draw(st.sampled_from(DTYPES)) if draw(st.booleans()) else None
    specs = [draw(tensor_specs(big=i < n_big, allow_specials=allow_specials, dtype=common))
             for i in range(n)]
    return draw(st.permutations(specs)) if n > 1 else specs


def coefficients():
    """Penalty coefficients: 0, ordinary values, and a few extreme ones."""
    return st.one_of(
        st.sampled_from([0.0, 1.0, 0.5, 1e-3]),
        st.floats(0.0, 100.0, allow_nan=False, allow_infinity=False, allow_subnormal=False),
        st.sampled_from([1e-30, 1e-8, 1e8, 1e30]),
    )


def _values(spec, n, gen):
    """n float64 values of the spec's kind, inside the spec dtype's finite range."""
    info = torch.finfo(spec.dtype)
    big = min(1e38, info.max / 2)
    if spec.kind == "normal":
        scale = [1e-3, 1.0, 1e3][spec.seed % 3]
        x = torch.randn(n, generator=gen, dtype=torch.float64) * scale
    elif spec.kind == "zeros":
        x = torch.zeros(n, dtype=torch.float64)
    elif spec.kind == "signed_zeros":
        x = torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, -0.0).double()
    elif spec.kind == "subnormal":  # below the dtype's smallest normal number
        x = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * info.tiny
    elif spec.kind == "huge":  # ±1e38 (float16: ±32752)
        x = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.9 + 0.1) * big
        x = x * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    elif spec.kind == "mixed":  # every magnitude from subnormal to huge, mixed signs
        lo, hi = math.log10(info.tiny) - 2, math.log10(big)
        e = torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
        x = sign * torch.pow(10.0, e)
    elif spec.kind == "tiny_norm":  # normal numbers whose Euclidean norm is tiny
        x = torch.randn(n, generator=gen, dtype=torch.float64) * info.tiny * 8
    elif spec.kind == "constant":  # all equal: worst case for summation error
        x = torch.full((n,), [0.1, -7.5, 1.0][spec.seed % 3], dtype=torch.float64)
    else:
        raise AssertionError(spec.kind)
    return x.clamp(-info.max, info.max)


def build(spec, device="cpu"):
    """The tensor a spec describes: its values, in its layout, as a leaf (or view)."""
    gen = torch.Generator().manual_seed(spec.seed)
    shape = spec.shape
    n = math.prod(shape)
    flat = _values(spec, n, gen)
    for frac, value in spec.specials:
        flat[int(frac * n)] = value
    dense = flat.to(spec.dtype).reshape(shape).to(device)

    if spec.layout in ("transposed", "permuted"):
        if spec.layout == "transposed":
            perm = list(range(len(shape)))
            perm[-1], perm[-2] = perm[-2], perm[-1]
        else:
            perm = torch.randperm(len(shape), generator=gen).tolist()
        inverse = [perm.index(i) for i in range(len(perm))]
        # base holds the data in permuted order; base.permute(inverse) has `shape`.
        t = dense.permute(perm).contiguous().permute(inverse)
    elif spec.layout == "sliced":  # every `step`-th element of a bigger base, offset
        step = 2 + spec.seed % 2
        dim = len(shape) - 1 if shape else None
        if dim is None:
            t = torch.empty(3, dtype=spec.dtype, device=device)[1:2].view(())
            t.copy_(dense)
        else:
            big_shape = list(shape)
            big_shape[dim] = shape[dim] * step + 1
            base = torch.full(big_shape, 12345.0, dtype=spec.dtype, device=device)
            index = [slice(None)] * len(shape)
            index[dim] = slice(1, 1 + shape[dim] * step, step)
            t = base[tuple(index)]
            t.copy_(dense)
    elif spec.layout == "channels_last":
        t = dense.contiguous(memory_format=torch.channels_last)
    elif spec.layout == "expanded":  # stride 0: every element one memory location
        t = dense.reshape(-1)[:1].reshape([1] * len(shape)).expand(shape) if n else dense
    else:
        t = dense
    assert t.shape == torch.Size(shape), (t.shape, shape)
    # detach() keeps the strides (and the overlap of expanded views): a leaf with
    # the spec's exact layout.
    return t.detach().requires_grad_(spec.requires_grad)
