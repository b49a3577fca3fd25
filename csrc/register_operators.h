// Registers the operator layer for one backend; each backend's registration
// file calls it inside TORCH_LIBRARY_IMPL(regext, <its dispatch key>, m).
#pragma once

#include <torch/library.h>

#include "group_ops.h"
#include "penalty_ops.h"
#include "prox_ops.h"

namespace regext {

template <typename Backend>
void register_operators(torch::Library& m) {
  m.impl("penalty_forward", &penalty_forward<Backend>);
  m.impl("penalty_backward", &penalty_backward<Backend>);
  m.impl("penalty_grad_accumulate_", &penalty_grad_accumulate_<Backend>);
  m.impl("penalty_forward_accumulate_", &penalty_forward_accumulate_<Backend>);
  m.impl("prox_l1_", &prox_l1_<Backend>);
  m.impl("prox_group_l2_", &prox_group_l2_<Backend>);
  m.impl("prox_metric_", &prox_metric_<Backend>);
  m.impl("count_zeros", &count_zeros<Backend>);
  m.impl("group_penalty_forward", &group_penalty_forward<Backend>);
  m.impl("group_penalty_backward", &group_penalty_backward<Backend>);
  m.impl("group_penalty_grad_accumulate_", &group_penalty_grad_accumulate_<Backend>);
  m.impl("prox_group_lasso_", &prox_group_lasso_<Backend>);
  m.impl("prox_group_metric_", &prox_group_metric_<Backend>);
}

}  // namespace regext
