"""torch.library.opcheck on every regext operator (schema, fake kernel, autograd
registration, aliasing), on every sample of tests/op_samples.py."""

import pytest
import torch

import regext  # noqa: F401  (loads the operators)

from conftest import DEVICES
from op_samples import cases, clone_args, sample


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, index", cases())
def test_opcheck(name, index, device):
    torch.library.opcheck(getattr(torch.ops.regext, name).default,
                          clone_args(sample(name, index, device)))
