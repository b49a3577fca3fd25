"""Build regext's compiled operator library, regext._C.

The C++ sources in csrc/ (schemas and CPU kernels) are always built. The CUDA
kernels in csrc/cuda are added when torch was built with CUDA and either a GPU
is visible or FORCE_CUDA=1 is set; TORCH_CUDA_ARCH_LIST picks the targets
(default when no GPU is visible: sm_80 and sm_90). REGEXT_SANITIZE=1 builds
the C++ with AddressSanitizer and UndefinedBehaviorSanitizer at -O1 (see
.ci/sanitize for how to run it: libasan must be preloaded into Python).
"""

import glob
import os
import sys

from setuptools import setup

# torch locates the CUDA toolkit once, at import, from CUDA_HOME or `which nvcc`.
# A wrapper script on PATH (as /usr/local/bin/nvcc on some machines) would make
# it look for libcudart in /usr/local/lib; prefer the real toolkit directory.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            break

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if torch.version.cuda is None:
        return False, "torch has no CUDA support"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if _flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    return False, "no GPU visible and FORCE_CUDA is not set"


def _extension():
    sanitize = _flag("REGEXT_SANITIZE")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    use_cuda, why = _want_cuda()
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    # -ffp-contract=off: every ISA clone of the CPU loops must round alike.
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel`; without the
    # flag it silently runs on one thread. The libgomp torch loaded is reused.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-psabi"]
    if sanitize:
        # -fno-wrapv: Python's own CFLAGS (which setuptools puts first) carry -fwrapv,
        # which defines signed overflow and so silently switches off UBSan's
        # signed-integer-overflow check. float-cast-overflow is not part of
        # -fsanitize=undefined in GCC.
        cxx = ["-O1", "-g", "-fopenmp", "-fno-omit-frame-pointer", "-fno-wrapv",
               "-fsanitize=address,undefined,float-cast-overflow",
               "-fno-sanitize-recover=undefined,float-cast-overflow",
               "-DREGEXT_NO_TARGET_CLONES"]
    extra_compile_args = {"cxx": cxx}
    extra_link_args = ["-fopenmp"] + (
        ["-fsanitize=address,undefined,float-cast-overflow"] if sanitize else [])
    define_macros = []
    if use_cuda:
        define_macros.append(("REGEXT_WITH_CUDA", "1"))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr",
                                      "-lineinfo", "--fmad=false"]

    print(f"regext: building {'CPU + CUDA' if use_cuda else 'CPU only'} ({why}); "
          f"sanitizers {'on' if sanitize else 'off'}; sources: {' '.join(sources)}",
          file=sys.stderr)
    builder = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    return builder(
        name="regext._C",
        sources=sources,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        define_macros=define_macros,
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
