"""The operator table (tests/op_samples.py) against the library: every operator has
an entry, kernels for CPU, CUDA and Meta, and in-place autograd handling exactly
when its schema writes an argument."""

import pytest
import torch

import regext  # noqa: F401  (loads the operators)

from op_samples import OPS


def regext_operators():
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("regext::"))


def written_arguments(name):
    schema = getattr(torch.ops.regext, name).default._schema
    return tuple(i for i, a in enumerate(schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


def test_the_table_names_every_operator():
    assert sorted(OPS) == regext_operators()


@pytest.mark.parametrize("name", sorted(OPS))
def test_written_arguments_match_the_schema(name):
    assert OPS[name].mutated == written_arguments(name)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_operator_has_cpu_cuda_and_meta_kernels(name):
    for key in ("CPU", "CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"regext::{name}", key), key


@pytest.mark.parametrize("name", sorted(OPS))
def test_in_place_autograd_kernels_exactly_for_the_schemas_that_write(name):
    """csrc/inplace_autograd.cpp's kInplaceOps must list every `(a!)` schema, and
    only those (a missing one would not bump version counters)."""
    qualified = f"regext::{name}"
    for key in ("Autograd", "ADInplaceOrView"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)
        assert has == bool(written_arguments(name)), (name, key)
