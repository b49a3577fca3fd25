"""Reporting for the benchmarks: progress, tables, charts, results.md and the
environment block of results.json. Measuring lives in bench_penalty.py / timing.py."""

import datetime
import json
import os
import platform
import subprocess
import sys

import torch

import regext
import timing
from bandwidth import COLUMNS as BANDWIDTH_COLUMNS

try:
    from tqdm import tqdm
except ImportError:  # optional: plain progress lines instead
    tqdm = None

PHASES = ("forward", "forward+backward")
# Every variant, in the order (and with the colour) the charts use.
VARIANTS = ("loop", "foreach", "compiled", "regext", "regext_inplace", "foreach_norm2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Yardsticks: timed beside the variants but not ways of computing the penalty, so not
# competitors. Charts draw them grey and hatched and label them so; tables mark them.
YARDSTICKS = {
    "foreach_norm2": "one torch._foreach_norm pass: reads every tensor once, not a penalty",
    "foreach_mul": "floor: one read + one write of every weight, not a proximal step",
    "foreach_add": "floor: torch._foreach_add_(grads, params), not a penalty",
}
YARDSTICK_STYLE = dict(color="#bdbdbd", hatch="///", edgecolor="#636363", linewidth=0.6)

# Why "% of ceiling" can pass 100 (written under every table that shows it).
CEILING_NOTE = (
    "% ceiling: GB/s (the bytes the operation must move, over its median time) as a "
    "percentage of a large dst.copy_(src) timed in the same run, whose bytes are counted "
    "as read + write. On a CPU the copy also reads every destination line before writing "
    "it (write-allocate), traffic the count leaves out, so a pass that writes only lines "
    "it has just read (regext_inplace reads and writes each .grad in place) can pass "
    "100%, up to about 150%: it is not faster than memory, the copy is slower per "
    "counted byte.")


def display_name(variant):
    """A variant's name as tables and legends show it: yardsticks say so."""
    return f"{variant} (yardstick)" if variant in YARDSTICKS else variant


def chart_caption(env):
    """What every chart carries: the machine, CPU kernels, threads, torch, commit, date."""
    device = env["device_name"]
    if env.get("device") == "cuda":
        device += f", CUDA {env.get('cuda')}"
    capability = env.get("cpu_capability") or "not recorded (run predates the variants)"
    date = str(env.get("date", ""))[:10]
    return (f"{device} | {env.get('threads')} threads | CPU kernels: {capability} | "
            f"torch {env['torch']} | commit {env.get('git_commit') or '?'} | {date}")


class Progress:
    """A tqdm bar on stderr, or plain numbered lines when tqdm is missing."""

    def __init__(self, total):
        self.total, self.done = total, 0
        self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
                        ) if tqdm else None

    def start(self, desc):
        if self.bar is not None:
            self.bar.set_description_str(desc)
        else:
            print(f"[{self.done + 1}/{self.total}] {desc} ...", file=sys.stderr, flush=True)

    def advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def format_table(rows, columns, markdown=False):
    """Rows of dicts as an aligned text table (or a Markdown table)."""
    header = [title for title, _, _ in columns]
    body = []
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            if key == "variant" and value is not None:
                value = display_name(value)
            cells.append("-" if value is None else fmt.format(value))
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
              for i, h in enumerate(header)]
    left = 3  # set, phase, variant are left-aligned, numbers right-aligned
    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in body])


RESULT_COLUMNS = [
    ("set", "set", "{}"), ("phase", "phase", "{}"), ("variant", "variant", "{}"),
    ("median ms", "median_ms", "{:.3f}"), ("min ms", "min_ms", "{:.3f}"),
    ("vs loop", "speedup_vs_loop", "{:.2f}x"), ("vs foreach", "speedup_vs_foreach", "{:.2f}x"),
    ("vs compiled", "speedup_vs_compiled", "{:.2f}x"),
    ("GB/s", "gbps", "{:.1f}"), ("% ceiling", "pct_of_ceiling", "{:.1f}"),
]
SWEEP_COLUMNS = [
    ("sweep", "sweep", "{}"), ("phase", "phase", "{}"), ("variant", "variant", "{}"),
    ("tensors", "n_tensors", "{}"), ("elements", "numel", "{}"),
    ("median ms", "median_ms", "{:.3f}"), ("min ms", "min_ms", "{:.3f}"),
    ("vs loop", "speedup_vs_loop", "{:.2f}x"), ("GB/s", "gbps", "{:.1f}"),
]


def _colors():
    import matplotlib
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return {v: cycle[i % len(cycle)] for i, v in enumerate(VARIANTS)}  # same color everywhere


def plot_speedups(rows, path, env):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors()
    sets = list(dict.fromkeys(r["set"] for r in rows))
    variants = [v for v in VARIANTS if v != "loop" and any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, len(PHASES), figsize=(6.5 * len(PHASES), 4.8), sharey=True)
    width = 0.8 / max(1, len(variants))
    values = []
    for ax, phase in zip(axes, PHASES):
        for i, variant in enumerate(variants):
            xs, ys = [], []
            for j, s in enumerate(sets):
                row = next((r for r in rows if r["set"] == s and r["phase"] == phase
                            and r["variant"] == variant), None)
                if row and row.get("speedup_vs_loop"):
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(row["speedup_vs_loop"])
            if variant in YARDSTICKS:
                ax.bar(xs, ys, width, **YARDSTICK_STYLE)
            else:
                ax.bar(xs, ys, width, color=colors[variant])
            values += ys
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.1f}" if y < 10 else f"{y:.0f}", (x, y), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(sets)))
        ax.set_xticklabels(sets, rotation=15)
        ax.set_title(f"{phase} (loop = 1)")
        ax.grid(axis="y", which="both", alpha=0.3)
    if values:
        axes[0].set_ylim(min(0.8, min(values) / 1.5), max(values) * 1.8)
    axes[0].set_ylabel("speed-up over the loop (x, log scale)")
    from matplotlib.patches import Patch
    handles = [Patch(**YARDSTICK_STYLE, label=f"{v} (yardstick: {YARDSTICKS[v]})")
               if v in YARDSTICKS else Patch(color=colors[v], label=v) for v in variants]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 3), fontsize=8.5,
               frameon=False, bbox_to_anchor=(0.5, 0.955))
    fig.suptitle(chart_caption(env), fontsize=9, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.89))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows, path, env):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors()
    fig, axes = plt.subplots(2, len(PHASES), figsize=(6.5 * len(PHASES), 8.5))
    for r, (sweep, xkey, xlabel) in enumerate([("count", "n_tensors", "number of tensors"),
                                               ("size", "numel", "total elements")]):
        sub = [row for row in rows if row["sweep"] == sweep]
        fixed = (f"fixed total {sub[0]['numel']:,} elements" if sweep == "count"
                 else f"fixed count {sub[0]['n_tensors']} tensors") if sub else ""
        for c, phase in enumerate(PHASES):
            ax = axes[r][c]
            for variant in VARIANTS:
                pts = sorted((row[xkey], row["median_ms"]) for row in sub
                             if row["variant"] == variant and row["phase"] == phase)
                if pts and variant in YARDSTICKS:
                    ax.plot(*zip(*pts), marker="x", linestyle="--", color="#969696",
                            label=display_name(variant))
                elif pts:
                    ax.plot(*zip(*pts), marker="o", label=variant, color=colors[variant])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("median ms (log)")
            ax.set_title(f"{phase}: time vs {xlabel}, {fixed}", fontsize=10)
            ax.grid(which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(chart_caption(env), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device, cfg_name, script, **extra):
    # Thread-count variables are part of the command that reproduces a CPU run.
    thread_env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                  if k in os.environ}
    command = ([f"{k}={v}" for k, v in thread_env.items()]
               + ["python", os.path.relpath(os.path.abspath(script), ROOT)] + sys.argv[1:])
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device": device.type,
           "threads": torch.get_num_threads(), "thread_env": thread_env,
           "cpu_count": os.cpu_count(), "cpu_model": timing.cpu_model_name(),
           "regext": regext.__version__, "regext_cuda_kernels": regext.cuda_available(),
           "cpu_capability": regext.cpu_capability(),
           "cuda": torch.version.cuda, "config": cfg_name, **extra,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(command), "loadavg_start": timing.load_average()}
    try:
        env["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device),
                   sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["device_name"] = env["cpu_model"]
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def forward_vs_one_pass(rows):
    """{set: regext forward median / foreach_norm2 median}, where both were timed."""
    forward = {(r["set"], r["variant"]): r["median_ms"] for r in rows if r["phase"] == "forward"}
    return {s: forward[(s, "regext")] / forward[(s, "foreach_norm2")]
            for (s, v) in forward if v == "foreach_norm2" and (s, "regext") in forward}


def write_markdown(path, env, rows, scaling, failures, pngs, bandwidth=()):
    lines = [f"# regext benchmark: {env['device']}", "",
             f"- machine: {env['device_name']}, {env['threads']} torch threads, "
             f"{env.get('affinity_cpus', env['cpu_count'])} CPUs usable, CPU kernels "
             f"{env.get('cpu_capability') or 'not recorded'}",
             f"- torch {env['torch']}, python {env['python']}"
             + (f", CUDA {env['cuda']}" if env['device'] == 'cuda' else ""),
             f"- command: `{env['command']}`",
             f"- date: {env['date']}, commit {env.get('git_commit')}",
             f"- load average at start / end: {env['loadavg_start']} / {env['loadavg_end']}",
             f"- bandwidth ceiling: {env['ceiling_gbps']:.1f} GB/s (median dst.copy_(src), "
             "read + write bytes)",
             f"- float32, l1={env['l1']}, l2={env['l2']}; {env['bytes_model']}", ""]
    lines += [f"![{p}]({p})" for p in pngs] + [""]
    lines += [format_table(rows, RESULT_COLUMNS, markdown=True), ""]
    if any(r["variant"] in YARDSTICKS for r in rows):
        lines += ["(yardstick): " + "; ".join(f"`{v}` is {YARDSTICKS[v]}" for v in sorted(
            {r["variant"] for r in rows if r["variant"] in YARDSTICKS})) + ".", ""]
    if rows:
        lines += [CEILING_NOTE, ""]
    if env.get("compile_ms"):
        lines += ["torch.compile time (first forward + first backward, excluded above): "
                  + ", ".join(f"{k} {v / 1e3:.1f} s" for k, v in env["compile_ms"].items()),
                  ""]
    ratios = forward_vs_one_pass(rows)
    if ratios:
        lines += ["regext forward / one `torch._foreach_norm(params, 2)` pass (medians): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), ""]
    if scaling:
        lines += ["## Scaling", "", format_table(scaling, SWEEP_COLUMNS, markdown=True), ""]
    if bandwidth:
        lines += ["## Per-thread bandwidth", "",
                  f"One thread, one float32 tensor, CPU kernels {env.get('cpu_capability')}; "
                  "regext / torch is regext's GB/s over the torch op moving the same bytes "
                  "(benchmarks/bandwidth.py).", "",
                  format_table(bandwidth, BANDWIDTH_COLUMNS, markdown=True), ""]
    for fail in failures:
        lines.append(f"- FAILED {fail['set']}/{fail['variant']}/{fail['phase']} "
                     f"({fail['kind']}): {fail.get('error', 'value/gradient check')}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_json(out, result):
    """`result` as `out`/results.json (the folder made if needed); nothing if `out` is
    None or empty (a run without --out, or --out "")."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)


def write_all(out, payload):
    """Charts, results.md and the console summary of one run (results.json is written)."""
    env, rows, scaling, failures = (payload["env"], payload["results"], payload["scaling"],
                                    payload["failures"])
    bandwidth = payload.get("bandwidth", [])
    pngs = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no PNG charts (pip install matplotlib)",
              file=sys.stderr)
    else:
        if rows:
            plot_speedups(rows, os.path.join(out, "speedup.png"), env)
            pngs.append("speedup.png")
        if scaling:
            plot_scaling(scaling, os.path.join(out, "scaling.png"), env)
            pngs.append("scaling.png")
    write_markdown(os.path.join(out, "results.md"), env, rows, scaling, failures, pngs, bandwidth)
    print(f"\n{header_line(env)}")
    if rows:
        print(format_table(rows, RESULT_COLUMNS))
        if any(r["variant"] in YARDSTICKS for r in rows):
            print("(yardstick) foreach_norm2: " + YARDSTICKS["foreach_norm2"])
        if any(r.get("pct_of_ceiling", 0) > 100 for r in rows):
            print(CEILING_NOTE)
    if scaling:
        print("\nScaling (fixed total size: count sweep; fixed count: size sweep)")
        print(format_table(scaling, SWEEP_COLUMNS))
    if bandwidth:
        print("\nPer-thread bandwidth (one thread, one float32 tensor)")
        print(format_table(bandwidth, BANDWIDTH_COLUMNS))
    if env.get("compile_ms"):
        print("\ntorch.compile time (first forward + first backward): "
              + ", ".join(f"{k} {v / 1e3:.1f} s" for k, v in env["compile_ms"].items()))
    for fail in failures:
        print(f"FAILED {fail['set']}/{fail['variant']}/{fail['phase']} ({fail['kind']}): "
              f"{fail.get('error', 'value/gradient check')}")
    print(f"\nwrote results.json, results.md{''.join(', ' + p for p in pngs)} in {out} "
          f"({env['wall_s']:.0f} s)")


def header_line(env):
    """Machine, threads, CPU capability, torch, ceiling and load in one line."""
    ceiling = max(env["ceiling"].values(), key=lambda c: c["gbps"])
    return (f"{env['device_name']} | {env['threads']} threads | CPU kernels: "
            f"{env.get('cpu_capability') or 'not recorded'} | torch {env['torch']} | ceiling {ceiling['gbps']:.1f} "
            f"GB/s (copy of {ceiling['buffer_bytes'] >> 20} MB) | load {env['loadavg_start']} "
            f"-> {env['loadavg_end']}")


def rerender(folder):
    """Charts and results.md of a finished run again, from its results.json (after a
    change to how they are drawn); the measurements are not touched."""
    import json
    with open(os.path.join(folder, "results.json")) as f:
        payload = json.load(f)
    if "scaling" in payload:  # bench_penalty.py
        payload.setdefault("bandwidth", [])
        write_all(folder, payload)
    elif "ratios" in payload:  # bench_structured.py
        import bench_structured
        bench_structured.write_outputs(folder, payload)
    else:
        raise SystemExit(f"{folder}/results.json: not a bench_penalty or bench_structured run")


if __name__ == "__main__":
    # python benchmarks/report.py DIR [DIR ...]: re-render committed runs' charts and tables
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if len(sys.argv) < 2:
        raise SystemExit("usage: python benchmarks/report.py RESULTS_DIR [RESULTS_DIR ...]")
    for folder in sys.argv[1:]:
        rerender(folder)
