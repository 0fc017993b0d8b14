"""The fixed-point solvers (Picard, Anderson, Broyden and composed descent+search
solvers) on problems with known fixed points, their cost in evaluations of `f`,
pytrees, JAX transformations and `sol.stats`."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest

import eqxdeq

from .helpers import (
    dense_fixed_point,
    FIXED_POINT_SOLVERS,
    linear_layer,
    linear_problem,
    tanh_layer,
    tanh_problem,
)


slow = pytest.mark.slow

# Tolerance (rtol = atol) per dtype.
TOLERANCES = {jnp.float64: 1e-10, jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Enough for the slowest configuration: relaxed Picard at radius 0.99 (~600 steps).
MAX_STEPS = 1000
# The solvers that run in every test by default; the others (relaxed Picard,
# line-search variants, composed solvers) run in some tests by default (e.g. all the
# float64 tanh problems) and otherwise under `-m slow`. Each solver/dtype/function
# combination costs one XLA compilation (1-4 s on CPU), which dominates the run time.
CORE_SOLVERS = ("picard", "anderson", "broyden")
STATS_KEYS = {
    "num_steps",
    "max_steps",
    "num_fn_evals",
    "num_accepted_steps",
    "abs_residual",
    "rel_residual",
    "best_abs_residual",
    "best_rel_residual",
    "result",
}
# Jacobian descents add their own counters.
JACOBIAN_STATS_KEYS = {"num_jvps", "num_linear_steps", "num_inexact_solves"}


def _stats_keys(name):
    if name.startswith("newton_krylov"):
        return STATS_KEYS | JACOBIAN_STATS_KEYS
    return STATS_KEYS


def _solver_params(fast=CORE_SOLVERS):
    return [
        pytest.param(name, marks=() if name in fast else slow)
        for name in FIXED_POINT_SOLVERS
    ]


def _to64(tree):
    return jtu.tree_map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree
    )


def _assert_tree_allclose(x, y, *, rtol, atol):
    # Stricter than `helpers.tree_allclose`: dtypes must match leaf by leaf too.
    assert jtu.tree_structure(x) == jtu.tree_structure(y)
    for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _residual_norm(fn, y, args):
    """`‖f(y) - y‖₂` and `‖f(y)‖₂`, in float64."""
    fy = _to64(fn(y, args))
    y = _to64(y)
    g = jtu.tree_map(lambda a, b: a - b, fy, y)
    sq = lambda t: sum(jnp.sum(x**2) for x in jtu.tree_leaves(t))
    return jnp.sqrt(sq(g)), jnp.sqrt(sq(fy))


@ft.cache
def _problem(kind, radius, dtype):
    """`(fn, y0, args, y_star)` with `y_star` the float64 fixed point of the problem
    with the `dtype`-rounded parameters."""
    key = jr.PRNGKey(0)
    if kind == "tanh":
        fn, y0, args = tanh_problem(key, radius=radius, dtype=dtype)
        y_star = dense_fixed_point(fn, y0, args)
    else:
        _, y0, args, _ = linear_problem(key, radius=radius, dtype=dtype)
        fn = linear_layer
        a, b = _to64(args)
        # Closed form.
        y_star = jnp.linalg.solve(jnp.eye(b.size) - a, b)
    return fn, y0, args, y_star


#
# 1. Known fixed points.
#

_KNOWN_CASES = []
for _kind, _radius in [
    ("tanh", 0.5),
    ("tanh", 0.9),
    ("tanh", 0.99),
    ("linear", 0.5),
    ("linear", 0.9),
]:
    for _dtype in (jnp.float64, jnp.float32, jnp.bfloat16):
        # In bfloat16 (8 bits of mantissa) only the well-conditioned problems are
        # meaningful: the forward error is ~ eps / (1 - radius).
        if _dtype == jnp.bfloat16 and _radius > 0.5:
            continue
        for _name in FIXED_POINT_SOLVERS:
            if _dtype == jnp.float64 and _kind == "tanh":
                fast = True
            else:
                fast = _name in CORE_SOLVERS and (
                    _kind == "tanh" or _dtype == jnp.float64
                )
            _KNOWN_CASES.append(
                pytest.param(
                    _name,
                    _kind,
                    _radius,
                    _dtype,
                    marks=() if fast else slow,
                    id=f"{_name}-{_kind}{_radius}-{jnp.dtype(_dtype).name}",
                )
            )


@pytest.mark.parametrize("name,kind,radius,dtype", _KNOWN_CASES)
def test_known_fixed_point(name, kind, radius, dtype):
    fn, y0, args, y_star = _problem(kind, radius, dtype)
    tol = TOLERANCES[dtype]
    if dtype == jnp.bfloat16:
        # The DEQ convention; the elementwise one asks for more than bfloat16 holds.
        termination = eqxdeq.Termination(criterion="norm")
    else:
        termination = eqxdeq.Termination()
    solver = FIXED_POINT_SOLVERS[name](tol, termination=termination)
    sol = optx.fixed_point(fn, solver, y0, args, max_steps=MAX_STEPS, throw=False)

    assert sol.result == optx.RESULTS.successful
    assert sol.stats["result"] == eqxdeq.RESULTS.successful
    assert sol.value.dtype == y0.dtype
    assert sol.value.shape == y0.shape
    # The solve stops once |f(y) - y| < tol (1 + |f(y)|) (elementwise or in norm),
    # and the forward error is at most ‖(I - ∂f/∂y)⁻¹‖ times that, where
    # ‖(I - ∂f/∂y)⁻¹‖₂ ≤ 1 / (1 - radius). The factor 3 covers max- vs 2-norm and
    # rounding; the measured errors are 1.5-10x below this bound (and far below it
    # for the well-conditioned problems).
    scale = float(jnp.max(jnp.abs(y_star)))
    bound = 3 * tol * (1 + scale) / (1 - radius)
    error = float(jnp.max(jnp.abs(sol.value.astype(jnp.float64) - y_star)))
    assert error <= bound, (error, bound)
    if dtype == jnp.float64:
        # Sanity: the bound is a meaningful requirement.
        assert bound <= 1e-7
    # Statistics are accumulated in at least float32.
    stats_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    for key in ("abs_residual", "rel_residual", "best_abs_residual"):
        assert sol.stats[key].dtype == stats_dtype, key
    assert sol.stats["best_abs_residual"] <= sol.stats["abs_residual"]


#
# 2. Exactly one evaluation of `f` per step.
#

_NUM_CALLS = [0]


def _record_call():
    _NUM_CALLS[0] += 1


def counted_tanh_layer(y, args):
    # Fires once per evaluation at run time, not when optimistix traces `fn`.
    jax.debug.callback(_record_call)
    return tanh_layer(y, args)


@pytest.mark.parametrize("name", _solver_params(fast=CORE_SOLVERS + ("broyden_ls",)))
def test_one_evaluation_per_step(name):
    fn, y0, args, _ = _problem("tanh", 0.99, jnp.float64)
    solver = FIXED_POINT_SOLVERS[name](1e-10)
    _NUM_CALLS[0] = 0
    sol = optx.fixed_point(
        counted_tanh_layer, solver, y0, args, max_steps=MAX_STEPS, throw=False
    )
    jax.effects_barrier()
    assert sol.result == optx.RESULTS.successful
    num_calls = _NUM_CALLS[0]
    assert num_calls == sol.stats["num_fn_evals"] == sol.stats["num_steps"]
    assert 0 < sol.stats["num_accepted_steps"] <= sol.stats["num_fn_evals"]
    if name == "broyden_ls":
        # Rejected trials are steps (and evaluations) too.
        assert sol.stats["num_accepted_steps"] < sol.stats["num_fn_evals"]
    if name in ("picard", "picard_relaxed", "anderson", "broyden", "broyden_lr"):
        # Fixed damping accepts every step.
        assert sol.stats["num_accepted_steps"] == sol.stats["num_fn_evals"]


#
# 3. Acceleration.
#


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_acceleration_on_near_critical_layer(dtype):
    fn, y0, args, _ = _problem("tanh", 0.99, dtype)
    tol = TOLERANCES[dtype]
    evals = {}
    for name in CORE_SOLVERS:
        sol = optx.fixed_point(
            fn, FIXED_POINT_SOLVERS[name](tol), y0, args, max_steps=MAX_STEPS
        )
        evals[name] = int(sol.stats["num_fn_evals"])
    # Measured (evaluations of f): float64 Picard 297, Anderson 84, Broyden 63;
    # float32 Picard 95, Anderson 32, Broyden 35. That is a ratio of at most 0.37,
    # so 0.5 leaves a margin of more than 1.3x while still requiring a substantial
    # speed-up (Picard's linear rate at radius 0.99 is hopeless by comparison).
    assert evals["anderson"] <= 0.5 * evals["picard"], evals
    assert evals["broyden"] <= 0.5 * evals["picard"], evals


def test_line_search_recovers_from_a_bad_quasi_newton_direction():
    # In float32 near the solution, Broyden's direction can fail to be a descent
    # direction of ‖g‖². Backtracking alone then shrinks the step until the trial
    # rounds to the current point and cycles (measured before `max_backtracks`:
    # 1000 steps, 67 accepted, stuck at ‖g‖ = 7.6e-5). Accepting the short trial
    # after `max_backtracks` rejections updates the model and converges (48 evals).
    fn, y0, args, _ = _problem("tanh", 0.99, jnp.float32)
    solver = eqxdeq.Broyden(1e-5, 1e-5, line_search=True)
    sol = optx.fixed_point(fn, solver, y0, args, max_steps=MAX_STEPS, throw=False)
    assert sol.result == optx.RESULTS.successful
    assert sol.stats["num_fn_evals"] < 150
    assert sol.stats["num_accepted_steps"] < sol.stats["num_fn_evals"]


#
# 4. Pytrees and auxiliary outputs.
#


def block_linear(y, args):
    """For every leaf `x`: `x ↦ W x + b + 0.1 Σ_leaves mean(leaf)`, in the leaf's own
    dtype (the coupling term is summed in float64 and cast back)."""
    weights, biases = args
    leaves, treedef = jtu.tree_flatten(y)
    total = ft.reduce(jnp.add, [jnp.mean(x).astype(jnp.float64) for x in leaves])
    out = [
        (w @ x.reshape(-1) + b + 0.1 * total.astype(x.dtype)).reshape(x.shape)
        for x, w, b in zip(leaves, weights, biases, strict=True)
    ]
    return jtu.tree_unflatten(treedef, out)


def _pytree_problem(structure):
    if structure == "dict":
        y0 = {"a": jnp.zeros(3), "b": jnp.zeros((2, 4))}
    elif structure == "tuple":
        y0 = (jnp.zeros(()), jnp.zeros((2, 3)), jnp.zeros(2))
    elif structure == "mixed":
        y0 = {"single": jnp.zeros(4, jnp.float32), "double": jnp.zeros((2, 3))}
    else:
        assert False
    weights = []
    biases = []
    for i, x in enumerate(jtu.tree_leaves(y0)):
        wkey, bkey = jr.split(jr.PRNGKey(i))
        w = jr.normal(wkey, (x.size, x.size), jnp.float64)
        w = 0.5 * w / jnp.linalg.norm(w, 2)
        weights.append(w.astype(x.dtype))
        biases.append(jr.normal(bkey, (x.size,), jnp.float64).astype(x.dtype))
    return y0, (tuple(weights), tuple(biases))


# Compilation grows with the number of leaves (Anderson on the 3-leaf tuple takes
# ~9 s), so by default each structure runs with one solver.
_FAST_PYTREE_CASES = {
    ("anderson", "mixed"),
    ("broyden", "tuple"),
    ("anderson_bt", "dict"),
    ("newton_krylov", "mixed"),  # regression: mixed dtypes in the Krylov solve
}


@pytest.mark.parametrize(
    "name,structure",
    [
        pytest.param(
            name,
            structure,
            marks=() if (name, structure) in _FAST_PYTREE_CASES else slow,
        )
        for name in FIXED_POINT_SOLVERS
        for structure in ("dict", "tuple", "mixed")
    ],
)
def test_pytree(name, structure):
    y0, args = _pytree_problem(structure)
    y_star = dense_fixed_point(block_linear, y0, args)
    tol, bound = (1e-5, 1e-4) if structure == "mixed" else (1e-10, 1e-8)
    solver = FIXED_POINT_SOLVERS[name](tol)
    sol = optx.fixed_point(
        block_linear, solver, y0, args, max_steps=MAX_STEPS, throw=False
    )
    assert sol.result == optx.RESULTS.successful
    assert jtu.tree_structure(sol.value) == jtu.tree_structure(y0)
    for x, x0, ref in zip(
        jtu.tree_leaves(sol.value),
        jtu.tree_leaves(y0),
        jtu.tree_leaves(y_star),
        strict=True,
    ):
        assert x.dtype == x0.dtype
        assert x.shape == x0.shape
        assert float(jnp.max(jnp.abs(x.astype(jnp.float64) - ref))) <= bound
    # Statistics in the widest dtype of the leaves.
    assert sol.stats["abs_residual"].dtype == jnp.float64
    abs_residual, _ = _residual_norm(block_linear, sol.value, args)
    # (Newton converges to rounding level, where only an absolute comparison holds.)
    np.testing.assert_allclose(
        sol.stats["abs_residual"], abs_residual, rtol=1e-4, atol=1e-13
    )


def tanh_layer_with_aux(y, args):
    out = tanh_layer(y, args)
    return out, {"input": y, "residual": out - y}


@pytest.mark.parametrize("return_best", [True, False])
@pytest.mark.parametrize("name", ["picard", "broyden_ls"])
def test_aux_is_that_of_the_returned_iterate(name, return_best):
    # broyden_ls rejects trials on this problem, so `aux` of a rejected trial must
    # not leak into the output.
    _, y0, args, _ = _problem("tanh", 0.99, jnp.float64)
    solver = FIXED_POINT_SOLVERS[name](1e-10, return_best=return_best)
    sol = optx.fixed_point(
        tanh_layer_with_aux, solver, y0, args, has_aux=True, max_steps=MAX_STEPS
    )
    assert jnp.array_equal(sol.aux["input"], sol.value)
    _assert_tree_allclose(
        sol.aux["residual"],
        tanh_layer(sol.value, args) - sol.value,
        rtol=0,
        atol=1e-14,
    )


#
# 5. JAX transformations.
#


@eqx.filter_jit
def _jitted_fixed_point(fn, solver, y0, args):
    return optx.fixed_point(fn, solver, y0, args, max_steps=MAX_STEPS, throw=False)


@pytest.mark.parametrize("name", CORE_SOLVERS)
def test_jit(name):
    fn, y0, args, y_star = _problem("tanh", 0.9, jnp.float64)
    solver = FIXED_POINT_SOLVERS[name](1e-10)
    sol = _jitted_fixed_point(fn, solver, y0, args)
    eager = optx.fixed_point(fn, solver, y0, args, max_steps=MAX_STEPS, throw=False)
    assert sol.result == optx.RESULTS.successful
    _assert_tree_allclose(sol.value, y_star, rtol=0, atol=1e-8)
    _assert_tree_allclose(sol.value, eager.value, rtol=1e-12, atol=1e-14)
    assert sol.stats["num_fn_evals"] == eager.stats["num_fn_evals"]


@pytest.mark.parametrize("name", _solver_params(fast=("picard", "anderson")))
def test_vmap_per_sample_convergence(name):
    # One easy (radius 0.1) and one hard (radius 0.95) sample: each stops on its own.
    n = 8
    wkey, bkey = jr.split(jr.PRNGKey(1))
    weight = jr.normal(wkey, (n, n))
    weight = (weight + weight.T) / jnp.linalg.norm(weight + weight.T, 2)
    weights = jnp.stack([0.1 * weight, 0.95 * weight])
    biases = 0.1 * jr.normal(bkey, (2, n))
    y0 = jnp.zeros(n)
    solver = FIXED_POINT_SOLVERS[name](1e-10)

    def solve(args):
        return optx.fixed_point(
            tanh_layer, solver, y0, args, max_steps=MAX_STEPS, throw=False
        )

    batched = jax.vmap(solve)((weights, biases))
    assert jnp.all(batched.result == optx.RESULTS.successful)
    evals = batched.stats["num_fn_evals"]
    assert evals.shape == (2,)
    assert evals[0] < evals[1]
    for i in range(2):
        args = (weights[i], biases[i])
        single = solve(args)
        assert single.stats["num_fn_evals"] == evals[i]
        _assert_tree_allclose(batched.value[i], single.value, rtol=1e-10, atol=1e-12)
        y_star = dense_fixed_point(tanh_layer, y0, args)
        _assert_tree_allclose(batched.value[i], y_star, rtol=0, atol=1e-8)


def _dense_bias_gradient(weight, bias, y0):
    """d Σ y*² / d bias by the implicit function theorem, densely in float64."""
    args = (weight, bias)
    y_star = dense_fixed_point(tanh_layer, y0, args)
    flat = lambda v: v.reshape(y_star.shape)
    jac_y = jax.jacfwd(lambda v: tanh_layer(flat(v), args).reshape(-1))(
        y_star.reshape(-1)
    )
    jac_bias = jax.jacfwd(lambda b: tanh_layer(y_star, (weight, b)).reshape(-1))(
        bias
    ).reshape(y_star.size, bias.size)
    dy_dbias = jnp.linalg.solve(jnp.eye(y_star.size) - jac_y, jac_bias)
    return (2 * y_star.reshape(-1) @ dy_dbias).reshape(bias.shape)


_GRAD_CASES = [
    pytest.param(
        name,
        adjoint,
        marks=()
        if (name in CORE_SOLVERS and (adjoint == "implicit" or name == "picard"))
        # Regression: backpropagating through the Krylov solves.
        or (name == "newton_krylov" and adjoint == "recursive")
        else slow,
    )
    for adjoint in ("implicit", "recursive")
    for name in FIXED_POINT_SOLVERS
]


@pytest.mark.parametrize("name,adjoint", _GRAD_CASES)
def test_grad(name, adjoint):
    _, y0, (weight, bias) = tanh_problem(jr.PRNGKey(0), n=8, batch=2, radius=0.9)
    solver = FIXED_POINT_SOLVERS[name](1e-10)
    adjoint = {
        "implicit": optx.ImplicitAdjoint(),
        "recursive": optx.RecursiveCheckpointAdjoint(),
    }[adjoint]

    @jax.grad
    def loss(bias):
        sol = optx.fixed_point(
            tanh_layer,
            solver,
            y0,
            (weight, bias),
            adjoint=adjoint,
            max_steps=MAX_STEPS,
        )
        return jnp.sum(sol.value**2)

    grad = loss(bias)
    expected = _dense_bias_gradient(weight, bias, y0)
    assert grad.shape == bias.shape
    error = jnp.linalg.norm(grad - expected) / jnp.linalg.norm(expected)
    # Measured: <= 1e-9 (implicit), <= 1e-7 (backpropagating through the solver).
    assert error < 1e-6, error


#
# 6. Statistics.
#


@pytest.mark.parametrize("name", _solver_params(fast=tuple(FIXED_POINT_SOLVERS)))
def test_stats_keys(name):
    # The same configuration as `test_known_fixed_point`, so it shares compilation.
    fn, y0, args, _ = _problem("tanh", 0.5, jnp.float64)
    sol = optx.fixed_point(
        fn,
        FIXED_POINT_SOLVERS[name](1e-10),
        y0,
        args,
        max_steps=MAX_STEPS,
        throw=False,
    )
    assert set(sol.stats) == _stats_keys(name)
    assert sol.stats["max_steps"] == MAX_STEPS
    assert sol.stats["num_steps"] == sol.stats["num_fn_evals"]
    assert isinstance(sol.stats["result"], eqxdeq.RESULTS)
    for key in ("num_fn_evals", "num_accepted_steps"):
        assert jnp.issubdtype(sol.stats[key].dtype, jnp.integer), key
    for key in ("abs_residual", "rel_residual", "best_abs_residual"):
        assert sol.stats[key].shape == (), key


@pytest.mark.parametrize(
    "name", _solver_params(fast=("picard", "anderson", "broyden_ls"))
)
def test_stats_residuals_and_history(name):
    fn, y0, args, _ = _problem("tanh", 0.9, jnp.float64)
    # Newton-Krylov converges in 6 evaluations here: stop it earlier.
    short, long, length = (2, 5, 4) if name.startswith("newton_krylov") else (5, 12, 8)
    solver = FIXED_POINT_SOLVERS[name](1e-10, history_length=length)

    def solve(budget):
        return optx.fixed_point(
            fn,
            solver,
            y0,
            args,
            options={"step_budget": jnp.array(budget)},
            max_steps=MAX_STEPS,
            throw=False,
        )

    # Stopped early, so the residuals are far above rounding and can be recomputed
    # tightly.
    sol = solve(short)
    assert set(sol.stats) == _stats_keys(name) | {"residual_history"}
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert sol.stats["num_fn_evals"] == short
    abs_residual, f_norm = _residual_norm(fn, sol.value, args)
    np.testing.assert_allclose(sol.stats["abs_residual"], abs_residual, rtol=1e-10)
    np.testing.assert_allclose(
        sol.stats["rel_residual"], abs_residual / f_norm, rtol=1e-10
    )
    history = sol.stats["residual_history"]
    assert history.shape == (length,)
    assert history.dtype == jnp.float64
    assert jnp.all(jnp.isfinite(history[:short]))
    assert jnp.all(jnp.isnan(history[short:]))
    # The first evaluation is at y0.
    np.testing.assert_allclose(history[0], _residual_norm(fn, y0, args)[0], rtol=1e-12)
    np.testing.assert_allclose(sol.stats["best_abs_residual"], jnp.min(history[:short]))
    # `return_best=True` (the default): the returned iterate is the best one.
    np.testing.assert_allclose(
        sol.stats["abs_residual"], sol.stats["best_abs_residual"], rtol=1e-12
    )

    # Past `history_length` evaluations only the first ones are kept.
    longer = solve(long)
    assert longer.stats["num_fn_evals"] == long
    assert jnp.all(jnp.isfinite(longer.stats["residual_history"]))
    assert jnp.array_equal(longer.stats["residual_history"][:short], history[:short])


def _diverging_problem():
    """`f(y) = A y + b` with `A` symmetric, eigenvalues in [-0.5, 0.5] and one at 1.5,
    started near the fixed point mostly along the contracting directions: Picard's
    residual first decreases, then grows by 1.5x per step."""
    n = 6
    q, _ = jnp.linalg.qr(jr.normal(jr.PRNGKey(3), (n, n)))
    eigenvalues = jnp.array([1.5, 0.5, -0.5, 0.3, -0.2, 0.1])
    a = (q * eigenvalues[None, :]) @ q.T
    y_star = jnp.arange(1.0, n + 1)
    b = y_star - a @ y_star
    coefficients = jnp.array([1e-6, 1.0, 1.0, 1.0, 1.0, 1.0])
    y0 = y_star + q @ coefficients
    return y0, (a, b)


def linear_layer_with_aux(y, args):
    return linear_layer(y, args), y


@pytest.mark.parametrize("return_best", [True, False])
def test_return_best_on_divergence(return_best):
    y0, args = _diverging_problem()
    solver = eqxdeq.Picard(1e-10, 1e-10, return_best=return_best)
    sol = optx.fixed_point(
        linear_layer_with_aux, solver, y0, args, has_aux=True, throw=False
    )
    assert sol.result == optx.RESULTS.nonlinear_divergence
    assert sol.stats["result"] == eqxdeq.RESULTS.diverged
    num_evals = int(sol.stats["num_fn_evals"])

    # Replay the iteration: y ← y + 1·(f(y) - y).
    iterates = [y0]
    for _ in range(num_evals - 1):
        y = iterates[-1]
        iterates.append(y + 1.0 * (linear_layer(y, args) - y))
    residuals = np.array([_residual_norm(linear_layer, y, args)[0] for y in iterates])
    np.testing.assert_allclose(
        sol.stats["best_abs_residual"], residuals.min(), rtol=1e-8
    )
    best = int(np.argmin(residuals))
    # The test is only meaningful if the best iterate is neither the first nor the
    # last one.
    assert 0 < best < num_evals - 1
    # Divergence is declared at the first residual above 1e4 x the initial one.
    assert residuals[-1] > 1e4 * residuals[0] >= residuals[-2]

    expected = best if return_best else num_evals - 1
    _assert_tree_allclose(sol.value, iterates[expected], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(
        sol.stats["abs_residual"], residuals[expected], rtol=1e-8
    )
    assert jnp.array_equal(sol.aux, sol.value)


def test_return_best_reports_a_converged_iterate():
    # A non-normal linear map whose residual *grows* in the 2-norm from y0 to y1,
    # while y1 meets the (elementwise, relative) tolerance and y0 does not: the
    # solve converges at the second evaluation. With `return_best=True` the solver
    # must not return y0, the iterate of smallest ‖f(y) - y‖₂, since y0 fails the
    # tolerance that `sol.result == successful` promises.
    a = jnp.array([[0.0, 10.0], [0.0, 0.1]])
    y_star = jnp.array([1e6, 0.0])
    b = y_star - a @ y_star
    # The residual at y0 is (0, 1), at y1 it is A (0, 1) = (10, 0.1).
    y0 = y_star + jnp.linalg.solve(a - jnp.eye(2), jnp.array([0.0, 1.0]))
    rtol, atol = 1e-4, 0.5
    solver = eqxdeq.Picard(rtol, atol, return_best=True)
    sol = optx.fixed_point(linear_layer, solver, y0, (a, b), throw=False)
    assert sol.result == optx.RESULTS.successful
    assert sol.stats["num_fn_evals"] == 2
    fy = linear_layer(sol.value, (a, b))
    criterion = optx.max_norm((fy - sol.value) / (atol + rtol * jnp.abs(fy)))
    assert criterion < 1, "returned an iterate that does not meet the tolerance"
    abs_residual, _ = _residual_norm(linear_layer, sol.value, (a, b))
    np.testing.assert_allclose(sol.stats["abs_residual"], abs_residual, rtol=1e-10)
