"""Shared fixtures: the devices to test on and seeded random parameter lists."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import regext

# tests/cuda_emu runs the CUDA kernels under the CPU emulator; .ci/cuda_emu builds
# it and sets REGEXT_CUEMU_LIB (bash .ci/cuda_emu runs the whole harness).
collect_ignore = [] if os.environ.get("REGEXT_CUEMU_LIB") else ["cuda_emu"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and regext.cuda_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random but reproducible inputs."""
    return torch.Generator().manual_seed(1234)


def scalar(value):
    """A coefficient or threshold as the operators take it: a 0-dim float64 CPU tensor."""
    return torch.scalar_tensor(value, dtype=torch.float64)


def random_params(gen, shapes, dtype=torch.float32, device="cpu", requires_grad=True,
                  away_from_zero=False):
    """Random normal tensors; with away_from_zero, |x| >= 0.1 (gradcheck-safe for L1)."""
    out = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if away_from_zero:
            x = x.sign() * (x.abs() + 0.1)
        out.append(x.to(dtype=dtype, device=device).requires_grad_(requires_grad))
    return out


def grads_of(value, params):
    """d(value)/d(params), with zeros for parameters that got no gradient."""
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


# Tolerances by parameter dtype: (rtol, atol) for values and gradients.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}


# Hypothesis profiles (REGEXT_HYPOTHESIS_PROFILE selects one; "ci" by default).
# "ci": derandomized (the same cases on every run and machine) and sized to keep
# the suite fast; a failure prints the falsifying example and a
# @reproduce_failure blob. "sanitize": few cases, for the ASan/UBSan build (every
# large allocation is slow under ASan; test_boundaries.py covers the sizes).
# "dev": fresh random cases each run, many more of them (seeds are printed).
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.large_base_example])
settings.register_profile("ci", derandomize=True, max_examples=200, **_COMMON)
settings.register_profile("sanitize", derandomize=True, max_examples=12, **_COMMON)
settings.register_profile("dev", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("REGEXT_HYPOTHESIS_PROFILE", "ci"))
