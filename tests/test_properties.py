"""Property-based tests: random hostile parameter lists against float64 ground truth.

Each example is a list of 0-50 tensors (strategies.py): scalars, zero-size
dims, sizes around the 16-element vector body and the 32768-element CPU chunk;
float16, bfloat16, float32, float64, mixed or not; contiguous, transposed,
permuted, step-sliced, channels-last and expanded (stride-0) layouts; zeros,
signed zeros, subnormals, ±1e38, mixed magnitudes and signs, NaN and ±inf;
frozen tensors; both L2 modes and random coefficients.

Checked for every example:
- the value against `penalty_float64` rounded to the result dtype, and every
  gradient against float64 autograd rounded to the parameter's dtype, with
  per-dtype tolerances (NaN must match NaN, inf must match inf);
- result dtype, shape, device and requires_grad; gradient dtype and layout;
- bitwise-identical results on a second call; parameters left untouched;
- with NaN/inf among the inputs: a non-finite result, and gradient NaNs exactly
  where the per-parameter loop (`penalty_loop`) puts them.

The loop itself is not a value reference: its float32 norms overflow for ±1e38
and flush tiny norms to zero, where regext (float64 accumulation) is exact.

The hypothesis profile (conftest.py) is derandomized with a fixed example
count for CI; REGEXT_HYPOTHESIS_PROFILE=dev explores fresh random cases. A
failure prints the falsifying list (each tensor's shape, dtype, layout, value
kind and torch seed) and a @reproduce_failure blob.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import regext
from regext.reference import penalty_float64, penalty_loop

from conftest import DEVICES
from strategies import build, coefficients, spec_lists

# (rtol, atol) of a result, by result dtype, and of a gradient, by parameter dtype.
# CPU sums in float64: the value is the float64 truth rounded once. Gradients
# are rounded once or twice (float32 arithmetic, then the parameter's dtype).
VALUE_TOL = {torch.float32: (1e-6, 1e-44), torch.float64: (1e-10, 1e-300)}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-300),
    torch.float32: (1e-6, 1e-44),
    torch.bfloat16: (1.6e-2, 1e-40),  # one bfloat16 ulp (2**-7) and the smallest subnormal
    torch.float16: (2e-3, 1e-7),  # one float16 ulp (2**-10) and the smallest subnormal
}
# GPU kernels may accumulate and round differently: looser, still meaningful.
VALUE_TOL_CUDA = {torch.float32: (1e-5, 1e-44), torch.float64: (1e-10, 1e-300)}
GRAD_TOL_CUDA = {**GRAD_TOL, torch.float32: (1e-5, 1e-44)}

CASES = {"run": 0, "tensors": 0, "elements": 0, "non_finite": 0}


def _grads(value, params):
    want = [p for p in params if p.requires_grad]
    if not want or not value.requires_grad:
        return {}
    return dict(zip((id(p) for p in want), torch.autograd.grad(value, want)))


def _is_dense(t):
    """Non-overlapping and dense: a permutation of a contiguous tensor."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _squares_underflow(p):
    """A float64 tensor with nonzero elements whose squares all underflow to 0."""
    if p.dtype != torch.float64 or p.numel() != 1:
        return False  # several elements: torch.linalg.vector_norm underflows alike
    a = p.detach().abs()
    return bool(((a > 0) & (a * a == 0)).all())


def _nan_mask(t):
    return torch.isnan(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)


def _not_close(a, b, rtol, atol):
    """torch.isclose(equal_nan=True) negated, for float64; ~10x faster on CPU."""
    bad = ~((a - b).abs() <= atol + rtol * b.abs())  # NaN anywhere: bad, for now
    if bad.any():  # NaN matches NaN, inf matches the same inf
        bad &= ~((a == b) | (torch.isnan(a) & torch.isnan(b)))
    return bad | (torch.isinf(b) & (a != b))  # |a - inf| <= rtol * inf passes any a


def _assert_close_all(pairs):
    """pairs: (label, actual, expected, rtol, atol). NaN matches NaN, inf matches inf.

    One vectorized float64 check over all pairs (torch.testing.assert_close per
    tensor is far slower for half types); the first failing pair is then
    reported by assert_close itself.
    """
    groups = {}
    for pair in pairs:
        groups.setdefault(pair[3:], []).append(pair)
    failed = False
    for (r, t), group in groups.items():
        a = torch.cat([x.detach().reshape(-1).double() for _, x, _, _, _ in group])
        b = torch.cat([y.detach().reshape(-1).double().to(a.device) for _, _, y, _, _ in group])
        failed = failed or bool(_not_close(a, b, r, t).any())
    if not failed:
        return
    for label, x, y, r, t in pairs:
        x, y = x.detach(), y.detach().to(x.device)
        xd, yd = x.reshape(-1).double(), y.reshape(-1).double()
        bad = _not_close(xd, yd, r, t)
        if bad.any():
            k = int(bad.nonzero()[0])
            torch.testing.assert_close(x, y.to(x.dtype), rtol=r, atol=t, equal_nan=True,
                                       msg=lambda m: f"{label}: {m}")
            raise AssertionError(f"{label}: element {k}: {xd[k].item()!r} vs expected "
                                 f"{yd[k].item()!r} (rtol {r}, atol {t})")


def check_against_references(specs, l1, l2, l2_squared, device):
    params = [build(s, device) for s in specs]
    before = [p.detach().clone() for p in params]
    non_finite_input = any(not torch.isfinite(p).all() for p in params)
    CASES["run"] += 1
    CASES["tensors"] += len(params)
    CASES["elements"] += sum(p.numel() for p in params)
    CASES["non_finite"] += non_finite_input

    out = regext.fused_penalty(params, l1, l2, l2_squared=l2_squared)

    # Result: 0-dim, float64 if any parameter is float64, on the first device.
    assert out.dim() == 0
    if params:
        assert out.dtype == (torch.float64 if any(p.dtype == torch.float64 for p in params)
                             else torch.float32)
        assert out.device == params[0].device
    assert out.requires_grad == any(p.requires_grad for p in params)
    grads = _grads(out, params)
    for i, p in enumerate(params):
        if p.requires_grad:
            g = grads[id(p)]
            assert g.dtype == p.dtype and g.shape == p.shape, (i, g.dtype, g.shape)
            if p.numel() and _is_dense(p):
                assert g.stride() == p.stride(), (i, g.stride(), p.stride())

    # A second call: the same bits (fixed chunking, ordered float64 sums).
    again = regext.fused_penalty(params, l1, l2, l2_squared=l2_squared)
    again_grads = _grads(again, params)
    _assert_close_all([("value, second call", again, out, 0, 0)] + [
        (f"gradient of params[{i}], second call", again_grads[id(p)], grads[id(p)], 0, 0)
        for i, p in enumerate(params) if p.requires_grad])

    # Value and gradients against float64 autograd, rounded to the output dtypes.
    cuda = torch.device(device).type == "cuda"
    ref = penalty_float64(params, l1, l2, l2_squared=l2_squared)
    ref_grads = _grads(ref, params)
    rtol, atol = (VALUE_TOL_CUDA if cuda else VALUE_TOL)[out.dtype]
    checks = [("value", out, ref.detach().to(out.dtype), rtol, atol)]
    for i, p in enumerate(params):
        if not p.requires_grad:
            continue
        h = ref_grads[id(p)]
        if not l2_squared and _squares_underflow(p):
            # Known float64 range limit: every x^2 underflows, so ||p|| = 0 and the L2
            # gradient is 0 (as torch's own norm does for more than one element;
            # for a single element torch returns |x| exactly). L1 part only.
            h = l1 * torch.sign(p.detach())
        rtol, atol = (GRAD_TOL_CUDA if cuda else GRAD_TOL)[p.dtype]
        checks.append((f"gradient of params[{i}]", grads[id(p)], h, rtol, atol))
    _assert_close_all(checks)

    # NaN/inf in: non-finite out, and the loop's gradient NaN pattern.
    if non_finite_input:
        assert not math.isfinite(out.item())
        loop = penalty_loop(params, l1, l2, l2_squared=l2_squared)
        assert not math.isfinite(loop.item())
        loop_grads = _grads(loop, params)
        for i, p in enumerate(params):
            if not p.requires_grad:
                continue
            ours_nan, loop_nan = _nan_mask(grads[id(p)]), _nan_mask(loop_grads[id(p)])
            # Never a NaN the loop lacks.
            assert not (ours_nan & ~loop_nan).any(), f"gradient NaNs of params[{i}]"
            # The loop's backward multiplies in the parameter's dtype: a coefficient
            # outside that dtype's normal range becomes 0 (l2 = 1e-8 in float16) or inf
            # (l2 = 1e8 in float16) there, and 0 * inf = NaN where the exact gradient
            # (regext's, float64's) is ±inf or 0. Otherwise: the same NaNs.
            info = torch.finfo(p.dtype)
            if all(c == 0 or info.tiny <= c <= info.max / 4 for c in (l1, l2)):
                assert torch.equal(ours_nan, loop_nan), f"gradient NaNs of params[{i}]"

    _assert_close_all([(f"params[{i}] (must not be modified)", p, b, 0, 0)
                       for i, (p, b) in enumerate(zip(params, before))])


@pytest.mark.parametrize("device", DEVICES)
@given(specs=spec_lists(), l1=coefficients(), l2=coefficients(), l2_squared=st.booleans())
def test_matches_float64_reference(device, specs, l1, l2, l2_squared):
    check_against_references(specs, l1, l2, l2_squared, device)


@pytest.mark.parametrize("device", DEVICES)
@given(specs=spec_lists(max_tensors=8), l1=coefficients(), l2=coefficients(),
       l2_squared=st.booleans(), nan_at=st.integers(0, 7), value=st.sampled_from(
           [math.nan, math.inf, -math.inf]))
def test_non_finite_inputs_behave_like_the_loop(device, specs, l1, l2, l2_squared, nan_at,
                                                value):
    """Short lists where one tensor surely holds a NaN or an inf."""
    specs = [s for s in specs if math.prod(s.shape) > 0]
    if not specs:
        return
    from dataclasses import replace
    k = nan_at % len(specs)
    specs[k] = replace(specs[k], specials=specs[k].specials + ((0.0, value),),
                       layout="contiguous")
    check_against_references(specs, l1, l2, l2_squared, device)


def test_report_generated_cases():
    """Not a check: prints how many generated cases the property tests ran."""
    print(f"\nproperty cases: {CASES['run']} lists, {CASES['tensors']} tensors, "
          f"{CASES['elements']} elements, {CASES['non_finite']} with NaN/inf inputs")


def test_flush_to_zero_is_not_enabled():
    """Subnormals are numbers: regext must neither flush them nor leave FTZ/DAZ on."""
    tiny = torch.finfo(torch.float32).tiny
    p = torch.full((1000,), tiny / 4, requires_grad=True)  # 1000 subnormal float32s
    out = regext.fused_penalty([p], 1.0, 0.0)
    assert out.item() == pytest.approx(1000 * (tiny / 4), rel=1e-6)
    (g,) = torch.autograd.grad(regext.fused_penalty([p], 0.0, 1.0, l2_squared=True), [p])
    assert (g == 2 * p.detach()).all() and (g != 0).all()  # 2 * subnormal: still subnormal
    # The process state is untouched: torch still produces subnormals afterwards.
    assert (torch.tensor([tiny]) / 4).item() > 0
    h = torch.full((64,), 2.0 ** -20, dtype=torch.float16)  # subnormal float16
    assert regext.fused_penalty([h], 1.0).item() == 64 * 2.0 ** -20
