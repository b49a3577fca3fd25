"""Builds the emulated CUDA backend: python tests/cuda_emu/build.py OUT [--sanitize none|address|thread].

Compiles csrc/cuda/*.cu as C++ against cuemu (tests/cuda_emu/cuemu.h and the
stand-in CUDA headers in include/) together with emulated_ops.cpp into
OUT/regext_cuemu.so, for the torch of this Python. The kernel sources are used
as they are, with one addition made in a copy under OUT/src: every kernel
declared `__launch_bounds__(N)` starts with CUEMU_CHECK_LAUNCH_BOUNDS(N), so that
a launch with more threads than its bound is an error. A kernel without
`__launch_bounds__` stops the build. A unit whose inputs (its source, every
header it can include, the flags) are unchanged since the last build into OUT
is not compiled again.
"""

import argparse
import concurrent.futures
import hashlib
import os
import pathlib
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CUDA_SOURCES = ROOT / "csrc" / "cuda"

SANITIZERS = {
    "none": [],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}

_KERNEL = re.compile(r"__global__\s+void\s+(__launch_bounds__\s*\(([^()]*)\)\s*)?(\w+)\s*\(")


def instrument(text, name):
    """`text` with CUEMU_CHECK_LAUNCH_BOUNDS(N) at the top of each kernel body."""
    out, pos = [], 0
    for match in _KERNEL.finditer(text):
        if match.group(1) is None:
            sys.exit(f"cuda_emu build: kernel {match.group(3)} in {name} has no __launch_bounds__")
        body = text.index("{", match.end())
        out.append(text[pos:body + 1])
        out.append(f" CUEMU_CHECK_LAUNCH_BOUNDS({match.group(2).strip()});")
        pos = body + 1
    out.append(text[pos:])
    return "".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--sanitize", choices=sorted(SANITIZERS), default="address")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--source-dir", type=pathlib.Path, default=CUDA_SOURCES,
                        help="where the .cu files come from (the mutation script passes a copy)")
    args = parser.parse_args()

    import torch
    from torch.utils import cpp_extension

    out = args.out.resolve()
    (out / "src").mkdir(parents=True, exist_ok=True)
    units = []
    for source in sorted(args.source_dir.glob("*.cu*")):  # .cu and .cuh: a copy's
        copy = out / "src" / source.name                   # includes resolve beside it
        text = instrument(source.read_text(), source.name)
        if not copy.exists() or copy.read_text() != text:
            copy.write_text(text)
        if source.suffix == ".cu":
            units.append(copy)
    units.append(HERE / "emulated_ops.cpp")

    abi = int(torch.compiled_with_cxx11_abi())
    flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-ffp-contract=off", "-Wno-unknown-pragmas",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DREGEXT_WITH_CUDA=1",
             f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{CUDA_SOURCES}"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    flags += SANITIZERS[args.sanitize]

    headers = sorted([*(out / "src").glob("*.cuh"), *(ROOT / "csrc").glob("*.h"),
                      *HERE.glob("*.h"), *(HERE / "include").rglob("*.h")])

    def compile_unit(src):
        obj = out / (src.stem + ".o")
        cmd = ["g++", *flags, "-x", "c++", "-c", str(src), "-o", str(obj)]
        key = hashlib.sha256("\0".join(cmd).encode())
        for path in [src, *headers]:
            key.update(path.read_bytes())
        stamp = out / (src.stem + ".key")
        if obj.exists() and stamp.exists() and stamp.read_text() == key.hexdigest():
            return obj
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"cuda_emu build: {src.name} failed:\n{result.stderr[-6000:]}")
        stamp.write_text(key.hexdigest())
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        objects = list(pool.map(compile_unit, units))
    lib = out / "regext_cuemu.so"
    torch_lib = pathlib.Path(torch.__file__).parent / "lib"
    subprocess.run(["g++", "-shared", *SANITIZERS[args.sanitize], *map(str, objects), "-o",
                    str(lib), f"-L{torch_lib}", "-ltorch_cpu", "-lc10",
                    f"-Wl,-rpath,{torch_lib}"], check=True)
    print(lib)


if __name__ == "__main__":
    main()
