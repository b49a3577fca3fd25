"""setup.py's decisions, with a faked environment: whether to build the CUDA
kernels, and for which architectures. (A CUDA torch without nvcc used to build a
CPU-only regext silently; a build without a GPU defaulted to sm_80 and sm_90 only.)
"""

import importlib.util
import os

import pytest
import torch

import regext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: its `setup()` call runs only as __main__."""
    spec = importlib.util.spec_from_file_location("regext_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decide(setup_py, env, torch_cuda="13.0", torch_hip=None, gpu=False, nvcc=(13, 0)):
    return setup_py.cuda_decision(env, torch_cuda=torch_cuda, torch_hip=torch_hip,
                                  gpu_visible=gpu, nvcc_version=nvcc)


def test_cpu_only_without_a_gpu_or_request(setup_py):
    assert decide(setup_py, {}) == (False, "no GPU visible and FORCE_CUDA is not set")
    assert decide(setup_py, {}, torch_cuda=None, gpu=True) == (False, "torch has no CUDA support")
    assert decide(setup_py, {"FORCE_CUDA": "0"}, gpu=True) == (False, "FORCE_CUDA=0")


def test_cuda_when_forced_or_a_gpu_is_visible(setup_py):
    assert decide(setup_py, {"FORCE_CUDA": "1"}) == (True, "FORCE_CUDA=1")
    assert decide(setup_py, {}, gpu=True) == (True, "a GPU is visible")


@pytest.mark.parametrize("env, gpu", [({"FORCE_CUDA": "1"}, False), ({}, True)])
def test_wanted_without_nvcc_is_an_error_that_says_what_to_install(setup_py, env, gpu):
    with pytest.raises(setup_py.CudaBuildError, match=r"no CUDA compiler was found: install "
                                                      r"the CUDA toolkit \(nvcc 12.1 or newer, "
                                                      r"ideally 13.0 like this torch\) and set "
                                                      r"CUDA_HOME"):
        decide(setup_py, env, gpu=gpu, nvcc=None)


def test_an_old_nvcc_names_the_limit(setup_py):
    with pytest.raises(setup_py.CudaBuildError, match=r"nvcc 11.8 is too old: .* 32008-byte "
                                                      r"argument, which needs nvcc 12.1"):
        decide(setup_py, {"FORCE_CUDA": "1"}, nvcc=(11, 8))


def test_rocm_torch(setup_py):
    assert decide(setup_py, {}, torch_hip="6.2", gpu=True)[0] is False
    with pytest.raises(setup_py.CudaBuildError, match="ROCm build"):
        decide(setup_py, {"FORCE_CUDA": "1"}, torch_hip="6.2")
    with pytest.raises(setup_py.CudaBuildError, match="no CUDA support"):
        decide(setup_py, {"FORCE_CUDA": "1"}, torch_cuda=None)


TORCH_FLAGS = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 compute_120"
NVCC_ARCHS = {(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)}


def test_default_architectures_are_torch_s_own_with_ptx_for_the_newest(setup_py):
    got = setup_py.arch_list({}, torch_arch_flags=TORCH_FLAGS, gpu_visible=False,
                             nvcc_archs=NVCC_ARCHS)
    assert got == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    # One this nvcc cannot build is left out rather than failing the build.
    got = setup_py.arch_list({}, torch_arch_flags=TORCH_FLAGS, gpu_visible=False,
                             nvcc_archs=NVCC_ARCHS - {(12, 0)})
    assert got == "7.5;8.0;8.6;9.0;10.0+PTX"
    # A visible GPU: torch's extension builder targets it.
    assert setup_py.arch_list({}, torch_arch_flags=TORCH_FLAGS, gpu_visible=True,
                              nvcc_archs=NVCC_ARCHS) is None


def test_requested_architectures_are_checked(setup_py):
    env = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}
    assert setup_py.arch_list(env, torch_arch_flags=TORCH_FLAGS, gpu_visible=False,
                              nvcc_archs=NVCC_ARCHS) == "8.0;9.0+PTX"
    with pytest.raises(setup_py.CudaBuildError, match=r"names 6.1, but .* 32008-byte argument, "
                                                      r"which needs sm_70 or newer"):
        setup_py.arch_list({"TORCH_CUDA_ARCH_LIST": "6.1;8.0"}, torch_arch_flags=TORCH_FLAGS,
                           gpu_visible=False, nvcc_archs=NVCC_ARCHS)
    with pytest.raises(setup_py.CudaBuildError, match=r"names 10.3, which this nvcc cannot"):
        setup_py.arch_list({"TORCH_CUDA_ARCH_LIST": "10.3"}, torch_arch_flags=TORCH_FLAGS,
                           gpu_visible=False, nvcc_archs=NVCC_ARCHS)


def test_a_build_without_cuda_kernels_raises_one_clear_error_for_cuda_tensors():
    """The CUDA dispatch key of a build without kernels (csrc/cuda_missing): reached
    here by redispatching CPU tensors to it, as a CUDA tensor would be."""
    if regext.cuda_available():
        pytest.skip("this build has the CUDA kernels")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    params = [torch.randn(3)]
    zero = torch.zeros((), dtype=torch.float64)
    for op, args in [("penalty_forward", (params, zero, zero, False)),
                     ("prox_l1_", (params, zero)), ("count_zeros", (params,))]:
        with pytest.raises(RuntimeError, match=r"this build has no CUDA kernels "
                                               r"\(regext.cuda_available\(\) is False\).*"
                                               r"FORCE_CUDA=1 pip install --no-build-isolation"):
            getattr(torch.ops.regext, op).default.redispatch(keys, *args)
