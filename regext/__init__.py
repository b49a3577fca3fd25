"""regext: fused L1/L2 weight penalties for PyTorch.

    loss = loss + regext.fused_penalty(model.parameters(), l1, l2)

computes l1 * sum ||p||_1 + l2 * sum ||p||_2 over every parameter in one pass
(one kernel launch per device and dtype on GPU), with gradients in one more.
"""

import torch

# Load the compiled operator library first: it defines torch.ops.regext.*,
# which the fake kernels below attach to.
from regext import _C
from regext import _meta  # noqa: F401
from regext import reference
from regext.grad import add_penalty_grad_
from regext.no_decay import no_decay_names
from regext.penalty import fused_penalty
from regext.prox import prox_group_l2_, prox_l1_, prox_l2_squared_
from regext.selection import Penalty, PenaltyGroup
from regext.sparsity import SparsityReport, TensorSparsity, sparsity, sparsity_report

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled into this build (setup.py says why not).

    Without them every regext operator raises one RuntimeError for CUDA tensors."""
    return bool(_C.with_cuda)


def cpu_capability() -> str:
    """The instruction set of the CPU kernels in use: ``"default"``, ``"avx2"`` or
    ``"avx512"``. The best the CPU supports, unless REGEXT_CPU_CAPABILITY (read once,
    when regext is imported) asks for another, as ATEN_CPU_CAPABILITY does for ATen.
    Every variant gives bitwise identical results."""
    return _C.cpu_capability()


__all__ = ["fused_penalty", "add_penalty_grad_", "Penalty", "PenaltyGroup", "prox_l1_",
           "prox_group_l2_", "prox_l2_squared_", "sparsity", "sparsity_report", "SparsityReport",
           "TensorSparsity", "no_decay_names", "reference", "cuda_available", "cpu_capability", "__version__"]
