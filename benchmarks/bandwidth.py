"""Per-thread bandwidth of regext's passes against torch's own one-pass kernels.

One float32 tensor, sized to sit in L2 or to stream from DRAM, on ONE thread (the
section sets torch.set_num_threads(1) and restores it): memory speed per core,
which is what an instruction-set variant can or cannot reach. Each regext pass is
paired with the torch op that moves the same bytes, timed interleaved with it:

  forward      penalty_forward([x])          read x             vs x.sum(), _foreach_norm([x], 2)
  backward     penalty_backward(...)         read x, write g    vs torch._foreach_mul([x], 2.0)
  accumulate   penalty_grad_accumulate_      read x, r+w g      vs torch._foreach_add_([g], [x])
  one pass     penalty_forward_accumulate_   read x, r+w g      vs torch._foreach_add_([g], [x])
               (squared form: sums and gradient in one read)
  prox_l1_     soft-thresholding in place    r+w x              vs torch._foreach_mul_([x], 1.0)
  prox_group_l2_  norms, then scale in place read x, r+w x      vs torch._foreach_mul_([x], 1.0)
                                                                  (r+w x: one pass fewer)

GB/s counts the bytes each op must move (above); `ratio` is regext's GB/s over its
yardstick's, so 1.0 means "moves bytes as fast as torch's own single pass".
"""

import torch

import timing

# label -> float32 elements. "L2": 1 MiB, within a core's L2 on current x86 server
# cores (1-2 MiB) and large enough that a call's fixed cost (~10 us through the
# dispatcher) stays small against its memory time; "DRAM": far beyond any cache.
SIZES = {"L2 (1 MiB)": 1 << 18, "DRAM (1 GiB)": 1 << 28}
QUICK_SIZES = {"L2 (1 MiB)": 1 << 18, "DRAM (64 MiB)": 1 << 24}


def _cases(x, g, stats):
    """(name, regext call, its bytes as multiples of x's, yardstick name, yardstick call,
    the yardstick's bytes)."""
    ops = torch.ops.regext
    one = torch.ones(())
    l1, l2, zero = (torch.scalar_tensor(v, dtype=torch.float64) for v in (1e-5, 1e-4, 0.0))
    # A threshold that scales every element (a factor of exactly 1 skips the write).
    shrink = stats[0, 1].sqrt() * 1e-9
    return [
        ("forward", lambda: ops.penalty_forward([x], l1, l2, False), 1,
         "x.sum()", lambda: x.sum(), 1),
        ("forward", lambda: ops.penalty_forward([x], l1, l2, False), 1,
         "_foreach_norm", lambda: torch._foreach_norm([x], 2), 1),
        ("backward (write)", lambda: ops.penalty_backward(one, [x], stats, l1, l2, False), 2,
         "_foreach_mul", lambda: torch._foreach_mul([x], 2.0), 2),
        ("accumulate", lambda: ops.penalty_grad_accumulate_([g], [x], stats, l1, l2, False),
         3, "_foreach_add_", lambda: torch._foreach_add_([g], [x]), 3),
        ("one pass (squared)", lambda: ops.penalty_forward_accumulate_([g], [x], l1, l2, True),
         3, "_foreach_add_", lambda: torch._foreach_add_([g], [x]), 3),
        ("prox_l1_", lambda: ops.prox_l1_([x], zero), 2,
         "_foreach_mul_", lambda: torch._foreach_mul_([x], 1.0), 2),
        # Two passes: every norm before any scaling (read, then read and write).
        ("prox_group_l2_", lambda: ops.prox_group_l2_([x], shrink), 3,
         "_foreach_mul_", lambda: torch._foreach_mul_([x], 1.0), 2),
    ]


def measure(sizes, rounds, clock):
    """Rows {size, op, yardstick, bytes, ms and GB/s of both, ratio}, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for label, numel in sizes.items():
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(numel, generator=gen)
            g = torch.zeros_like(x)
            stats = torch.ops.regext.penalty_forward([x], torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), False)[1]
            for name, ours, factor, yard_name, yard, yard_factor in _cases(x, g, stats):
                tasks = {"regext": (lambda: None, lambda _, f=ours: f(), lambda _: None),
                         "torch": (lambda: None, lambda _, f=yard: f(), lambda _: None)}
                timing.interleaved(tasks, 1, clock)  # warm-up
                samples = timing.interleaved(tasks, rounds, clock)
                nbytes = {"regext": factor * x.numel() * x.element_size(),
                          "torch": yard_factor * x.numel() * x.element_size()}
                ms = {k: timing.summarize(v)["median_ms"] for k, v in samples.items()}
                gbps = {k: nbytes[k] / (v * 1e-3) / 1e9 for k, v in ms.items()}
                rows.append({"size": label, "op": name, "yardstick": yard_name,
                             "bytes": nbytes["regext"], "yardstick_bytes": nbytes["torch"],
                             "regext_ms": ms["regext"], "torch_ms": ms["torch"],
                             "regext_gbps": gbps["regext"], "torch_gbps": gbps["torch"],
                             "ratio": gbps["regext"] / gbps["torch"]})
            del x, g
    finally:
        torch.set_num_threads(threads)
    return rows


COLUMNS = [
    ("size", "size", "{}"), ("regext op", "op", "{}"), ("torch yardstick", "yardstick", "{}"),
    ("regext GB/s", "regext_gbps", "{:.1f}"), ("torch GB/s", "torch_gbps", "{:.1f}"),
    ("regext / torch", "ratio", "{:.2f}"),
]
