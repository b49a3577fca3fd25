"""The emulated CUDA backend (regext_cuemu) and what its tests share.

`.ci/cuda_emu` builds the library (tests/cuda_emu/build.py) and points
REGEXT_CUEMU_LIB at it; tests/conftest.py collects this folder only then.
"""

import os

import torch

import regext  # noqa: F401  (the CPU operators: the oracle)
from op_samples import flatten

torch.ops.load_library(os.environ["REGEXT_CUEMU_LIB"])

EMU = torch.ops.regext_cuemu  # regext's operators on the CUDA kernels, run by cuemu
CPU = torch.ops.regext        # the same operators on the CPU kernels

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SCHEDULES = ("forward", "reverse", "random:7")


def vector_width(dtype):
    """Elements per 16-byte load in the CUDA kernels."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def exact_size(values, offset):
    """`values` (1-D) at element `offset` of an allocation of exactly offset + n
    elements: misaligned for offset > 0, and a read one past the end leaves the
    allocation (AddressSanitizer reports it)."""
    base = torch.empty(offset + values.numel(), dtype=values.dtype)
    base[offset:] = values
    return base[offset:]


def bits_equal(a, b):
    """Bitwise equality of two tensors, any NaN matching any NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    same = a.contiguous().view(_INT_OF[a.element_size()]) == b.contiguous().view(
        _INT_OF[b.element_size()])
    return bool((same | (a.isnan() & b.isnan())).all())


_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bits_equal(got, want, what):
    if isinstance(got, (list, tuple)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            assert_bits_equal(g, w, f"{what}[{i}]")
        return
    assert bits_equal(got, want), f"{what}: emulated CUDA and CPU differ\n{got}\n{want}"


def on_every_schedule(fn):
    """fn() under each fiber schedule; asserts the results are bitwise identical
    (a missing barrier makes them differ) and returns the first."""
    results = []
    for schedule in SCHEDULES:
        EMU.set_schedule(schedule)
        results.append(fn())
    EMU.set_schedule("forward")
    for schedule, result in zip(SCHEDULES[1:], results[1:]):
        assert_bits_equal(flatten(result), flatten(results[0]),
                          f"schedule {schedule} against forward")
    return results[0]


def launches(fn):
    """(result of fn(), [(blocks, threads, parameter bytes)] of its launches)."""
    EMU.clear_launch_log()
    result = fn()
    return result, [tuple(row) for row in EMU.launch_log().tolist()]
