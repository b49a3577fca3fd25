"""Penalty: which parameters are regularized, how strongly, computed once.

    pen = regext.Penalty(model, l1=1e-5, l2=1e-4, exclude=["*bias", "norm*"])
    loss = data_loss + pen()          # through autograd, or
    data_loss.backward(); pen.add_grad_()   # straight into p.grad
"""

import fnmatch
import warnings
from dataclasses import dataclass

import torch

from regext._dtensor import has_dtensor
from regext._named import named_tensors
from regext._validation import check_coefficient
from regext.grad import add_penalty_grad_checked
from regext.penalty import penalty_of_checked
from regext.prox import prox_group_l2_, prox_l1_, prox_l2_squared_

_OVERRIDE_KEYS = ("l1", "l2", "l2_squared")


@dataclass(frozen=True)
class PenaltyGroup:
    """Parameters that share coefficients: one fused call per group (and device)."""
    l1: float
    l2: float
    l2_squared: bool
    names: tuple
    params: tuple


def _as_patterns(func, arg, patterns):
    if isinstance(patterns, str):
        return (patterns,)
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise TypeError(f"{func}: {arg} must be a callable (name, param) -> bool or an "
                        f"iterable of glob patterns, got {type(patterns).__name__}") from None
    for i, pat in enumerate(patterns):
        if not isinstance(pat, str):
            raise TypeError(f"{func}: {arg}[{i}] is a {type(pat).__name__}, not a glob "
                            f"pattern string")
    return patterns


def _matcher(func, arg, spec):
    """(name, param) -> bool from a callable or glob patterns; plus the patterns."""
    if spec is None:
        return (lambda name, p: False), ()
    if callable(spec):
        return spec, ()
    patterns = _as_patterns(func, arg, spec)
    return (lambda name, p: any(fnmatch.fnmatchcase(name, pat) for pat in patterns)), patterns


def _warn_unmatched(func, arg, patterns, names):
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            warnings.warn(f"{func}: {arg} pattern {pat!r} matches no parameter name "
                          f"(names look like {names[0]!r})" if names else
                          f"{func}: {arg} pattern {pat!r} matches no parameter name",
                          stacklevel=3)


def _check_override(func, key, value):
    if not isinstance(value, dict):
        raise TypeError(f"{func}: overrides[{key!r}] must be a dict with keys among "
                        f"{_OVERRIDE_KEYS}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(_OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"{func}: overrides[{key!r}] has unknown keys {unknown}; "
                         f"allowed: {_OVERRIDE_KEYS}")


class Penalty:
    """An L1/L2 penalty over a chosen subset of a model's parameters, set up once.

    Args:
        module_or_named_params: an ``nn.Module`` (its ``named_parameters()``: tied
            weights appear once) or an iterable of ``(name, tensor)`` pairs.
        l1, l2, l2_squared: default coefficients, as in :func:`regext.fused_penalty`.
        exclude: parameters left out of the penalty. Either a callable
            ``(name, param) -> bool`` (True excludes), or one glob pattern or an
            iterable of them, matched with ``fnmatch`` against the full dotted name
            (``"*bias"`` matches ``"0.bias"`` and ``"head.bias"``; ``"norm*"`` matches
            only names that start with ``norm``; ``*`` also crosses dots, so
            ``"*norm*"`` matches a ``norm`` anywhere). A pattern that matches nothing
            warns. The usual "no decay on biases and norm layers" for most models:
            ``exclude=lambda name, p: p.ndim < 2``.
        overrides: per-group coefficients. A mapping ``{pattern: {"l1": ..., "l2": ...,
            "l2_squared": ...}}`` (any subset of the keys; the first pattern, in
            mapping order, that matches a name wins) or a callable
            ``(name, param) -> dict or None``. Parameters with equal coefficients are
            grouped, so the number of fused calls is the number of distinct settings.

    The selection and grouping are computed once; each call passes the cached lists
    to the fused operators. The parameter *objects* are cached, so moving the model
    with ``model.to(...)`` (which updates parameters in place) is fine, but
    parameters replaced or added after construction are not seen: build a new
    Penalty then, and build it after wrapping the model (FSDP2's ``fully_shard``
    replaces parameters with DTensors; those are supported, as in
    :func:`regext.fused_penalty`).

    Use:
        ``pen()``: the penalty as a differentiable 0-dim tensor (add it to the loss).
        ``pen.add_grad_()``: after ``loss.backward()``, add its gradient into
        ``p.grad`` (:func:`regext.add_penalty_grad_`); returns the detached value.
        ``pen.prox_(lr)``: the proximal step of the whole penalty for step size
        ``lr`` (after an optimizer step on the data loss alone).
        ``pen.named_parameters()``, ``pen.parameters()``, ``pen.names``,
        ``pen.excluded``, ``pen.groups``: what was selected, and how.
    """

    def __init__(self, module_or_named_params, l1=0.0, l2=0.0, *, l2_squared=False,
                 exclude=None, overrides=None):
        func = "Penalty"
        default = {"l1": check_coefficient(func, "l1", l1),
                   "l2": check_coefficient(func, "l2", l2),
                   "l2_squared": bool(l2_squared)}
        named = named_tensors(func, module_or_named_params, require_names=True)
        names = [n for n, _ in named]
        is_excluded, exclude_patterns = _matcher(func, "exclude", exclude)
        _warn_unmatched(func, "exclude", exclude_patterns, names)

        if overrides is None:
            override_for = lambda name, p: None  # noqa: E731
        elif callable(overrides):
            override_for = overrides
        elif isinstance(overrides, dict):
            for key, value in overrides.items():
                if not isinstance(key, str):
                    raise TypeError(f"{func}: overrides keys must be glob pattern strings, "
                                    f"got {type(key).__name__}")
                _check_override(func, key, value)
            _warn_unmatched(func, "overrides", tuple(overrides), names)
            items = tuple(overrides.items())

            def override_for(name, p):
                for pat, value in items:
                    if fnmatch.fnmatchcase(name, pat):
                        return value
                return None
        else:
            raise TypeError(f"{func}: overrides must be a dict {{pattern: {{'l1': ..., "
                            f"'l2': ...}}}} or a callable, got {type(overrides).__name__}")

        selected, excluded, groups = [], [], {}
        for name, p in named:
            if is_excluded(name, p):
                excluded.append(name)
                continue
            coefs = dict(default)
            override = override_for(name, p)
            if override is not None:
                _check_override(func, name, override)
                coefs.update(override)
                coefs = {"l1": check_coefficient(func, f"l1 of {name!r}", coefs["l1"]),
                         "l2": check_coefficient(func, f"l2 of {name!r}", coefs["l2"]),
                         "l2_squared": bool(coefs["l2_squared"])}
            selected.append((name, p))
            key = (coefs["l1"], coefs["l2"], coefs["l2_squared"])
            groups.setdefault(key, []).append((name, p))

        self._selected = tuple(selected)
        self._excluded = tuple(excluded)
        self._groups = tuple(
            PenaltyGroup(l1=k[0], l2=k[1], l2_squared=k[2], names=tuple(n for n, _ in members),
                         params=tuple(p for _, p in members))
            for k, members in groups.items())
        # What each call iterates over: plain lists, cheap to pass to the operators.
        self._calls = tuple((list(g.params), g.l1, g.l2, g.l2_squared) for g in self._groups)

    @staticmethod
    def _on_one_device(params):
        """Whether the (plain) tensors share a device: checked per call, as model.to()
        may move parameters after construction; DTensors take their own route."""
        first = params[0].device
        return all(p.device == first for p in params) and not has_dtensor(params)

    # -- the penalty ---------------------------------------------------------------

    def __call__(self):
        """The penalty over the selected parameters, differentiable (0-dim tensor)."""
        total = None
        for params, l1, l2, l2_squared in self._calls:
            if not params:
                continue
            # The parameters were checked when the Penalty was built.
            value = penalty_of_checked(params, l1, l2, l2_squared, self._on_one_device(params))
            total = value if total is None else total + value.to(total.device)
        return torch.zeros(()) if total is None else total

    def add_grad_(self):
        """``p.grad += d(penalty)/dp`` in place for the selected parameters that
        require grad (see :func:`regext.add_penalty_grad_`); returns the detached value."""
        total = None
        for params, l1, l2, l2_squared in self._calls:
            value = add_penalty_grad_checked("Penalty.add_grad_", params, l1, l2, l2_squared)
            total = value if total is None else total + value.to(total.device)
        return torch.zeros(()) if total is None else total

    def prox_(self, lr):
        """The proximal step of ``lr ×`` this penalty, in place, per group:

        * L1 part: soft-thresholding by ``lr·l1`` (:func:`regext.prox_l1_`), which
          makes exact zeros;
        * then the L2 part: group shrinkage by ``lr·l2``
          (:func:`regext.prox_group_l2_`), or for ``l2_squared`` the decay
          ``x / (1 + 2·lr·l2)`` (:func:`regext.prox_l2_squared_`).

        That is the exact proximal map of ``lr·(l1‖x‖₁ + l2‖x‖₂)`` (sparse group
        lasso) or of ``lr·(l1‖x‖₁ + l2‖x‖₂²)`` (elastic net) for each tensor. Use it
        after an optimizer step on the data loss *without* the penalty
        (proximal gradient descent); ``lr`` should be the optimizer's step size.
        """
        lr = check_coefficient("Penalty.prox_", "lr", lr)
        for params, l1, l2, l2_squared in self._calls:
            if l1 > 0.0:
                prox_l1_(params, lr * l1)
            if l2 > 0.0:
                (prox_l2_squared_ if l2_squared else prox_group_l2_)(params, lr * l2)

    # -- inspection ----------------------------------------------------------------

    def named_parameters(self):
        """The selected ``(name, parameter)`` pairs, in the module's order (a list)."""
        return list(self._selected)

    def parameters(self):
        """The selected parameters, in the module's order (a list)."""
        return [p for _, p in self._selected]

    @property
    def names(self):
        """Names of the selected parameters."""
        return tuple(n for n, _ in self._selected)

    @property
    def excluded(self):
        """Names of the parameters left out."""
        return self._excluded

    @property
    def groups(self):
        """The :class:`PenaltyGroup` s: coefficients, names and parameters of each."""
        return self._groups

    def __len__(self):
        return len(self._selected)

    def __repr__(self):
        numel = sum(p.numel() for _, p in self._selected)
        groups = ", ".join(f"(l1={g.l1:g}, l2={g.l2:g}{', squared' if g.l2_squared else ''}: "
                           f"{len(g.params)} tensors)" for g in self._groups)
        return (f"Penalty({len(self._selected)} tensors, {numel} elements, "
                f"{len(self._excluded)} excluded; groups: [{groups}])")
