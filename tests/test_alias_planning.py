"""Alias planning of the in-place operators (csrc/aliasing.h) on large lists.

The in-place operators act on their list in order, as one call per tensor would.
The planner splits the list into runs without shared memory with a greedy rule
(a new run starts at the first tensor that overlaps one of the current run), in
O(n log n) whatever the overlaps: it used to compare each tensor with every
tensor of its run, O(n^2) as soon as two tensors overlapped. Here, on lists of
thousands of tensors with duplicates and overlapping views at many positions:

- every in-place operator's result is bitwise equal to applying it tensor by
  tensor in list order (fresh random data each time);
- the run boundaries, seen through the profiler, equal a brute-force greedy.

Speed is measured by benchmarks/bench_aliasing.py, never asserted here.
"""

import random

import pytest
import torch

import regext

L1, L2 = 0.05, 0.3
SHARED = 6000  # elements of the buffer that the views share


def scalar(value):
    return torch.scalar_tensor(value, dtype=torch.float64)


def same_bits(a, b):
    """Bitwise equality (+0 and -0 differ)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


# --- lists with aliasing ------------------------------------------------------
#
# A list is a recipe: a list of entries, each built from `bases` (a dict of
# tensors) so that the same recipe can be built twice, over fresh data and over
# a clone of it, with the same aliasing. Kinds of entry:
#   ("own", key)              an independent tensor bases[key]
#   ("dup", j)                entry j again (the same tensor object)
#   ("slice", a, n)           shared[a:a+n]: may overlap other views
#   ("strided", a, n, step)   shared[a:a+n*step:step]: not dense (staged copy)
#   ("t", a, r, c)            shared[a:a+r*c].view(r, c).t(): dense, transposed
#   ("empty", a)              shared[a:a]: no elements, overlaps nothing

def build(recipe, bases):
    out = []
    shared = bases["shared"]
    for entry in recipe:
        kind = entry[0]
        if kind == "own":
            out.append(bases[entry[1]])
        elif kind == "dup":
            out.append(out[entry[1]])
        elif kind == "slice":
            _, a, n = entry
            out.append(shared[a:a + n])
        elif kind == "strided":
            _, a, n, step = entry
            out.append(shared[a:a + n * step:step])
        elif kind == "t":
            _, a, r, c = entry
            out.append(shared[a:a + r * c].view(r, c).t())
        else:
            out.append(shared[entry[1]:entry[1]])
    return out


def make_bases(recipe, own_shapes, gen, dtype=torch.float32):
    bases = {"shared": torch.randn(SHARED, generator=gen, dtype=torch.float64).to(dtype)}
    for entry in recipe:
        if entry[0] == "own":
            bases[entry[1]] = torch.randn(own_shapes[entry[1]], generator=gen,
                                          dtype=torch.float64).to(dtype)
    return bases


def random_recipe(rng, n, alias_fraction, views_only=False):
    """n entries; about alias_fraction of them a duplicate or a view of the
    shared buffer, at random positions; the rest independent tensors."""
    recipe, shapes = [], {}
    for i in range(n):
        if views_only or rng.random() < alias_fraction:
            kind = rng.choice(["dup", "slice", "slice", "strided", "t", "empty"])
            if kind == "dup" and i == 0:
                kind = "slice"
            a = rng.randrange(SHARED - 130)
            if kind == "dup":
                recipe.append(("dup", rng.randrange(i)))
            elif kind == "slice":
                recipe.append(("slice", a, rng.randint(1, 40)))
            elif kind == "strided":
                recipe.append(("strided", a, rng.randint(2, 30), rng.choice([2, 3])))
            elif kind == "t":
                recipe.append(("t", a, rng.randint(2, 8), rng.randint(2, 8)))
            else:
                recipe.append(("empty", a))
        else:
            key = f"own{i}"
            shapes[key] = rng.choice([(rng.randint(1, 40),), (rng.randint(1, 6), rng.randint(1, 7)),
                                      (0,)])
            recipe.append(("own", key))
    return recipe, shapes


def plain_recipe(n, rng):
    recipe = [("own", f"own{i}") for i in range(n)]
    return recipe, {f"own{i}": (rng.randint(1, 40),) for i in range(n)}


def scenario(name, n=3000, seed=0):
    """(recipe, own_shapes) for a named aliasing pattern."""
    rng = random.Random(seed)
    if name == "dup_at_end":  # lst + [lst[0]], the example
        recipe, shapes = plain_recipe(n, rng)
        return recipe + [("dup", 0)], shapes
    if name == "dup_in_middle":
        recipe, shapes = plain_recipe(n, rng)
        return recipe[:n // 2] + [("dup", 0)] + recipe[n // 2:], shapes
    if name == "dup_at_start":  # a run of one, then the rest
        recipe, shapes = plain_recipe(n, rng)
        return [recipe[0], ("dup", 0)] + recipe[1:], shapes
    if name == "scattered":  # ~2% aliasing entries anywhere
        return random_recipe(rng, n, 0.02)
    if name == "many":  # ~30% aliasing entries: many short runs
        return random_recipe(rng, n, 0.3)
    if name == "views_only":  # every entry a view of one buffer: heavy overlap
        return random_recipe(rng, n // 4, 0.0, views_only=True)
    if name == "same_tensor":  # one tensor over and over: a run per entry
        recipe, shapes = plain_recipe(1, rng)
        return recipe + [("dup", 0)] * 200, shapes
    raise ValueError(name)


SCENARIOS = ["dup_at_end", "dup_in_middle", "dup_at_start", "scattered", "many", "views_only",
             "same_tensor"]


def run_both(name, seed, list_op, one_op, dtype=torch.float32):
    """Builds the scenario over fresh random data twice; applies list_op to the
    whole list of one copy and one_op to each tensor of the other, in order;
    asserts every base tensor ends bitwise equal."""
    recipe, shapes = scenario(name, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    bases = make_bases(recipe, shapes, gen, dtype)
    ref_bases = {k: v.clone() for k, v in bases.items()}
    list_op(build(recipe, bases))
    for t in build(recipe, ref_bases):
        one_op(t)
    for key in bases:
        assert same_bits(bases[key], ref_bases[key]), (name, key)
    return bases


@pytest.mark.parametrize("name", SCENARIOS)
def test_prox_l1_equals_the_per_tensor_loop(name):
    bases = run_both(name, 1, lambda ts: regext.prox_l1_(ts, 0.3),
                     lambda t: regext.prox_l1_([t], 0.3))
    assert (bases["shared"] == 0).any() or name not in ("views_only", "many")


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("group", ["tensor", "row"])
def test_prox_group_l2_equals_the_per_tensor_loop(name, group):
    run_both(name, 2, lambda ts: regext.prox_group_l2_(ts, 0.7, group=group),
             lambda t: regext.prox_group_l2_([t], 0.7, group=group))


@pytest.mark.parametrize("name", ["dup_at_end", "dup_in_middle", "many", "same_tensor"])
def test_prox_l1_float64_and_half(name):
    for dtype in (torch.float64, torch.bfloat16):
        run_both(name, 3, lambda ts: regext.prox_l1_(ts, 0.3),
                 lambda t: regext.prox_l1_([t], 0.3), dtype)


# --- gradients into aliasing .grad tensors -----------------------------------

def grads_over(recipe, bases, params_gen_seed):
    """Gradients laid out by `recipe` over `bases` (views of a shared buffer may
    overlap each other) and parameters of the same shapes, independent."""
    grads = build(recipe, bases)
    gen = torch.Generator().manual_seed(params_gen_seed)
    params = [torch.randn(g.shape, generator=gen) for g in grads]
    return grads, params


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("l2_squared", [False, True])
def test_penalty_grad_accumulate_equals_the_per_tensor_loop(name, l2_squared):
    recipe, shapes = scenario(name, seed=4)
    bases = make_bases(recipe, shapes, torch.Generator().manual_seed(4))
    ref_bases = {k: v.clone() for k, v in bases.items()}
    grads, params = grads_over(recipe, bases, 5)
    ref_grads, ref_params = grads_over(recipe, ref_bases, 5)
    _, stats = torch.ops.regext.penalty_forward(params, scalar(L1), scalar(L2), l2_squared)
    torch.ops.regext.penalty_grad_accumulate_(grads, params, stats, scalar(L1), scalar(L2),
                                              l2_squared)
    for i, (g, p) in enumerate(zip(ref_grads, ref_params)):
        torch.ops.regext.penalty_grad_accumulate_([g], [p], stats, scalar(L1), scalar(L2),
                                                  l2_squared, [i])
    for key in bases:
        assert same_bits(bases[key], ref_bases[key]), (name, key)


@pytest.mark.parametrize("name", SCENARIOS)
def test_penalty_forward_accumulate_equals_the_per_tensor_loop(name):
    # Aliasing gradients: the operator must take its two-pass path, then runs.
    recipe, shapes = scenario(name, seed=6)
    bases = make_bases(recipe, shapes, torch.Generator().manual_seed(6))
    ref_bases = {k: v.clone() for k, v in bases.items()}
    grads, params = grads_over(recipe, bases, 7)
    ref_grads, ref_params = grads_over(recipe, ref_bases, 7)
    total, stats = torch.ops.regext.penalty_forward_accumulate_(grads, params, scalar(L1),
                                                                scalar(L2), True)
    ref_total, ref_stats = torch.ops.regext.penalty_forward(ref_params, scalar(L1), scalar(L2),
                                                            True)
    assert same_bits(total, ref_total) and same_bits(stats, ref_stats)
    for i, (g, p) in enumerate(zip(ref_grads, ref_params)):
        torch.ops.regext.penalty_grad_accumulate_([g], [p], stats, scalar(L1), scalar(L2), True,
                                                  [i])
    for key in bases:
        assert same_bits(bases[key], ref_bases[key]), (name, key)


def group_rows_of(params, dims):
    """The stats row of each tensor's group 0 in the list-order placement."""
    rows, row = [], 0
    for p, d in zip(params, dims):
        rows.append(row)
        _, stats = torch.ops.regext.group_penalty_forward([p], [d], scalar(L1), scalar(L2), False)
        row += stats.shape[0]
    return rows


@pytest.mark.parametrize("name", ["dup_at_end", "scattered", "many", "views_only"])
def test_group_penalty_grad_accumulate_equals_the_per_tensor_loop(name):
    recipe, shapes = scenario(name, seed=8)
    bases = make_bases(recipe, shapes, torch.Generator().manual_seed(8))
    ref_bases = {k: v.clone() for k, v in bases.items()}
    grads, params = grads_over(recipe, bases, 9)
    ref_grads, ref_params = grads_over(recipe, ref_bases, 9)
    dims = [0 if p.dim() >= 2 else -1 for p in params]  # rows where there are rows
    _, stats = torch.ops.regext.group_penalty_forward(params, dims, scalar(L1), scalar(L2), False)
    torch.ops.regext.group_penalty_grad_accumulate_(grads, params, dims, stats, scalar(L1),
                                                    scalar(L2), False)
    rows = group_rows_of(params, dims)
    for g, p, d, r in zip(ref_grads, ref_params, dims, rows):
        torch.ops.regext.group_penalty_grad_accumulate_([g], [p], [d], stats, scalar(L1),
                                                        scalar(L2), False, [r])
    for key in bases:
        assert same_bits(bases[key], ref_bases[key]), (name, key)


@pytest.mark.parametrize("name", ["dup_at_end", "dup_in_middle", "dup_at_start", "scattered",
                                  "same_tensor"])
@pytest.mark.parametrize("has_grad", [False, True])
def test_add_penalty_grad_with_duplicates_equals_the_per_tensor_loop(name, has_grad):
    # Leaf parameters listed several times (duplicates only: views are not leaves).
    recipe, shapes = scenario(name, seed=10)
    recipe = [e if e[0] in ("own", "dup") else ("own", f"x{i}") for i, e in enumerate(recipe)]
    shapes.update({e[1]: (5,) for e in recipe if e[0] == "own" and e[1] not in shapes})

    def fresh():
        gen = torch.Generator().manual_seed(11)
        bases = make_bases(recipe, shapes, gen)
        params = build(recipe, {k: v.requires_grad_() for k, v in bases.items()})
        if has_grad:
            for p in dict.fromkeys(params):
                p.grad = torch.randn(p.shape, generator=gen)
        return params

    params, ref = fresh(), fresh()
    regext.add_penalty_grad_(params, L1, L2)
    for p in ref:
        regext.add_penalty_grad_([p], L1, L2)
    for p, q in zip(params, ref):
        assert same_bits(p.grad, q.grad)


# --- the run boundaries -------------------------------------------------------

def byte_span(t):
    if t.numel() == 0:
        return (0, 0)
    extent = 1 + sum((n - 1) * max(s, 0) for n, s in zip(t.shape, t.stride()) if n > 1)
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


def brute_force_runs(tensors):
    """Run boundaries [0, ..., n]: a new run at the first tensor whose span
    overlaps the span of any tensor of the current run (all pairs compared)."""
    spans = [byte_span(t) for t in tensors]

    def overlap(a, b):
        return a[0] < a[1] and b[0] < b[1] and a[0] < b[1] and b[0] < a[1]

    bounds = [0]
    for i in range(1, len(spans)):
        if any(overlap(spans[i], spans[j]) for j in range(bounds[-1], i)):
            bounds.append(i)
    return bounds + [len(spans)]


def observed_runs(tensors):
    """The boundaries prox_group_l2_ used: it allocates one float64 [k, 2] stats
    tensor per run of k tensors, which the profiler records with its sizes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        torch.ops.regext.prox_group_l2_(tensors, scalar(0.0))
    lengths = []
    for e in prof.events():
        args = getattr(e, "concrete_inputs", None)
        if e.name == "aten::empty" and args and isinstance(args[0], list) and \
                len(args[0]) == 2 and args[0][1] == 2 and args[1] == 7:  # 7: torch.float64
            lengths.append(args[0][0])
    if not lengths and tensors:
        pytest.skip("this torch's profiler records no concrete sizes")
    bounds = [0]
    for k in lengths:
        bounds.append(bounds[-1] + k)
    return bounds


def test_observed_runs_of_a_small_list():
    x = [torch.randn(5) for _ in range(5)]
    assert observed_runs([x[0], x[1], x[0], x[2], x[3], x[3], x[4]]) == [0, 2, 5, 7]
    # Overlap with a tensor of an earlier run does not split: [a, b | b', a'].
    base = torch.randn(40)
    a, b = base[0:10], base[20:30]
    assert observed_runs([a, b, base[25:28], base[5:8]]) == [0, 2, 4]
    # Touching but not overlapping; empty views overlap nothing.
    assert observed_runs([base[0:10], base[10:20], base[5:5], base[20:20], base[9:11]]) == [0, 4, 5]
    # Interleaved strided views share a span: conservatively split.
    assert observed_runs([base[0::2], base[1::2]]) == [0, 1, 2]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.05, 0.3, 1.0])
def test_run_boundaries_equal_the_brute_force_greedy(seed, fraction):
    rng = random.Random(100 + seed)
    recipe, shapes = random_recipe(rng, 700, fraction, views_only=fraction == 1.0)
    tensors = build(recipe, make_bases(recipe, shapes, torch.Generator().manual_seed(seed)))
    want = brute_force_runs(tensors)
    assert observed_runs(tensors) == want
    if fraction < 1.0:
        assert len(want) > 2  # some aliasing made it


@pytest.mark.parametrize("name", ["dup_at_end", "dup_in_middle", "dup_at_start", "same_tensor"])
def test_run_boundaries_of_the_named_scenarios(name):
    recipe, shapes = scenario(name, n=1500)
    tensors = build(recipe, make_bases(recipe, shapes, torch.Generator().manual_seed(0)))
    assert observed_runs(tensors) == brute_force_runs(tensors)


def test_one_duplicate_in_a_long_list_makes_two_runs():
    xs = [torch.randn(3) for _ in range(20_000)]
    assert observed_runs(xs + [xs[0]]) == [0, 20_000, 20_001]
    assert observed_runs(xs[:7] + [xs[3]] + xs[7:]) == [0, 7, 20_001]
    assert observed_runs(xs) == [0, 20_000]
