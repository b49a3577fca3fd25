"""The instruction-set variants of the CPU loops: selection by REGEXT_CPU_CAPABILITY,
and bitwise identical results on every variant this machine can run.

Each variant is chosen once, when regext is imported, so every variant runs in
its own Python process (CI also runs the kernel-facing tests once per variant:
.ci/run)."""

import os
import subprocess
import sys

import pytest
import torch

import regext

ORDER = ["default", "avx2", "avx512"]

# Runs in a fresh process: every operator on every dtype, at block and chunk
# edges, with NaN, huge and tiny values; saves the results.
SCRIPT = r"""
import sys, torch, regext
torch.manual_seed(0)
c = lambda v: torch.scalar_tensor(v, dtype=torch.float64)
out = []
for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    big = 6e4 if dt == torch.float16 else 1e20
    tiny = 1e-7 if dt == torch.float16 else 1e-25
    ps = [torch.randn(n).to(dt) for n in (0, 1, 15, 16, 17, 255, 256, 257, 1000, 32769, 70001)]
    ps[5][3] = float("nan"); ps[6][:] = tiny; ps[7][10] = big; ps[8][::3] = 0.0
    for sq in (False, True):
        t, s = torch.ops.regext.penalty_forward(ps, c(0.3), c(0.7), sq)
        g = torch.ops.regext.penalty_backward(torch.tensor(1.5), ps, s, c(0.3), c(0.7), sq)
        out += [t, s] + list(g)
        gr = [torch.randn(p.shape).to(dt) for p in ps]
        out += list(torch.ops.regext.penalty_forward_accumulate_(gr, ps, c(0.3), c(0.7), sq)) + gr
    q = [p.clone() for p in ps]
    torch.ops.regext.prox_l1_(q, c(0.5))
    out += q
    q = [p.clone() for p in ps]
    torch.ops.regext.prox_group_l2_(q, c(3.0))
    out += q
    out.append(torch.ops.regext.count_zeros(ps))
    # The proximal step in an optimizer's metric: the float32 path, its float64 fallback
    # (NaN, tiny and huge values) and, with means, the float64 path.
    vs = [torch.rand(p.shape).to(dt) for p in ps]; vs[8][::2] = 0.0
    ms = [0.3 * torch.randn(p.shape).to(dt) for p in ps]
    cf = torch.tensor([[0.05, 0.02, 1.3, 1e-8]] * len(ps), dtype=torch.float64); cf[3, 0] = 0.0
    for means in ([], ms):
        q = [p.clone() for p in ps]
        torch.ops.regext.prox_metric_(q, vs, means, cf)
        out += q
    # The group lasso: long runs, short runs and per-position (strided column) loops.
    ws = [torch.randn(s).to(dt) for s in ((3, 40000), (50, 300), (64, 70), (16, 8, 3, 3))]
    ws[1][7] = 0.0; ws[2][:, 5] = float("nan")
    for dims in ([0, 0, 1, 1], [1, 1, 0, 0]):
        t, s = torch.ops.regext.group_penalty_forward(ws, dims, c(0.3), c(0.7), True)
        g = torch.ops.regext.group_penalty_backward(torch.tensor(1.5), ws, dims, s, c(0.3),
                                                    c(0.7), True)
        q = [w.clone() for w in ws]
        torch.ops.regext.prox_group_lasso_(q, dims, c(0.05), False)
        out += [t, s] + list(g) + q
        # The group lasso in an optimizer's metric: Newton's sums (newton_sums).
        vw = [torch.rand(w.shape).to(dt) for w in ws]
        cg = torch.tensor([[0.3, 0.0, 1.0, 1e-8], [0.05, 0.0, 2.0, 1e-8], [0.2, 0.0, 1.0, 0.0],
                           [0.1, 0.0, 1.0, 1e-8]], dtype=torch.float64)
        q = [w.clone() for w in ws]
        torch.ops.regext.prox_group_metric_(q, vw, [], dims, cg, True)
        out += q
torch.save(out, sys.argv[1])
print(regext.cpu_capability())
"""


def run_python(code, capability, *args):
    env = dict(os.environ, REGEXT_CPU_CAPABILITY=capability)
    return subprocess.run([sys.executable, "-W", "always", "-c", code, *args], env=env,
                          capture_output=True, text=True, timeout=300)


def supported():
    """The variants this machine runs: every one up to the best (the default pick)."""
    return ORDER[:ORDER.index(regext.cpu_capability()) + 1]


def test_the_default_pick_is_the_best_this_cpu_runs():
    assert regext.cpu_capability() in ORDER
    if "REGEXT_CPU_CAPABILITY" not in os.environ:
        got = run_python("import regext; print(regext.cpu_capability())", "")
        assert got.stdout.strip() == regext.cpu_capability()


@pytest.mark.parametrize("capability", ORDER)
def test_a_requested_capability_runs_or_falls_back_with_a_warning(capability):
    got = run_python("import regext; print(regext.cpu_capability())", capability)
    assert got.returncode == 0, got.stderr
    if capability in supported():
        assert got.stdout.strip() == capability
        assert "cannot run it" not in got.stderr
    else:  # e.g. avx512 on an AVX2-only machine
        assert got.stdout.strip() == supported()[-1]
        assert f"REGEXT_CPU_CAPABILITY={capability}, but this CPU or build cannot run it" \
            in got.stderr


def test_an_unknown_capability_fails_the_import_with_the_valid_names():
    got = run_python("import regext", "sse9")
    assert got.returncode != 0
    assert "REGEXT_CPU_CAPABILITY=sse9 is not a CPU capability regext has: use default, avx2 or " \
           "avx512" in got.stderr


def _bits(t):
    if not t.is_floating_point():
        return t
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    flat = t.reshape(-1)
    return torch.where(flat.isnan(), torch.zeros((), dtype=ints[t.element_size()]),
                       flat.view(ints[t.element_size()]))


def test_every_variant_gives_the_same_bits(tmp_path):
    results = {}
    for capability in supported():
        path = tmp_path / f"{capability}.pt"
        got = run_python(SCRIPT, capability, str(path))
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == capability
        results[capability] = torch.load(path)
    if len(results) == 1:
        pytest.skip("this CPU runs only the default variant: nothing to compare")
    base = results["default"]
    for capability, tensors in results.items():
        assert len(tensors) == len(base)
        for i, (a, b) in enumerate(zip(tensors, base)):
            assert a.dtype == b.dtype and a.shape == b.shape
            if a.is_floating_point():
                assert torch.equal(a.isnan(), b.isnan()), f"{capability}: result {i} NaNs"
            assert torch.equal(_bits(a), _bits(b)), f"{capability}: result {i} differs"
