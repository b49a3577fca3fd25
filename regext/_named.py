"""Turning "a module, named pairs, or plain tensors" into a checked list of (name, tensor)."""

import torch

from regext._validation import materialize_params


def _is_named_pair(item) -> bool:
    return (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor))


def named_tensors(func: str, source, *, require_names: bool = False, zero3=None) -> list:
    """[(name, tensor)] from an nn.Module, an iterable of (name, tensor) pairs, or
    (unless require_names) an iterable of tensors, which are named "0", "1", ....

    A module contributes ``module.named_parameters()``: a parameter shared by two
    submodules (tied weights) appears once. Element checks are those of
    ``materialize_params`` (TypeError naming the position); `zero3` as there.
    """
    named = True  # whether errors can name the tensors
    if isinstance(source, torch.nn.Module):
        items = list(source.named_parameters())
    else:
        if isinstance(source, torch.Tensor):
            if require_names:
                raise TypeError(
                    f"{func}: expected an nn.Module or (name, tensor) pairs, got a single "
                    f"Tensor (shape {tuple(source.shape)}, dtype {source.dtype}); pass "
                    f"[('weight', tensor)] (the name is what exclude patterns and errors "
                    f"use), or the module that holds it")
            materialize_params(func, source)  # raises the "single Tensor" TypeError
        try:
            items = list(source)
        except TypeError:
            raise TypeError(f"{func}: expected an nn.Module or an iterable of (name, tensor) "
                            f"pairs{'' if require_names else ' or of tensors'}, "
                            f"got {type(source).__name__}") from None
        if require_names:
            for i, item in enumerate(items):
                if not _is_named_pair(item):
                    raise TypeError(
                        f"{func}: element {i} is a {type(item).__name__}, not a (name, tensor) "
                        f"pair; pass a module, module.named_parameters(), or pairs such as "
                        f"[('weight', tensor)]")
        elif not (items and all(_is_named_pair(item) for item in items)):
            items = [(str(i), p) for i, p in enumerate(items)]
            named = False
    materialize_params(func, [p for _, p in items],
                       names=[n for n, _ in items] if named else None, zero3=zero3)
    return items
