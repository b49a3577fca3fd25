"""Penalty: which parameters are regularized, how strongly, computed fused.

    pen = regext.Penalty(model, l1=1e-5, l2=1e-4, exclude=["*bias", "norm*"])
    loss = data_loss + pen()          # through autograd, or
    data_loss.backward(); pen.add_grad_()   # straight into p.grad
"""

import fnmatch
import numbers
import warnings

import torch

from regext import _fastpath, _groups, no_decay
from regext._dtensor import has_dtensor
from regext._engines import check_whole, distributed_active
from regext._named import named_tensors
from regext._nonfinite import checked_total
from regext._validation import (SUPPORTED_DTYPES, check_coefficient, check_writable,
                                coefficient, materialize_params)
from regext.grad import add_penalty_grad_checked
from regext.penalty import penalty_fast, penalty_of_checked
from regext.prox import (metric_of, prox_group_l2_checked, prox_group_l2_metric_checked,
                         prox_l1_checked, prox_l2_squared_checked, prox_metric_checked, zero_like)

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
        self._penalty._schedules_changed()

    @property
    def l2(self):
        return self._penalty.l2 if self._l2 is None else self._l2

    @l2.setter
    def l2(self, value):
        self._l2 = None if value is None else _check_spec("Penalty", "l2", value)
        self._penalty._schedules_changed()

    def _spec_and_slot(self, key, index):
        """(the coefficient spec, its schedule slot in the Penalty): the group's own
        override (slot ``key@index``) or the Penalty's default (slot ``key``)."""
        own = getattr(self, "_" + key)
        if own is None:
            return getattr(self._penalty, key), key
        return own, f"{key}@{index}"

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


def _matcher(func, arg, spec, source=None):
    """(name, param) -> bool from a callable or glob patterns; plus the patterns. With
    `source` (the Penalty's module or pairs), the pattern "no_decay" is the preset
    of regext.no_decay."""
    if spec is None:
        return (lambda name, p: False), ()
    if callable(spec):
        return spec, ()
    patterns = _as_patterns(func, arg, spec)
    if source is not None and no_decay.PRESET in patterns:
        patterns = tuple(pat for pat in patterns if pat != no_decay.PRESET)
        preset = no_decay.no_decay_names(source)
        return (lambda name, p: name in preset
                or any(fnmatch.fnmatchcase(name, pat) for pat in patterns)), patterns
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
        folded = next((n for n in names if fnmatch.fnmatch(n.lower(), pat.lower())), None)
        if folded is not None:
            hint = (f"; patterns are case-sensitive, and it would match {folded!r} ignoring "
                    f"case" + ("" if arg != "exclude" else
                               "; exclude='no_decay' leaves out biases and norm layers "
                               "whatever their names"))
        else:
            hint = f" (names look like {names[0]!r})" if names else ""
        warnings.warn(f"{func}: {arg} pattern {pat!r} matches no parameter name{hint}",
                      stacklevel=3)


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
            iterable of them, matched with ``fnmatch.fnmatchcase`` (case-sensitive)
            against the full dotted name (``"*bias"`` matches ``"0.bias"`` and
            ``"head.bias"``; ``"norm*"`` matches only names that start with ``norm``;
            ``*`` also crosses dots, so ``"*norm*"`` matches a ``norm`` anywhere, but not
            ``LayerNorm``). The pattern ``"no_decay"`` is the preset of
            :mod:`regext.no_decay`: biases, every tensor with ``ndim <= 1``, the
            parameters of normalization layers (any name) and the model's
            ``no_weight_decay()`` names, as the Hugging Face Trainer and timm leave
            them out of weight decay; it combines with other patterns
            (``exclude=["no_decay", "*.pos_embed"]``). A pattern that matches nothing
            warns (naming a name it would match ignoring case); one that matches only
            the alias of a tied weight warns that the tensor, listed under its first
            name, stays penalized.
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
        # Schedules' latest values for compiled code, by slot ("l1", "l2@3"); filled
        # once a compiled call has met a schedule (see _coefficient).
        self._schedule_values = {}
        self._schedules_compiled = False
        self._step = 0
        self._groups = ()
        self.l1 = l1
        self.l2 = l2
        self.l2_squared = bool(l2_squared)
        _groups.grouping(func, group, group_weight)  # the names, checked now
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self._attachment = None
        named = named_tensors(func, module_or_named_params, require_names=True)
        names = [n for n, _ in named]
        aliases = _aliases(module_or_named_params)
        is_excluded, exclude_patterns = _matcher(
            func, "exclude", exclude,
            module_or_named_params if isinstance(module_or_named_params, torch.nn.Module)
            else named)
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

    # -- coefficients ----------------------------------------------------------------

    @property
    def l1(self):
        """The default L1 coefficient: a number, a 0-dim tensor or a callable step -> value."""
        return self._l1

    @l1.setter
    def l1(self, value):
        self._l1 = _check_spec("Penalty", "l1", value)
        self._schedules_changed()

    @property
    def l2(self):
        """The default L2 coefficient, as ``l1``."""
        return self._l2

    @l2.setter
    def l2(self, value):
        self._l2 = _check_spec("Penalty", "l2", value)
        self._schedules_changed()

    def _schedules_changed(self):
        if self._schedules_compiled:
            self._refresh_schedule_values()

    @property
    def step(self):
        """The step number schedules are evaluated at: an int, 0 at first, advanced by
        :meth:`attach`'s hooks at every optimizer step, or set by hand."""
        return self._step

    @step.setter
    def step(self, value):
        self._step = value
        self._schedules_changed()

    def _schedule_slots(self):
        """(slot, name, spec) of every callable coefficient: the defaults and the
        groups' overrides."""
        specs = [("l1", "l1", self._l1), ("l2", "l2", self._l2)]
        for i, g in enumerate(self._groups):
            specs += [(f"l1@{i}", "l1", g._l1), (f"l2@{i}", "l2", g._l2)]
        return [(slot, name, spec) for slot, name, spec in specs if _is_callable(spec)]

    @torch.compiler.disable
    def _refresh_schedule_values(self):
        """Evaluates every schedule at the current step, eagerly, into the tensors that
        compiled calls read (in place: a graph, compiled or CUDA-captured, that read
        them sees the new values)."""
        for slot, name, spec in self._schedule_slots():
            self._hold_schedule_value(slot, coefficient("Penalty", name, spec(self._step)))

    def _hold_schedule_value(self, slot, value):
        held = self._schedule_values.get(slot)
        value = value.detach()
        if held is not None and held.device == value.device and held.dtype == value.dtype:
            held.copy_(value)
        else:
            self._schedule_values[slot] = value.clone()

    def _coefficient(self, name, spec, slot):
        """A coefficient's value now, as the operators take it (a 0-dim tensor).

        A schedule is evaluated at ``self.step`` in eager code. Compiled code must not
        read the step (Dynamo would guard on the int and recompile at every step), so
        the first compiled call that meets a schedule traces it once and switches the
        Penalty to holding every schedule's value in a tensor, refreshed eagerly
        whenever ``step`` is set; later compiled calls read those tensors (one more
        compilation, then none: issue 20, item 3).
        """
        if not _is_callable(spec):
            return coefficient("Penalty", name, spec)
        if torch.compiler.is_compiling():
            held = self._schedule_values.get(slot)
            if held is not None:
                return held
            self._schedules_compiled = True
            return coefficient("Penalty", name, spec(self._step))
        value = coefficient("Penalty", name, spec(self._step))
        if self._schedules_compiled:
            self._hold_schedule_value(slot, value)
        return value

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
        if distributed_active():  # an engine may have sharded them since construction
            check_whole(func, params, names.__getitem__)
        return params, names, same_device

    def _calls(self, func, only=None):
        """(group, active params, their names, same device, l1, l2) for every group
        with at least one active parameter (among `only`, a set of ids, if given)."""
        for i, (group, sharded) in enumerate(zip(self._groups, self._sharded)):
            params, names, same_device = self._active(func, group)
            if only is not None:
                kept = [(p, n) for p, n in zip(params, names) if id(p) in only]
                params, names = [p for p, _ in kept], [n for _, n in kept]
            if params:
                yield (group, params, names, same_device and not sharded,
                       self._coefficient("l1", *group._spec_and_slot("l1", i)),
                       self._coefficient("l2", *group._spec_and_slot("l2", i)))

    # -- the penalty ---------------------------------------------------------------

    def __call__(self):
        """The penalty over the selected parameters that require grad, differentiable
        (a 0-dim tensor)."""
        fast = self._fast_total()
        if fast is not None:
            return fast
        total = None
        for group, params, names, same_device, l1, l2 in self._calls("Penalty"):
            value = penalty_of_checked(params, l1, l2, group.l2_squared, same_device,
                                       group.grouping, func="Penalty", names=names)
            if self.error_if_nonfinite:
                value = checked_total("Penalty", value, params, l1, l2, group.l2_squared, names)
            total = value if total is None else total + value.to(total.device)
        return torch.zeros(()) if total is None else total

    def add_grad_(self, *, scale=None):
        """``p.grad += d(penalty)/dp`` in place for the selected parameters that
        require grad (see :func:`regext.add_penalty_grad_`); returns the detached value.

        ``scale`` (a number or 0-dim tensor) multiplies the gradient added, for
        gradients that are still scaled by an AMP loss scale (:meth:`attach` passes a
        fused optimizer's ``grad_scale``).
        """
        fast = self._fast_add_grad(scale)
        if fast is not None:
            return fast
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

    # -- the per-call fast path (regext._fastpath) ----------------------------------

    def _fast_calls(self):
        """[(group, its parameters that require grad, l1, l2)] for the groups with any,
        when every group can take the fast path (per-tensor penalty, no DTensors, no
        error_if_nonfinite, open_now()); else None. No per-parameter checks here: the
        operators make them, and the general path runs if they refuse."""
        if self.error_if_nonfinite or not _fastpath.open_now():
            return None
        calls = []
        for i, (group, sharded) in enumerate(zip(self._groups, self._sharded)):
            if sharded or not group.grouping.per_tensor:
                return None
            params = [p for p in group.params if p.requires_grad]
            if params:
                calls.append((group, params, self._fast_coefficient("l1", group, i),
                              self._fast_coefficient("l2", group, i)))
        return calls

    def _fast_coefficient(self, name, group, index):
        spec, slot = group._spec_and_slot(name, index)
        cached = _fastpath.number_coefficient(spec)
        return cached if cached is not None else self._coefficient(name, spec, slot)

    def _fast_total(self):
        """pen()'s value on the fast path, or None for the general path."""
        calls = self._fast_calls()
        if calls is None:
            return None
        total = None
        for group, params, l1, l2 in calls:
            value = penalty_fast(params, l1, l2, group.l2_squared)
            if value is None:
                return None  # refused: the general path checks and names the problem
            total = value if total is None else total + value.to(total.device)
        return torch.zeros(()) if total is None else total

    def _fast_add_grad(self, scale):
        """add_grad_ on the fast path when one group has parameters and all of them
        have a .grad (the usual step); None for the general path. One operator call:
        it checks every tensor before writing any, so nothing is half-written."""
        calls = self._fast_calls()
        if calls is None or len(calls) != 1:
            return None
        group, params, l1, l2 = calls[0]
        grads = _fastpath.existing_grads(params)
        if grads is None:
            return None
        if scale is not None:
            l1, l2 = l1 * scale, l2 * scale
        return _fastpath.accumulate_penalty_grad(params, grads, l1, l2, group.l2_squared)

    def prox_(self, lr, *, only=None, metric=None):
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

        ``metric``: None for the Euclidean step above, or the optimizer that has just
        stepped these parameters: the same proximal map in that optimizer's diagonal
        metric (Adam, AdamW, Adagrad, RMSprop; see :func:`regext.prox_l1_`), which is
        what :meth:`attach` does by default. The L1 and squared-L2 parts are one fused
        pass over each parameter and its optimizer state; the group lasso part is one
        more fused pass (:func:`regext.prox_group_l2_`). The composition is exact
        in the metric too: its soft-thresholding, then its group step, is the proximal
        map of the sum.
        """
        func = "Penalty.prox_"
        lr = coefficient(func, "lr", lr)
        metric = metric_of(func, metric)
        if metric is not None:  # every parameter held, before any is stepped
            for _, params, names, _, _, _ in self._calls(func, only):
                metric.check_holds(func, params, names)
        for group, params, names, _, l1, l2 in self._calls(func, only):
            self._prox_group(func, group, params, names, lr, l1, l2, metric)

    def _prox_group(self, func, group, params, names, lr, l1, l2, metric=None):
        check_writable(func, params, names)
        if metric is not None:
            l1_on, l2_on = _maybe_positive(l1), _maybe_positive(l2)
            ridge = l2_on and group.l2_squared
            if l1_on or ridge:
                zero = zero_like(lr)
                prox_metric_checked(func, params, metric, lr * l1 if l1_on else zero,
                                    2.0 * lr * l2 if ridge else zero, names)
            if l2_on and not group.l2_squared:
                prox_group_l2_metric_checked(func, params, metric, lr * l2, names,
                                             group.grouping)
            return
        if _maybe_positive(l1):
            prox_l1_checked(params, lr * l1)
        if _maybe_positive(l2):
            if group.l2_squared:
                prox_l2_squared_checked(params, lr * l2)
            else:
                prox_group_l2_checked(func, params, lr * l2, names, group.grouping)

    # -- training loops ------------------------------------------------------------

    def attach(self, optimizer, mode="grad", *, warmup_steps=0, metric="auto"):
        """Applies this penalty at every ``optimizer.step()``; returns a handle whose
        ``remove()`` detaches it (training is then exactly as without regext).

        * ``mode="grad"``: before each step, ``pen.add_grad_()`` adds the penalty's
          gradient to ``.grad`` (in the gradients' current AMP scale, see below).
        * ``mode="prox"``: after each step, the proximal step of the penalty with each
          parameter's own learning rate at that step (its param group's ``lr``, so LR
          schedulers and per-group rates are honoured): soft-thresholding for L1, group
          shrinkage for the Euclidean L2, multiplicative decay for ``l2_squared``
          (decoupled weight decay), taken in the metric ``metric`` names:

          - ``"auto"`` (default): the optimizer's own diagonal metric where regext
            knows it (Adam, AdamW, Adagrad, RMSprop, their subclasses; foreach, fused,
            capturable, amsgrad, per-group hyperparameters): coordinate i is
            soft-thresholded at ``lr·l1/denom_i``, ``denom`` being what the optimizer
            divides its update by, so that ``l1`` means the same under every
            optimizer (at equilibrium a weight is zero iff its loss gradient is below
            ``l1``). SGD's metric is the Euclidean one (the step is unchanged). Any
            other optimizer: the Euclidean step, with a warning naming it, once.
          - ``"optimizer"``: the same, but an optimizer regext does not know raises
            ValueError.
          - ``"euclidean"``: the Euclidean step (``lr·l1`` for every coordinate)
            whatever the optimizer, as before regext knew the metrics.

          See :meth:`prox_` (``metric=``) for what is fused, and the documentation's
          training-loop page ("When to use which metric") for when to use which.

        ``pen.step`` advances by one at each optimizer step and is what schedules
        (callable coefficients) see; for the first ``warmup_steps`` steps the penalty is
        not applied. Only real optimizer steps count, so gradient accumulation works.
        Frozen parameters are left alone (see the class docstring); every parameter the
        Penalty selects that requires grad must be in the optimizer (ValueError naming
        it otherwise);
        optimizer parameters the Penalty does not select are left alone.

        AMP (``torch.amp.GradScaler``): ``scaler.step(optimizer)`` unscales the
        gradients and calls ``step()``, or skips it when they hold inf/NaN; then no
        hook runs and no penalty is applied. Fused optimizers (``fused=True``) unscale
        inside ``step()``, which runs even when the update is skipped: grad mode adds
        the gradient times ``optimizer.grad_scale``, and prox mode multiplies its
        learning rates by ``found_inf == 0``, on the device, without synchronizing.
        Works with torch.optim SGD, Adam and AdamW, foreach and fused; see
        :class:`regext.optim.PenaltyAttachment`.

        ``optimizer.step(closure)`` (LBFGS, and Lightning's automatic optimization,
        which steps every optimizer with a closure): in grad mode the penalty gradient
        is added after *every* evaluation of the closure (the closure zeroes the
        gradients, so one added before it would be lost), and the closure's loss is
        returned with the penalty value added (LBFGS compares those losses).
        Wrappers that hold the real optimizer as ``.optimizer`` (accelerate's
        ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) are unwrapped:
        the hooks go on the optimizer that really steps.

        A Penalty has at most one active attachment: attaching again before
        ``remove()`` raises RuntimeError (it would apply the penalty twice per step).

        Raises:
            ValueError: an unknown ``mode`` or ``metric``, a bad ``warmup_steps``, a
                selected parameter the optimizer does not hold (named), ``metric=
                "optimizer"`` with an optimizer regext does not know, or a ``metric``
                other than ``"auto"`` in grad mode (which has no metric).
            TypeError: ``optimizer`` is neither a torch.optim.Optimizer nor a wrapper
                holding one (an LR scheduler is named as such).
            RuntimeError: the Penalty is already attached.
        """
        from regext.optim import PenaltyAttachment
        current = self._attachment
        if current is not None and current.active:
            raise RuntimeError(
                f"Penalty.attach: this Penalty is already attached ({current!r}); a second "
                f"attachment would apply it twice per step and advance pen.step twice. Attach "
                f"once, before the training loop, or call remove() on the handle that attach "
                f"returned before attaching again")
        self._attachment = PenaltyAttachment(self, optimizer, mode, warmup_steps, metric)
        return self._attachment

    def state_dict(self):
        """The state a resumed run needs: ``step`` and the coefficients (numbers, and
        copies of tensors; a callable schedule is code, kept by the new Penalty's
        constructor, and saved as the string ``"schedule"``)."""
        return {"step": self.step, "l1": _saved(self._l1), "l2": _saved(self._l2),
                "groups": [{"l1": _saved(g._l1), "l2": _saved(g._l2)} for g in self._groups]}

    def load_state_dict(self, state):
        """Restores :meth:`state_dict`'s state into a Penalty built the same way.

        As ``nn.Module.load_state_dict`` does with parameters, a coefficient tensor the
        Penalty holds keeps its identity: the saved value is copied into it (converted
        to its dtype and device), so a schedule that updates it in place, and a
        compiled or CUDA-captured graph that read it, see the restored value. Nothing
        of the state dict is shared with the Penalty, or between two Penalties loaded
        from one state dict. Where the Penalty holds a number (or a group has no
        override), the saved number, or a copy of the saved tensor, takes its place;
        schedules (code) stay as built.
        Everything is checked before anything is changed.

        Raises:
            ValueError: the state does not fit this Penalty: another number of
                groups, a missing key, a negative or non-finite number or step, or a
                schedule on one side and a value on the other.
            TypeError: a saved tensor that is not 0-dim floating point.
        """
        func = "Penalty.load_state_dict"
        missing = [k for k in ("step", "l1", "l2", "groups") if k not in state]
        if missing:
            raise ValueError(f"{func}: the state has no {missing[0]!r} entry (keys: "
                             f"{sorted(state)}); pass what Penalty.state_dict() returned")
        if len(state["groups"]) != len(self._groups):
            raise ValueError(f"{func}: the state has {len(state['groups'])} "
                             f"groups but this Penalty has {len(self._groups)}; build it with "
                             f"the same selection and overrides")
        step = state["step"]
        if isinstance(step, torch.Tensor):
            step = step.item()
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"{func}: step must be an int >= 0, got {state['step']!r}")
        updates = [_restored(func, key, getattr(self, key), state[key],
                             lambda v, key=key: setattr(self, key, v))
                   for key in ("l1", "l2")]
        for i, (group, saved) in enumerate(zip(self._groups, state["groups"])):
            for key in ("l1", "l2"):
                updates.append(_restored(func, f"groups[{i}].{key} ({group.names[0]!r}...)",
                                         getattr(group, "_" + key), saved.get(key),
                                         lambda v, g=group, key=key: setattr(g, key, v)))
        for update in updates:
            update()
        self.step = int(step)

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


def _kind(spec):
    if spec is None:
        return "no override"
    if _is_schedule(spec) or _is_callable(spec):
        return "a schedule"
    return "a tensor" if isinstance(spec, torch.Tensor) else "a number"


def _restored(func, where, held, saved, assign):
    """A checked, not yet applied, restore of one coefficient: a function that does it.
    A tensor held is updated in place (the saved value copied in); otherwise the
    saved value is assigned, a tensor as a copy. Schedules are code: neither side may
    be one unless both are."""
    if (_kind(held) == "a schedule") != (_kind(saved) == "a schedule"):
        raise ValueError(f"{func}: {where} is {_kind(saved)} in the state but {_kind(held)} in "
                         f"this Penalty; build the Penalty as the one that was saved (a "
                         f"schedule is code: pass it to the constructor again)")
    if _kind(held) == "a schedule":
        return lambda: None
    if saved is None:
        return lambda: assign(None)
    if isinstance(saved, torch.Tensor):
        coefficient(func, where, saved)  # 0-dim floating point, or TypeError
    else:
        saved = check_coefficient(func, where, saved)
    if isinstance(held, torch.Tensor):
        def copy_in():
            with torch.no_grad():
                held.copy_(saved)
        return copy_in
    copy = saved.detach().clone() if isinstance(saved, torch.Tensor) else saved
    return lambda: assign(copy)


def _saved(spec):
    if isinstance(spec, torch.Tensor):
        return spec.detach().clone()
    return _SCHEDULE if callable(spec) else spec


def _is_callable(spec):
    return callable(spec) and not isinstance(spec, torch.Tensor)


def _maybe_positive(c):
    """False only for a coefficient known to be zero without reading a device value
    (a CPU tensor's value is read: no synchronization)."""
    if c.device.type == "cpu" and not torch.compiler.is_compiling():
        return bool(c != 0)
    return True
