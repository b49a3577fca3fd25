"""Concurrency: Python threads calling regext at once all get the right answer.

Each thread owns a parameter list (sizes that span several chunks, so every
call also runs its own at::parallel_for team), computes the penalty and its
gradients many times while the others do the same, and compares every result
bit for bit with the one computed alone beforehand (the kernels are
deterministic, so any cross-talk shows up as a changed bit). A shared,
read-only list is hammered from all threads too. Finally the compiled library
is checked for global mutable state: writable data symbols defined by regext.
"""

import re
import shutil
import subprocess
import threading

import pytest
import torch

import regext

from conftest import DEVICES
from op_samples import cases, flatten, outcome, sample

THREADS = 8
ROUNDS = 12


def _params(seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    sizes = [int(n) for n in torch.randint(1, 20_000, (12,), generator=gen)]
    sizes += [32768 * (1 + seed % 3) + seed]  # several chunks
    ps = [torch.randn(n, generator=gen).to(dtypes[(seed + i) % 4]) for i, n in enumerate(sizes)]
    ps.append(torch.randn(64, 48, generator=gen).t())  # transposed
    return [p.to(device).requires_grad_() for p in ps]


def _coefficients(seed):
    return 1e-3 * (1 + seed), 1e-2 * (1 + seed % 5), seed % 2 == 1


def _fused(params, seed):
    l1, l2, sq = _coefficients(seed)
    out = regext.fused_penalty(params, l1, l2, l2_squared=sq)
    return [out.detach()] + list(torch.autograd.grad(out, params))


def _run_concurrently(work, n_threads=THREADS):
    """Runs work(k) in n_threads threads released together; re-raises the first failure."""
    barrier = threading.Barrier(n_threads)
    errors = []

    def target(k):
        try:
            barrier.wait()
            work(k)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append((k, e))

    threads = [threading.Thread(target=target, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        k, e = errors[0]
        raise AssertionError(f"thread {k} of {n_threads} failed: {e!r}") from e


def _assert_bitwise(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        assert torch.equal(a, b), f"{what}: result {i} differs from the single-threaded one"


@pytest.mark.parametrize("device", DEVICES)
def test_threads_on_different_lists_get_their_own_exact_results(device):
    lists = [_params(k, device) for k in range(THREADS)]
    expected = [_fused(lists[k], k) for k in range(THREADS)]

    def work(k):
        for _ in range(ROUNDS):
            _assert_bitwise(_fused(lists[k], k), expected[k], f"thread {k}")

    _run_concurrently(work)


def test_threads_sharing_one_read_only_list():
    shared = _params(99)
    expected = _fused(shared, 99)

    def work(k):
        for _ in range(ROUNDS):
            _assert_bitwise(_fused(shared, 99), expected, f"thread {k}")

    _run_concurrently(work)


@pytest.mark.parametrize("name, index", cases(first_only=True))
def test_threads_calling_every_operator_directly(name, index):
    op = getattr(torch.ops.regext, name)
    args = [sample(name, index, seed=k) for k in range(THREADS)]
    expected = [flatten(outcome(name, op, args[k])) for k in range(THREADS)]

    def work(k):
        for _ in range(ROUNDS):
            _assert_bitwise(flatten(outcome(name, op, args[k])), expected[k], f"thread {k}")

    _run_concurrently(work)


def test_threads_calling_add_penalty_grad_on_different_lists():
    lists = [_params(k) for k in range(THREADS)]
    expected = []
    for k in range(THREADS):
        l1, l2, sq = _coefficients(k)
        value, *grads = _fused(lists[k], k)
        expected.append((value, grads))

    def work(k):
        l1, l2, sq = _coefficients(k)
        params = lists[k]
        for _ in range(ROUNDS):
            for p in params:
                p.grad = None
            value = regext.add_penalty_grad_(params, l1, l2, l2_squared=sq)
            assert not value.requires_grad
            torch.testing.assert_close(value, expected[k][0], rtol=0, atol=0)
            for p, g in zip(params, expected[k][1]):
                torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=0)

    _run_concurrently(work)


# Writable data symbols any shared library has, or torch's headers put there
# (function-local statics initialized once, thread-safely, and then read-only).
_TOOLCHAIN = re.compile(r"^(_|\.|DW\.ref|completed\.|guard variable for |typeinfo |vtable "
                        r"|std::|c10::|at::|torch::|caffe2::|pybind11::)")
# regext's own: the operator registrations (written once, at load), the Python
# module definition and method table CPython requires, and the CPU capability
# chosen once at import (a function-local static, initialized under C++'s
# thread-safe static initialization and never written again).
_ALLOWED = re.compile(r"^((\w+::)*TORCH_LIBRARY(_IMPL)?_static_init_regext(_\w+)?"
                      r"|PyInit__C::module_def|\(anonymous namespace\)::methods"
                      r"|regext::cpu::capability_choice\(\)::choice)$")
# Sections written at run time. .data.rel.ro (constexpr tables of pointers) and
# .rodata are read-only once the library is loaded.
_WRITABLE = {".data", ".bss", ".tdata", ".tbss"}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_no_global_mutable_state_in_the_compiled_library():
    """Every object in a writable section of regext._C is accounted for."""
    so = regext._C.__file__
    out = subprocess.run(["objdump", "-t", "-C", so], capture_output=True, text=True,
                         check=True).stdout
    writable = []
    for line in out.splitlines():
        # 0000000000027400 l     O .data  0000000000000068              PyInit__C::module_def
        m = re.match(r"^[0-9a-f]+ .{7} (\S+)\s+[0-9a-f]+\s+(.*)$", line)
        if m and m.group(1) in _WRITABLE and " O " in line[16:26]:
            writable.append(m.group(2).strip())
    assert any(_ALLOWED.match(name) for name in writable), "objdump output not understood"
    suspicious = sorted({n for n in writable if not _TOOLCHAIN.match(n)
                         and not _ALLOWED.match(n) and "asan" not in n and "ubsan" not in n})
    assert not suspicious, (
        f"writable global/static data in {so}: {suspicious}. Kernels must keep their "
        "state on the stack or in tensors; shared mutable state races between threads.")
