// Built instead of csrc/cuda when regext has no CUDA kernels (setup.py): a CUDA
// tensor that reaches any regext operator gets this one error, after the
// operator's argument checks, instead of the dispatcher's "Could not run".
#include <c10/util/Exception.h>

#include "../register_operators.h"

namespace regext {
namespace {

[[noreturn]] void no_cuda_kernels() {
  TORCH_CHECK(false,
              "regext: this build has no CUDA kernels (regext.cuda_available() is False), so it "
              "cannot run on CUDA tensors. Rebuild it with the CUDA toolkit's nvcc on PATH or "
              "CUDA_HOME set: FORCE_CUDA=1 pip install --no-build-isolation -e . "
              "(setup.py says why it built without CUDA)");
}

// A backend whose every kernel raises that error.
struct MissingCudaBackend {
  static constexpr bool kSamePassSquaredAccumulate = false;
  static at::Tensor empty_like_dense(const at::Tensor&) { no_cuda_kernels(); }
  static void stats_and_total(at::ArrayRef<at::Tensor>, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, bool) {
    no_cuda_kernels();
  }
  static void grads(const GradRequest&) { no_cuda_kernels(); }
  static void prox_l1(at::ArrayRef<at::Tensor>, const at::Tensor&) { no_cuda_kernels(); }
  static void prox_group_l2(at::ArrayRef<at::Tensor>, const at::Tensor&, const at::Tensor&) {
    no_cuda_kernels();
  }
  static void prox_metric(at::ArrayRef<at::Tensor>, at::ArrayRef<at::Tensor>,
                          at::ArrayRef<at::Tensor>, const at::Tensor&) {
    no_cuda_kernels();
  }
  static void count_zeros(at::ArrayRef<at::Tensor>, const at::Tensor&) { no_cuda_kernels(); }
  static void group_stats_and_total(at::ArrayRef<at::Tensor>, at::ArrayRef<GroupLayout>,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&) {
    no_cuda_kernels();
  }
  static void group_grads(const GroupGradRequest&) { no_cuda_kernels(); }
  static void prox_group_lasso(at::ArrayRef<at::Tensor>, at::ArrayRef<GroupLayout>,
                               const at::Tensor&) {
    no_cuda_kernels();
  }
  static void prox_group_metric(at::ArrayRef<at::Tensor>, at::ArrayRef<at::Tensor>,
                                at::ArrayRef<at::Tensor>, at::ArrayRef<GroupLayout>,
                                const at::Tensor&) {
    no_cuda_kernels();
  }
};

}  // namespace
}  // namespace regext

TORCH_LIBRARY_IMPL(regext, CUDA, m) { regext::register_operators<regext::MissingCudaBackend>(m); }
