"""Build regext's compiled operator library, regext._C.

The C++ operators and CPU kernels (csrc/, csrc/cpu/) are always built. The CUDA
kernels (csrc/cuda/) are built when torch has CUDA and either a GPU is visible
or FORCE_CUDA=1; then a usable nvcc (CUDA_HOME, or nvcc on PATH) is required,
and its absence is an error that says what to install. FORCE_CUDA=0 builds
without them. A build without CUDA kernels raises one clear error for CUDA
tensors (csrc/cuda_missing/).

TORCH_CUDA_ARCH_LIST picks the GPU architectures. Unset, it is the visible GPU's
when there is one, else every architecture the installed torch was built for,
with PTX for the newest, so that regext runs wherever that torch runs. Each
must be sm_70 or newer, and nvcc 12.1 or newer: the kernels pass up to 1000
tensors in a 32,008-byte kernel argument, which needs both (and a driver of
R530 or later).

REGEXT_SANITIZE=1 builds the C++ with AddressSanitizer and
UndefinedBehaviorSanitizer at -O1 (.ci/sanitize runs it).
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import setup

MIN_NVCC = (12, 1)
MIN_ARCH = (7, 0)
KERNEL_ARGUMENT_BYTES = 32008


class CudaBuildError(RuntimeError):
    """CUDA kernels are wanted but cannot be built here; the message says what to do."""


def env_flag(env, name):
    """True / False for a set switch ("1", "true", ... / "0", "false", ...), None if unset."""
    value = env.get(name)
    if value is None or value == "":
        return None
    return value.lower() in ("1", "true", "yes", "on")


def cuda_decision(env, *, torch_cuda, torch_hip, gpu_visible, nvcc_version):
    """Whether to build the CUDA kernels, and why: (bool, reason).

    torch_cuda / torch_hip: torch.version.cuda / torch.version.hip; nvcc_version:
    (major, minor) of the nvcc that torch found, or None when there is none.
    Raises CudaBuildError when they are wanted (FORCE_CUDA=1, or a visible GPU
    and FORCE_CUDA unset) but cannot be built.
    """
    forced = env_flag(env, "FORCE_CUDA")
    if forced is False:
        return False, "FORCE_CUDA=0"
    if torch_hip is not None:
        if forced:
            raise CudaBuildError("FORCE_CUDA=1, but this torch is a ROCm build and regext has no "
                                 "HIP kernels; unset FORCE_CUDA to build the CPU kernels")
        return False, "ROCm torch (regext has no HIP kernels)"
    if torch_cuda is None:
        if forced:
            raise CudaBuildError("FORCE_CUDA=1, but this torch has no CUDA support; install a "
                                 "CUDA build of torch (pip install torch) first")
        return False, "torch has no CUDA support"
    if not (forced or gpu_visible):
        return False, "no GPU visible and FORCE_CUDA is not set"
    why = "FORCE_CUDA=1" if forced else "a GPU is visible"
    if nvcc_version is None:
        raise CudaBuildError(
            f"{why}, but no CUDA compiler was found: install the CUDA toolkit "
            f"(nvcc {MIN_NVCC[0]}.{MIN_NVCC[1]} or newer, ideally {torch_cuda} like this torch) "
            f"and set CUDA_HOME to it, or build without CUDA kernels with FORCE_CUDA=0")
    if tuple(nvcc_version) < MIN_NVCC:
        raise CudaBuildError(
            f"nvcc {nvcc_version[0]}.{nvcc_version[1]} is too old: regext's kernels take a "
            f"{KERNEL_ARGUMENT_BYTES}-byte argument, which needs nvcc {MIN_NVCC[0]}.{MIN_NVCC[1]} or "
            f"newer; install a newer CUDA toolkit or build with FORCE_CUDA=0")
    return True, why


def parse_arch(item):
    """'8.6' or '8.6+PTX' or 'sm_86' -> ((8, 6), ptx: bool)."""
    item = item.strip()
    ptx = item.endswith("+PTX")
    digits = item[:-4] if ptx else item
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)", digits)
    if match is None:
        raise CudaBuildError(f"cannot read the CUDA architecture {item!r} "
                             f"(expected e.g. '9.0' or '8.6+PTX')")
    return (int(match.group(1)), int(match.group(2))), ptx


def arch_list(env, *, torch_arch_flags, gpu_visible, nvcc_archs):
    """The TORCH_CUDA_ARCH_LIST to build for, or None to let torch use the visible GPU's.

    torch_arch_flags: torch's own compile flags ('sm_75 sm_80 ... compute_90');
    nvcc_archs: the (major, minor) that `nvcc --list-gpu-arch` names, or None if
    unknown. Raises CudaBuildError for an architecture regext cannot run on.
    """
    requested = env.get("TORCH_CUDA_ARCH_LIST")
    if not requested:
        if gpu_visible:
            return None
        archs = sorted({parse_arch(f)[0] for f in (torch_arch_flags or "").split()
                        if f.startswith("sm_")})
        if nvcc_archs is not None:
            archs = [a for a in archs if a in nvcc_archs]
        if not archs:
            raise CudaBuildError("no GPU is visible and this torch names no architecture this "
                                 "nvcc can build; set TORCH_CUDA_ARCH_LIST (e.g. '9.0')")
        items = [f"{a[0]}.{a[1]}" for a in archs]
        items[-1] += "+PTX"
        requested = ";".join(items)
    for item in re.split(r"[;\s]+", requested.strip()):
        arch, _ = parse_arch(item)
        if arch < MIN_ARCH:
            raise CudaBuildError(
                f"TORCH_CUDA_ARCH_LIST names {item}, but regext's kernels take a "
                f"{KERNEL_ARGUMENT_BYTES}-byte argument, which needs sm_{MIN_ARCH[0]}{MIN_ARCH[1]} "
                f"or newer; remove it")
        if nvcc_archs is not None and arch not in nvcc_archs:
            raise CudaBuildError(f"TORCH_CUDA_ARCH_LIST names {item}, which this nvcc cannot "
                                 f"build (`nvcc --list-gpu-arch`)")
    return requested


def _nvcc(cuda_home, *args):
    if cuda_home is None:
        return None
    try:
        return subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), *args], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def nvcc_version(cuda_home):
    out = _nvcc(cuda_home, "--version")
    match = re.search(r"release (\d+)\.(\d+)", out or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def nvcc_archs(cuda_home):
    out = _nvcc(cuda_home, "--list-gpu-arch")
    if not out:
        return None
    return {(int(m.group(1)), int(m.group(2))) for m in re.finditer(r"compute_(\d+)(\d)", out)}


def extension():
    import torch
    from torch.utils import cpp_extension

    env = os.environ
    root = os.path.dirname(os.path.abspath(__file__))
    gpu_visible = torch.version.cuda is not None and torch.cuda.is_available()
    use_cuda, why = cuda_decision(env, torch_cuda=torch.version.cuda, torch_hip=torch.version.hip,
                                  gpu_visible=gpu_visible,
                                  nvcc_version=nvcc_version(cpp_extension.CUDA_HOME))

    def sources(*patterns):
        return sorted(os.path.relpath(f, root) for p in patterns
                      for f in glob.glob(os.path.join(root, p)))

    files = sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    if use_cuda:
        files += sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu")
        archs = arch_list(env, torch_arch_flags=torch._C._cuda_getArchFlags(),
                          gpu_visible=gpu_visible, nvcc_archs=nvcc_archs(cpp_extension.CUDA_HOME))
        if archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        why += f"; architectures {archs or 'of the visible GPU'}"
    else:
        files += sources("csrc/cuda_missing/*.cpp")

    sanitize = env_flag(env, "REGEXT_SANITIZE")
    # -ffp-contract=off: every instruction-set variant of the CPU loops must round alike.
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel`; without the
    # flag it silently runs on one thread. The libgomp torch loaded is reused.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-psabi"]
    link = ["-fopenmp"]
    if sanitize:
        # -fno-wrapv: Python's own CFLAGS (which setuptools puts first) carry -fwrapv,
        # which defines signed overflow and so silently switches off UBSan's
        # signed-integer-overflow check. float-cast-overflow is not part of
        # -fsanitize=undefined in GCC.
        checks = "-fsanitize=address,undefined,float-cast-overflow"
        cxx = ["-O1", "-g", "-fopenmp", "-ffp-contract=off", "-fno-omit-frame-pointer",
               "-fno-wrapv", checks, "-fno-sanitize-recover=undefined,float-cast-overflow"]
        link.append(checks)
    compile_args = {"cxx": cxx}
    if use_cuda:
        compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]

    print(f"regext: building {'CPU + CUDA' if use_cuda else 'CPU only'} ({why}); "
          f"sanitizers {'on' if sanitize else 'off'}; sources: {' '.join(files)}",
          file=sys.stderr)
    builder = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    return builder(
        name="regext._C",
        sources=files,
        extra_compile_args=compile_args,
        extra_link_args=link,
        define_macros=[("REGEXT_WITH_CUDA", "1" if use_cuda else "0"),
                       ("Py_LIMITED_API", "0x030A0000")],
        py_limited_api=True,
    )


if __name__ == "__main__":
    from torch.utils.cpp_extension import BuildExtension

    try:
        ext = extension()
    except CudaBuildError as e:
        sys.exit(f"regext: cannot build the CUDA kernels: {e}")
    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
