// How the in-place operators (penalty_grad_accumulate_,
// penalty_forward_accumulate_, the prox_* steps) meet autograd.
//
// Operators declared with TORCH_LIBRARY get dispatcher fallthroughs for the
// autograd keys: an in-place call would neither bump the version counter of
// what it writes (so a tensor saved for backward and then modified would give
// silently wrong gradients) nor refuse to modify a leaf that requires grad.
// torch's boxed "not implemented" fallbacks only handle mutated *returns*;
// these operators mutate a list argument (and return nothing, or results that
// are not differentiable), so the two kernels below do the same job for
// mutated arguments:
//   Autograd:        with grad mode on, a mutated tensor that requires grad is an
//                    error (run under torch.no_grad(), as the Python API does).
//   ADInplaceOrView: after the kernel, bump the version of every mutated tensor
//                    (also inside torch.inference_mode for normal tensors).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <vector>

namespace regext {
namespace {

// fn(tensor) for every tensor of every argument the schema marks as written.
template <typename Fn>
void for_each_mutated(const c10::OperatorHandle& op, const torch::jit::Stack* stack, Fn&& fn) {
  const auto& args = op.schema().arguments();
  const size_t start = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = (*stack)[start + i];
    if (value.isTensor()) {
      fn(value.toTensor());
    } else if (value.isTensorList()) {
      for (const c10::IValue& item : value.toListRef()) fn(item.toTensor());
    }
  }
}

void inplace_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                      torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    size_t index = 0;
    for_each_mutated(op, stack, [&](const at::Tensor& t) {
      TORCH_CHECK(!t.requires_grad(), op.schema().name(), ": cannot modify tensor ", index,
                  " in place: it requires grad and grad mode is on. Call it under "
                  "torch.no_grad() (the regext Python functions do).");
      ++index;
    });
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void inplace_bump_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  // Collected before the call: the arguments are popped off the stack by it.
  std::vector<at::Tensor> mutated;
  for_each_mutated(op, stack, [&](const at::Tensor& t) { mutated.push_back(t); });
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : mutated) t.unsafeGetTensorImpl()->bump_version();
}

constexpr const char* kInplaceOps[] = {
    "penalty_grad_accumulate_", "penalty_forward_accumulate_",    "prox_l1_",
    "prox_group_l2_",           "group_penalty_grad_accumulate_", "prox_group_lasso_",
    "prox_metric_",             "prox_group_metric_"};

}  // namespace

TORCH_LIBRARY_IMPL(regext, Autograd, m) {
  for (const char* name : kInplaceOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&inplace_autograd>());
  }
}

TORCH_LIBRARY_IMPL(regext, ADInplaceOrView, m) {
  for (const char* name : kInplaceOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&inplace_bump_versions>());
  }
}

}  // namespace regext
