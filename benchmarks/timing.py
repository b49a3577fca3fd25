"""Timing utilities for the benchmark: one clock per device, interleaved samples,
rotating inputs, and the memory-bandwidth ceiling.

Every sample times exactly one call. On CPU the host clock (time.perf_counter)
brackets the call, which returns only when its work is done. On CUDA the device
is synchronized first, then CUDA events bracket the call, so a sample covers the
host-side launches and the device work they queue, and nothing left over from
the previous call.
"""

import gc
import glob
import math
import os
import random
import statistics
import time

import torch


class Clock:
    """Times one call of `fn` in milliseconds on `device`."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn):
        """(milliseconds, fn's return value); the value outlives the timed region,
        so freeing it (e.g. an autograd graph) is not timed."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), out
        start = time.perf_counter()
        out = fn()
        return 1e3 * (time.perf_counter() - start), out


def summarize(samples):
    """Median and spread of a list of milliseconds."""
    ordered = sorted(samples)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median_ms": statistics.median(ordered), "min_ms": ordered[0],
            "iqr_ms": q3 - q1, "samples": len(ordered)}


def rounds_for(per_round_ms, budget_s, min_rounds, max_rounds):
    """How many interleaved rounds fit in `budget_s`, given one round's estimate."""
    if per_round_ms <= 0:
        return max_rounds
    return max(min_rounds, min(max_rounds, int(1e3 * budget_s / per_round_ms)))


def interleaved(tasks, rounds, clock):
    """Time every task once per round, interleaved, and return {name: [ms, ...]}.

    `tasks` maps a name to (prepare, run, finish): `prepare()` (untimed) returns the
    argument for `run`, `run(arg)` is the timed call, `finish(arg)` (untimed) cleans
    up after it. Each round runs the tasks in a fresh random order (seeded: the same
    orders every run), so that every task follows every other equally often on
    average, and the garbage collector is paused while timing.

    Why not a rotation: with three tasks, rotating by one per round puts the same
    task after the same neighbour in two rounds of three. In bench_structured that
    made regext_row follow torch_loop_row, whose freed autograd buffers leave the
    next ~500 MB gradient allocation to fault its pages in again: regext_row's median
    was 1.47x regext_tensor's while its minimum was 1.05x.
    """
    names = list(tasks)
    order = random.Random(0)
    samples = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            this_round = list(names)
            order.shuffle(this_round)
            for name in this_round:
                prepare, run, finish = tasks[name]
                arg = prepare()
                ms, out = clock.time_ms(lambda: run(arg))
                del out
                finish(arg)
                samples[name].append(ms)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def measure_ceiling(device, nbytes, repeats, clock=None):
    """Memory-bandwidth ceiling: the median time of `dst.copy_(src)` over a large
    float32 buffer, counting the bytes read plus the bytes written."""
    clock = clock or Clock(device)
    n = nbytes // 4
    src = torch.empty(n, device=device).uniform_(-1.0, 1.0)  # never time on zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    clock.sync()
    times = [clock.time_ms(lambda: dst.copy_(src))[0] for _ in range(repeats)]
    if not torch.equal(dst, src):
        raise RuntimeError("bandwidth ceiling: the copy did not reproduce its source")
    median_ms = statistics.median(times)
    return {"method": "median of dst.copy_(src), float32, read + write bytes",
            "buffer_bytes": 4 * n, "repeats": repeats, "median_ms": median_ms,
            "gbps": 2 * 4 * n / (median_ms * 1e-3) / 1e9}


def _parse_size(text):
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def last_level_cache_bytes(device):
    """L2 size of a GPU, or the largest CPU cache sysfs reports (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "L2_cache_size", None) or None
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                sizes.append(_parse_size(f.read()))
        except (OSError, ValueError):
            pass
    return max(sizes) if sizes else None


def rotation_copies(set_bytes, cache_bytes, max_copies):
    """How many copies of an input set to cycle through so that consecutive uses of
    one copy are at least two caches' worth of other data apart."""
    if not cache_bytes or set_bytes <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(2 * cache_bytes / set_bytes)))


class Rotation:
    """Cycles through copies of one parameter set, one global counter for all
    variants, so interleaved variants never find their inputs left in cache by the
    call just before."""

    def __init__(self, copies):
        self.copies = copies
        self.counter = 0

    def next(self):
        ps = self.copies[self.counter % len(self.copies)]
        self.counter += 1
        return ps


def cpu_model_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
