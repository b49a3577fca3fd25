"""Penalty: which parameters are regularized, how strongly, computed fused.

    pen = regext.Penalty(model, l1=1e-5, l2=1e-4, exclude=["*bias", "norm*"])
    loss = data_loss + pen()          # through autograd, or
    data_loss.backward(); pen.add_grad_()   # straight into p.grad
"""

import fnmatch
import numbers
import warnings

import torch

from regext import _groups, distributed
from regext._dtensor import has_dtensor
from regext._named import named_tensors
from regext._validation import (SUPPORTED_DTYPES, check_coefficient, check_writable,
                                coefficient, materialize_params)
from regext.grad import add_penalty_grad_checked
from regext.penalty import penalty_of_checked, raise_if_nonfinite
from regext.prox import prox_group_l2_checked, prox_l1_checked, prox_l2_squared_checked

_OVERRIDE_KEYS = ("l1", "l2", "l2_squared", "group", "group_weight")
_SUPPORTED = frozenset(SUPPORTED_DTYPES)


def _check_spec(func, name, value):
    """A coefficient as a Penalty stores it: a number (checked now, kept as float), a
    0-dim floating-point tensor, or a callable step -> number or tensor (checked
    when it is called)."""
    if callable(value) and not isinstance(value, torch.Tensor):
        return value
    if isinstance(value, torch.Tensor):
        return coefficient(func, name, value)
    if torch.compiler.is_compiling():
        return value  # possibly a traced variable: checked when it becomes a coefficient
    return check_coefficient(func, name, value)


class PenaltyGroup:
    """Parameters that share coefficients: one fused call per group (and device).

    ``l1`` and ``l2`` read the group's coefficient: its override, or the Penalty's
    own ``l1`` / ``l2`` when it has none. Assigning one sets the group's override
    (a number, a 0-dim tensor or a callable ``step -> value``); assigning None makes
    the group follow the Penalty's again.
    """

    def __init__(self, penalty, l1, l2, l2_squared, grouping, names, params):
        self._penalty = penalty
        self._l1, self._l2 = l1, l2
        self.l2_squared = l2_squared
        self.grouping = grouping  # regext._groups.Grouping: group and group_weight
        self.names = names
        self.params = params

    @property
    def l1(self):
        return self._penalty.l1 if self._l1 is None else self._l1

    @l1.setter
    def l1(self, value):
        self._l1 = None if value is None else _check_spec("Penalty", "l1", value)

    @property
    def l2(self):
        return self._penalty.l2 if self._l2 is None else self._l2

    @l2.setter
    def l2(self, value):
        self._l2 = None if value is None else _check_spec("Penalty", "l2", value)

    def __repr__(self):
        return (f"PenaltyGroup(l1={_show(self.l1)}, l2={_show(self.l2)}, "
                f"l2_squared={self.l2_squared}{_show_grouping(self.grouping)}, "
                f"{len(self.params)} tensors)")


def _show_grouping(grouping):
    if grouping.per_tensor:
        return ""
    weight = ", group_weight='sqrt_size'" if grouping.sqrt_size else ""
    return f", group={grouping.kind!r}{weight}"


def _source(override, *keys):
    """Where a Penalty setting came from, for error messages."""
    return "its override" if override and any(k in override for k in keys) else \
        "the Penalty's defaults"


def _show(spec):
    if isinstance(spec, numbers.Real):
        return f"{spec:g}"
    if isinstance(spec, torch.Tensor):
        return "tensor"
    return getattr(spec, "__name__", "schedule")


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


def _aliases(source):
    """{alias name: canonical name} for tied parameters of a module: the names that
    module.named_parameters() drops because the tensor appeared under another one."""
    if not isinstance(source, torch.nn.Module):
        return {}
    canonical, aliases = {}, {}
    for name, p in source.named_parameters(remove_duplicate=False):
        first = canonical.setdefault(id(p), name)
        if first != name:
            aliases[name] = first
    return aliases


def _warn_unmatched(func, arg, patterns, names, aliases, excluded_too=()):
    for pat in patterns:
        if any(fnmatch.fnmatchcase(n, pat) for n in names):
            continue
        tied = [(a, c) for a, c in aliases.items() if fnmatch.fnmatchcase(a, pat)]
        if tied:
            for alias, name in tied:
                if name in excluded_too:
                    continue
                warnings.warn(f"{func}: {arg} pattern {pat!r} matches {alias!r}, an alias of "
                              f"{name!r} (tied weights: the module lists the tensor once, as "
                              f"{name!r}); it stays {'penalized' if arg == 'exclude' else 'as it is'} "
                              f"unless {name!r} is matched too", stacklevel=3)
            continue
        warnings.warn(f"{func}: {arg} pattern {pat!r} matches no parameter name"
                      + (f" (names look like {names[0]!r})" if names else ""), stacklevel=3)


def _check_override(func, key, value):
    if not isinstance(value, dict):
        raise TypeError(f"{func}: overrides[{key!r}] must be a dict with keys among "
                        f"{_OVERRIDE_KEYS}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(_OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"{func}: overrides[{key!r}] has unknown keys {unknown}; "
                         f"allowed: {_OVERRIDE_KEYS}")


def _override_function(func, overrides, names, aliases):
    """(name, param) -> dict or None, from a mapping of patterns or a callable."""
    if overrides is None:
        return lambda name, p: None
    if callable(overrides):
        return overrides
    if not isinstance(overrides, dict):
        raise TypeError(f"{func}: overrides must be a dict {{pattern: {{'l1': ..., "
                        f"'l2': ...}}}} or a callable, got {type(overrides).__name__}")
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise TypeError(f"{func}: overrides keys must be glob pattern strings, "
                            f"got {type(key).__name__}")
        _check_override(func, key, value)
    _warn_unmatched(func, "overrides", tuple(overrides), names, aliases)
    items = tuple(overrides.items())

    def override_for(name, p):
        for pat, value in items:
            if fnmatch.fnmatchcase(name, pat):
                return value
        return None
    return override_for


class Penalty:
    """An L1/L2 penalty over a chosen subset of a model's parameters.

    Args:
        module_or_named_params: an ``nn.Module`` (its ``named_parameters()``: tied
            weights appear once) or an iterable of ``(name, tensor)`` pairs.
        l1, l2, l2_squared: default coefficients, as in :func:`regext.fused_penalty`.
            ``l1`` and ``l2`` may also be callables ``step -> value`` (schedules,
            evaluated at ``pen.step``), and can be changed between calls
            (``pen.l1 = 1e-4``); groups without their own value follow them.
        exclude: parameters left out of the penalty. Either a callable
            ``(name, param) -> bool`` (True excludes), or one glob pattern or an
            iterable of them, matched with ``fnmatch`` against the full dotted name
            (``"*bias"`` matches ``"0.bias"`` and ``"head.bias"``; ``"norm*"`` matches
            only names that start with ``norm``; ``*`` also crosses dots, so
            ``"*norm*"`` matches a ``norm`` anywhere). A pattern that matches nothing
            warns; one that matches only the alias of a tied weight warns that the
            tensor, listed under its first name, stays penalized. The usual "no decay on
            biases and norm layers" for most models: ``exclude=lambda name, p: p.ndim < 2``.
        group, group_weight: default groups of the L2 norm, as in
            :func:`regext.fused_penalty` (``"tensor"``, ``"row"`` or ``"column"``; ``None``
            or ``"sqrt_size"``): e.g. ``group="row"`` with ``exclude=lambda n, p: p.ndim
            < 2`` puts a group lasso on every neuron and filter.
        overrides: per-group settings. A mapping ``{pattern: {"l1": ..., "l2": ...,
            "l2_squared": ..., "group": ..., "group_weight": ...}}`` (any subset of the
            keys; the first pattern, in
            mapping order, that matches a name wins) or a callable
            ``(name, param) -> dict or None``. Parameters with equal overrides are
            grouped, so the number of fused calls is the number of distinct settings.
        error_if_nonfinite: as in :func:`regext.fused_penalty`, for ``pen()`` and
            ``pen.add_grad_()`` (one host synchronization per call when on).

    Frozen parameters: the selection is fixed at construction, but each call leaves
    out the parameters that do not require grad at that moment: they add nothing to
    the value, get no gradient and are never modified by ``prox_``, as an optimizer's
    weight decay leaves frozen layers alone. Unfreezing one brings it back.

    The selection and grouping are computed once. The parameter *objects* are
    cached, so moving the model with ``model.to(...)`` (which updates parameters in
    place) is fine, but parameters replaced or added after construction are not
    seen: build a new Penalty then, and build it after wrapping the model (FSDP2's
    ``fully_shard`` replaces parameters with DTensors; those are supported, as in
    :func:`regext.fused_penalty`). Errors name the parameter (``'emb.weight'``).

    Use:
        ``pen()``: the penalty as a differentiable 0-dim tensor (add it to the loss).
        ``pen.add_grad_()``: after ``loss.backward()``, add its gradient into
        ``p.grad`` (:func:`regext.add_penalty_grad_`); returns the detached value.
        ``pen.prox_(lr)``: the proximal step of the whole penalty for step size
        ``lr`` (after an optimizer step on the data loss alone).
        ``pen.named_parameters()``, ``pen.parameters()``, ``pen.names``,
        ``pen.excluded``, ``pen.groups``: what was selected, and how.
        ``pen.step``: the step number schedules are evaluated at (an int, 0 at first;
        advanced by :meth:`attach`'s optimizer hooks, or set it yourself).
    """

    def __init__(self, module_or_named_params, l1=0.0, l2=0.0, *, l2_squared=False,
                 group="tensor", group_weight=None, exclude=None, overrides=None,
                 error_if_nonfinite=False):
        func = "Penalty"
        self.l1 = l1
        self.l2 = l2
        self.l2_squared = bool(l2_squared)
        _groups.grouping(func, group, group_weight)  # the names, checked now
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self.step = 0
        named = named_tensors(func, module_or_named_params, require_names=True)
        names = [n for n, _ in named]
        aliases = _aliases(module_or_named_params)
        is_excluded, exclude_patterns = _matcher(func, "exclude", exclude)
        override_for = _override_function(func, overrides, names, aliases)

        selected, excluded, groups = [], [], {}
        for name, p in named:
            if is_excluded(name, p):
                excluded.append(name)
                continue
            coefs = {"l1": None, "l2": None, "l2_squared": self.l2_squared, "group": group,
                     "group_weight": group_weight}
            override = override_for(name, p)
            if override is not None:
                _check_override(func, name, override)
                for key in ("l1", "l2"):
                    if key in override:
                        coefs[key] = _check_spec(func, f"{key} of {name!r}", override[key])
                if "l2_squared" in override:
                    coefs["l2_squared"] = bool(override["l2_squared"])
                for key in ("group", "group_weight"):
                    coefs[key] = override.get(key, coefs[key])
            if p.dim() < 2 and coefs["l2_squared"]:
                coefs["group"] = "tensor"  # one group anyway: no conflict with the squared form
            coefs["grouping"] = _groups.grouping(
                f"{func}: parameter {name!r} (group={coefs['group']!r} and group_weight="
                f"{coefs['group_weight']!r} from {_source(override, 'group', 'group_weight')}, "
                f"l2_squared={coefs['l2_squared']} from {_source(override, 'l2_squared')})",
                coefs["group"], coefs["group_weight"], coefs["l2_squared"])
            selected.append((name, p))
            key = tuple(id(v) if callable(v) or isinstance(v, torch.Tensor) else v
                        for v in (coefs["l1"], coefs["l2"], coefs["l2_squared"],
                                  coefs["grouping"]))
            groups.setdefault(key, (coefs, []))[1].append((name, p))
        _warn_unmatched(func, "exclude", exclude_patterns, names, aliases, set(excluded))

        self._selected = tuple(selected)
        self._excluded = tuple(excluded)
        self._groups = tuple(
            PenaltyGroup(self, coefs["l1"], coefs["l2"], coefs["l2_squared"], coefs["grouping"],
                         tuple(n for n, _ in members), tuple(p for _, p in members))
            for coefs, members in groups.values())
        # Decided once: whether a group holds DTensors (FSDP2), which take their own path.
        self._sharded = tuple(has_dtensor(g.params) for g in self._groups)
        for g, sharded in zip(self._groups, self._sharded):
            if sharded:
                distributed.check_per_tensor(f"Penalty ({g.names[0]!r})", g.grouping)

    # -- coefficients ----------------------------------------------------------------

    @property
    def l1(self):
        """The default L1 coefficient: a number, a 0-dim tensor or a callable step -> value."""
        return self._l1

    @l1.setter
    def l1(self, value):
        self._l1 = _check_spec("Penalty", "l1", value)

    @property
    def l2(self):
        """The default L2 coefficient, as ``l1``."""
        return self._l2

    @l2.setter
    def l2(self, value):
        self._l2 = _check_spec("Penalty", "l2", value)

    def _coefficient(self, name, spec):
        """A coefficient's value now, as the operators take it (a 0-dim tensor)."""
        if callable(spec) and not isinstance(spec, torch.Tensor):
            spec = spec(self.step)
        return coefficient("Penalty", name, spec)

    def _active(self, func, group):
        """(the group's parameters that require grad now, their names, whether they
        share one device). The parameters were checked at construction; their dtype or
        layout may have changed since (model.half() is fine, a sparse one is not)."""
        params, names = [], []
        first = None
        same_device = True
        for name, p in zip(group.names, group.params):
            if not p.requires_grad:
                continue
            if p.dtype not in _SUPPORTED or p.layout is not torch.strided:
                materialize_params(func, [p], names=[name])  # raises, naming it
            if first is None:
                first = p.device
            elif p.device != first:
                same_device = False
            params.append(p)
            names.append(name)
        return params, names, same_device

    def _calls(self, func, only=None):
        """(group, active params, their names, same device, l1, l2) for every group
        with at least one active parameter (among `only`, a set of ids, if given)."""
        for group, sharded in zip(self._groups, self._sharded):
            params, names, same_device = self._active(func, group)
            if only is not None:
                kept = [(p, n) for p, n in zip(params, names) if id(p) in only]
                params, names = [p for p, _ in kept], [n for _, n in kept]
            if params:
                yield (group, params, names, same_device and not sharded,
                       self._coefficient("l1", group.l1), self._coefficient("l2", group.l2))

    # -- the penalty ---------------------------------------------------------------

    def __call__(self):
        """The penalty over the selected parameters that require grad, differentiable
        (a 0-dim tensor)."""
        total = None
        for group, params, names, same_device, l1, l2 in self._calls("Penalty"):
            value = penalty_of_checked(params, l1, l2, group.l2_squared, same_device,
                                       group.grouping, func="Penalty", names=names)
            if self.error_if_nonfinite:
                raise_if_nonfinite("Penalty", value, params, l1, l2, group.l2_squared, names)
            total = value if total is None else total + value.to(total.device)
        return torch.zeros(()) if total is None else total

    def add_grad_(self, *, scale=None):
        """``p.grad += d(penalty)/dp`` in place for the selected parameters that
        require grad (see :func:`regext.add_penalty_grad_`); returns the detached value.

        ``scale`` (a number or 0-dim tensor) multiplies the gradient added, for
        gradients that are still scaled by an AMP loss scale (:meth:`attach` passes a
        fused optimizer's ``grad_scale``).
        """
        func = "Penalty.add_grad_"
        total = None
        for group, params, names, _, l1, l2 in self._calls(func):
            if scale is not None:
                l1, l2 = l1 * scale, l2 * scale
            value = add_penalty_grad_checked(func, params, l1, l2, group.l2_squared, names=names,
                                             error_if_nonfinite=self.error_if_nonfinite,
                                             grouping=group.grouping)
            total = value if total is None else total + value.to(total.device)
        return torch.zeros(()) if total is None else total

    def prox_(self, lr, *, only=None):
        """The proximal step of ``lr ×`` this penalty, in place, per group:

        * L1 part: soft-thresholding by ``lr·l1`` (:func:`regext.prox_l1_`), which
          makes exact zeros;
        * then the L2 part: group shrinkage by ``lr·l2`` of every group (the whole
          tensor, or each row or column with ``group=``; :func:`regext.prox_group_l2_`),
          or for ``l2_squared`` the decay
          ``x / (1 + 2·lr·l2)`` (:func:`regext.prox_l2_squared_`).

        That is the exact proximal map of ``lr·(l1‖x‖₁ + l2‖x‖₂)`` (sparse group
        lasso) or of ``lr·(l1‖x‖₁ + l2‖x‖₂²)`` (elastic net) for each group (Simon et al. 2013). Use it
        after an optimizer step on the data loss *without* the penalty
        (proximal gradient descent); ``lr`` should be the optimizer's step size (a
        number or a 0-dim tensor). Parameters that do not require grad are left alone;
        ``only`` (a set of ``id(parameter)``) restricts the step to those parameters
        (:meth:`attach` steps each optimizer group with its own learning rate).
        """
        func = "Penalty.prox_"
        lr = coefficient(func, "lr", lr)
        for group, params, names, _, l1, l2 in self._calls(func, only):
            self._prox_group(func, group, params, names, lr, l1, l2)

    def _prox_group(self, func, group, params, names, lr, l1, l2):
        check_writable(func, params, names)
        if _maybe_positive(l1):
            prox_l1_checked(params, lr * l1)
        if _maybe_positive(l2):
            if group.l2_squared:
                prox_l2_squared_checked(params, lr * l2)
            else:
                prox_group_l2_checked(func, params, lr * l2, names, group.grouping)

    # -- training loops ------------------------------------------------------------

    def attach(self, optimizer, mode="grad", *, warmup_steps=0):
        """Applies this penalty at every ``optimizer.step()``; returns a handle whose
        ``remove()`` detaches it (training is then exactly as without regext).

        * ``mode="grad"``: before each step, ``pen.add_grad_()`` adds the penalty's
          gradient to ``.grad`` (in the gradients' current AMP scale, see below).
        * ``mode="prox"``: after each step, the proximal step of the penalty with each
          parameter's own learning rate at that step (its param group's ``lr``, so LR
          schedulers and per-group rates are honoured): soft-thresholding for L1, group
          shrinkage for the Euclidean L2, multiplicative decay for ``l2_squared``
          (decoupled weight decay).

        ``pen.step`` advances by one at each optimizer step and is what schedules
        (callable coefficients) see; for the first ``warmup_steps`` steps the penalty is
        not applied. Only real optimizer steps count, so gradient accumulation works.
        Frozen parameters are left alone (see the class docstring); every parameter the
        Penalty selects must be in the optimizer (ValueError naming it otherwise);
        optimizer parameters the Penalty does not select are left alone.

        AMP (``torch.amp.GradScaler``): ``scaler.step(optimizer)`` unscales the
        gradients and calls ``step()``, or skips it when they hold inf/NaN; then no
        hook runs and no penalty is applied. Fused optimizers (``fused=True``) unscale
        inside ``step()``, which runs even when the update is skipped: grad mode adds
        the gradient times ``optimizer.grad_scale``, and prox mode multiplies its
        learning rates by ``found_inf == 0``, on the device, without synchronizing.
        Works with torch.optim SGD, Adam and AdamW, foreach and fused; see
        :class:`regext.optim.PenaltyAttachment`.
        """
        from regext.optim import PenaltyAttachment
        return PenaltyAttachment(self, optimizer, mode, warmup_steps)

    def state_dict(self):
        """The state a resumed run needs: ``step`` and the coefficients (numbers and
        tensors; a callable schedule is code, kept by the new Penalty's constructor)."""
        return {"step": self.step, "l1": _saved(self._l1), "l2": _saved(self._l2),
                "groups": [{"l1": _saved(g._l1), "l2": _saved(g._l2)} for g in self._groups]}

    def load_state_dict(self, state):
        """Restores :meth:`state_dict`'s state into a Penalty built the same way."""
        if len(state["groups"]) != len(self._groups):
            raise ValueError(f"Penalty.load_state_dict: the state has {len(state['groups'])} "
                             f"groups but this Penalty has {len(self._groups)}; build it with "
                             f"the same selection and overrides")
        self.step = int(state["step"])
        for key in ("l1", "l2"):
            if not _is_schedule(state[key]):
                setattr(self, key, state[key])
        for group, saved in zip(self._groups, state["groups"]):
            for key in ("l1", "l2"):
                if not _is_schedule(saved[key]):
                    setattr(group, key, saved[key])

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
        groups = ", ".join(f"(l1={_show(g.l1)}, l2={_show(g.l2)}"
                           f"{', squared' if g.l2_squared else ''}{_show_grouping(g.grouping)}: "
                           f"{len(g.params)} tensors)"
                           for g in self._groups)
        return (f"Penalty({len(self._selected)} tensors, {numel} elements, "
                f"{len(self._excluded)} excluded; groups: [{groups}])")


_SCHEDULE = "schedule"  # a callable in a state dict


def _is_schedule(saved):
    return isinstance(saved, str) and saved == _SCHEDULE


def _saved(spec):
    if isinstance(spec, torch.Tensor):
        return spec.detach().clone()
    return _SCHEDULE if callable(spec) else spec


def _maybe_positive(c):
    """False only for a coefficient known to be zero without reading a device value
    (a CPU tensor's value is read: no synchronization)."""
    if c.device.type == "cpu" and not torch.compiler.is_compiling():
        return bool(c != 0)
    return True
