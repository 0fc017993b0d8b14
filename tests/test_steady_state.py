"""`eqxdeq.SteadyState`: the fixed point as the steady state of dz/dt = f(z) - z."""

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest

import eqxdeq

from .helpers import dense_fixed_point, dense_ift_gradient, tanh_problem


# Shared solvers and `max_steps`, so that tests reuse each other's compilations.
MAX_STEPS = 2000
SOLVERS = {
    jnp.float64: eqxdeq.SteadyState(1e-10, 1e-10),
    jnp.float32: eqxdeq.SteadyState(1e-5, 1e-5),
}
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


def _max_error(x, y):
    """Largest elementwise difference between two pytrees, in float64."""
    diffs = jtu.tree_map(
        lambda a, b: jnp.max(jnp.abs(a.astype(jnp.float64) - b.astype(jnp.float64))),
        x,
        y,
    )
    return max(float(d) for d in jtu.tree_leaves(diffs))


def rotation_problem(n=16, batch=4, dtype=jnp.float64):
    """`f(y) = y Aᵀ + b` where `A = Q B Qᵀ` and `B` is block diagonal with 2×2
    blocks `[[a, w], [-w, a]]` (eigenvalues `a ± i w`) for `(a, w)` in
    `(0, 2), (0.5, 1.5), (-1, 0.5)`.

    Every eigenvalue has modulus above 1, so Picard iteration diverges, and real part
    below 1, so the ODE dz/dt = f(z) - z has a stable steady state.
    """
    blocks = [(0.0, 2.0), (0.5, 1.5), (-1.0, 0.5)]
    b_mat = np.zeros((n, n))
    for k in range(n // 2):
        a, w = blocks[k % len(blocks)]
        b_mat[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = [[a, w], [-w, a]]
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a_mat = q @ b_mat @ q.T
    eigenvalues = np.linalg.eigvals(a_mat)
    assert np.all(np.abs(eigenvalues) > 1) and np.all(eigenvalues.real < 1)
    bias = rng.standard_normal((batch, n))
    y_star = np.linalg.solve(np.eye(n) - a_mat, bias.T).T
    args = (jnp.asarray(a_mat, dtype), jnp.asarray(bias, dtype))
    return _linear_rows, jnp.zeros((batch, n), dtype), args, jnp.asarray(y_star, dtype)


def _linear_rows(y, args):
    a, b = args
    return y @ a.T + b


#
# Convergence
#


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("radius", [0.5, 0.9])
def test_converges_on_tanh(radius, dtype):
    fn, y0, args = tanh_problem(jr.PRNGKey(0), radius=radius, dtype=dtype)
    sol = optx.fixed_point(fn, SOLVERS[dtype], y0, args, max_steps=MAX_STEPS)
    assert sol.result == optx.RESULTS.successful
    assert sol.value.dtype == dtype
    ref = dense_fixed_point(fn, y0, args)
    bound = 1e-8 if dtype == jnp.float64 else 1e-4
    assert _max_error(sol.value, ref) < bound
    assert set(sol.stats) == STATS_KEYS
    assert sol.stats["result"] == eqxdeq.RESULTS.successful
    residual = fn(sol.value, args) - sol.value
    assert jnp.allclose(sol.stats["abs_residual"], jnp.linalg.norm(residual))
    assert sol.stats["best_abs_residual"] <= sol.stats["abs_residual"]
    assert 0 < sol.stats["num_accepted_steps"] <= sol.stats["num_steps"]


def test_non_contractive_but_stable():
    """Picard iteration diverges; the ODE reaches the steady state."""
    fn, y0, args, y_star = rotation_problem()
    picard = optx.fixed_point(
        fn, eqxdeq.Picard(1e-10, 1e-10), y0, args, max_steps=1000, throw=False
    )
    assert picard.result == optx.RESULTS.nonlinear_divergence
    assert picard.stats["result"] == eqxdeq.RESULTS.diverged
    sol = optx.fixed_point(fn, SOLVERS[jnp.float64], y0, args, max_steps=MAX_STEPS)
    assert sol.result == optx.RESULTS.successful
    assert _max_error(sol.value, y_star) < 1e-8


def test_dict_pytree():
    _, _, (weight, bias) = tanh_problem(jr.PRNGKey(1), n=8, batch=2, radius=0.8)

    def fn(y, args):
        weight, bias = args
        h = jnp.tanh(y["h"] @ weight + bias + y["s"])
        return {"h": h, "s": 0.5 * y["s"] + 0.1 * jnp.mean(h)}

    y0 = {"h": jnp.zeros((2, 8)), "s": jnp.zeros(())}
    sol = optx.fixed_point(fn, SOLVERS[jnp.float64], y0, (weight, bias))
    assert sol.result == optx.RESULTS.successful
    ref = dense_fixed_point(fn, y0, (weight, bias))
    assert _max_error(sol.value, ref) < 1e-8


def test_mixed_dtypes():
    """Leaves of different dtypes: diffrax integrates the widest, `f` sees each
    leaf's own dtype."""

    def fn(y, args):
        del args
        assert y["a"].dtype == jnp.float32 and y["b"].dtype == jnp.float64
        a = 0.5 * jnp.tanh(y["a"]) + 1.0
        b = 0.3 * y["b"] + jnp.sum(y["a"]).astype(jnp.float64)
        return {"a": a, "b": b}

    y0 = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros(2, jnp.float64)}
    sol = optx.fixed_point(fn, SOLVERS[jnp.float32], y0, max_steps=MAX_STEPS)
    assert sol.result == optx.RESULTS.successful
    assert sol.value["a"].dtype == jnp.float32
    assert sol.value["b"].dtype == jnp.float64
    residual = jtu.tree_map(lambda a, b: a - b, fn(sol.value, None), sol.value)
    assert _max_error(residual, jtu.tree_map(jnp.zeros_like, residual)) < 1e-4


def test_jit_and_vmap():
    fn, y0, (weight, _) = tanh_problem(jr.PRNGKey(2), n=8, batch=1, radius=0.9)
    biases = 0.3 * jr.normal(jr.PRNGKey(3), (4, 1, 8))
    solver = SOLVERS[jnp.float64]

    @jax.jit
    @jax.vmap
    def solve(bias):
        sol = optx.fixed_point(fn, solver, y0, (weight, bias))
        return sol.value, sol.stats["num_steps"]

    values, num_steps = solve(biases)
    for bias, value in zip(biases, values):
        ref = dense_fixed_point(fn, y0, (weight, bias))
        assert _max_error(value, ref) < 1e-8
    # Each element of the batch stops when it has converged.
    assert len(set(np.asarray(num_steps).tolist())) > 1


def test_converged_at_y0_costs_one_evaluation():
    """`init` evaluates nothing; the first step evaluates `f` at `y0` only."""
    fn, y0, args = tanh_problem(jr.PRNGKey(4), radius=0.5)
    y_star = dense_fixed_point(fn, y0, args)
    sol = optx.fixed_point(fn, SOLVERS[jnp.float64], y_star, args, max_steps=MAX_STEPS)
    assert sol.stats["num_steps"] == 1
    assert sol.stats["num_fn_evals"] == 1
    assert sol.stats["num_accepted_steps"] == 0


#
# Counting evaluations
#


def _counted(fn):
    """`fn` that also counts its executions on the host."""
    count = [0]

    def bump():
        count[0] += 1

    def counted(y, args):
        jax.debug.callback(bump)
        return fn(y, args)

    return counted, count


_SOLVERS = {
    # name: (diffrax solver, controller or None, evaluations per ODE step, FSAL)
    "tsit5": (diffrax.Tsit5(), None, 7, True),
    "dopri5": (diffrax.Dopri5(), None, 7, True),
    "bosh3": (diffrax.Bosh3(), None, 4, True),
    "heun": (diffrax.Heun(), None, 3, False),
    "midpoint": (diffrax.Midpoint(), None, 3, False),
    "euler": (diffrax.Euler(), diffrax.ConstantStepSize(), 2, False),
}


@pytest.mark.parametrize("name", list(_SOLVERS))
def test_num_fn_evals_is_exact(name):
    """One evaluation at `y0`, then per ODE step the solver's stages plus one at the
    new point; a FSAL solver's stages include the new point, and it evaluates one
    stage more (its first) in the steps before the first accepted one."""
    solver, controller, per_step, fsal = _SOLVERS[name]
    fn, y0, args = tanh_problem(jr.PRNGKey(5), radius=0.5)
    counted, count = _counted(fn)
    steady = eqxdeq.SteadyState(
        1e-6, 1e-6, solver=solver, stepsize_controller=controller, dt0=0.5
    )
    sol = optx.fixed_point(counted, steady, y0, args, max_steps=MAX_STEPS)
    assert sol.result == optx.RESULTS.successful
    assert sol.stats["num_fn_evals"] == count[0]
    num_steps, accepted = sol.stats["num_steps"], sol.stats["num_accepted_steps"]
    extra = count[0] - 1 - per_step * (num_steps - 1)
    if fsal:
        # (At most every rejected step before the first accepted one, plus that one.)
        assert 1 <= extra <= num_steps - accepted
    else:
        assert extra == 0
    if name == "tsit5":
        assert num_steps - 1 > accepted  # rejections


@pytest.mark.parametrize("max_steps", [MAX_STEPS, 5])
def test_aux_costs_no_evaluation(max_steps):
    """The aux output comes from the evaluation at the returned iterate (the best
    one, when the solve does not converge): no evaluation in `postprocess`."""
    fn, y0, args = tanh_problem(jr.PRNGKey(6), radius=0.5)
    counted, count = _counted(lambda y, a: (fn(y, a), {"sum": jnp.sum(y)}))
    solver = eqxdeq.SteadyState(1e-8, 1e-8)
    sol = optx.fixed_point(
        counted, solver, y0, args, has_aux=True, max_steps=max_steps, throw=False
    )
    plain = optx.fixed_point(fn, solver, y0, args, max_steps=max_steps, throw=False)
    assert sol.stats["num_fn_evals"] == count[0] == plain.stats["num_fn_evals"]
    assert (sol.result == optx.RESULTS.successful) == (max_steps == MAX_STEPS)
    assert jnp.allclose(sol.aux["sum"], jnp.sum(sol.value))


@pytest.mark.parametrize("relaxation", [1.0, 0.5])
def test_euler_is_picard(relaxation):
    """One Euler step of size β on dz/dt = f(z) - z is one Picard step with
    relaxation β: the same iterates and steps, at two evaluations per step (diffrax's
    Euler evaluates `f` at the start of the step, where the residual is known)."""
    fn, y0, args = tanh_problem(jr.PRNGKey(7), radius=0.9)
    steady = eqxdeq.SteadyState(
        1e-8,
        1e-8,
        solver=diffrax.Euler(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=relaxation,
        history_length=200,
    )
    picard = eqxdeq.Picard(1e-8, 1e-8, relaxation=relaxation, history_length=200)
    sol_s = optx.fixed_point(fn, steady, y0, args, max_steps=MAX_STEPS)
    sol_p = optx.fixed_point(fn, picard, y0, args, max_steps=MAX_STEPS)
    assert sol_s.result == sol_p.result == optx.RESULTS.successful
    assert set(sol_s.stats) == set(sol_p.stats) == STATS_KEYS | {"residual_history"}
    assert sol_s.stats["num_steps"] == sol_p.stats["num_steps"]
    assert sol_s.stats["num_fn_evals"] == 2 * sol_p.stats["num_fn_evals"] - 1
    assert _max_error(sol_s.value, sol_p.value) < 1e-14
    history_s = sol_s.stats["residual_history"]
    history_p = sol_p.stats["residual_history"]
    assert np.array_equal(np.isnan(history_s), np.isnan(history_p))
    assert float(jnp.nanmax(jnp.abs(history_s - history_p))) < 1e-14


#
# Failure modes and options
#


def test_divergence_is_reported_with_finite_output():
    # dz/dt = 1.5 z - z + 1: the steady state z = -2 is unstable.
    fn = lambda y, args: 1.5 * y + 1.0
    y0 = jnp.zeros(3)
    sol = optx.fixed_point(
        fn, eqxdeq.SteadyState(1e-8, 1e-8), y0, max_steps=1000, throw=False
    )
    assert sol.result == optx.RESULTS.nonlinear_divergence
    assert sol.stats["result"] == eqxdeq.RESULTS.diverged
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    # With divergence detection off, a step that blows up is not taken.
    exp = lambda y, args: jnp.exp(y)
    steady = eqxdeq.SteadyState(
        1e-8,
        1e-8,
        solver=diffrax.Euler(),
        stepsize_controller=diffrax.ConstantStepSize(),
        termination=eqxdeq.Termination(divergence_factor=None),
        return_best=False,
    )
    sol = optx.fixed_point(exp, steady, jnp.ones(2), max_steps=100, throw=False)
    assert sol.result == optx.RESULTS.nonlinear_divergence
    assert sol.stats["result"] == eqxdeq.RESULTS.diverged
    assert bool(jnp.all(jnp.isfinite(sol.value)))


def test_step_budget():
    fn, y0, args = tanh_problem(jr.PRNGKey(8), radius=0.9)
    solver = eqxdeq.SteadyState(1e-10, 1e-10)

    @jax.jit
    def solve(budget):
        sol = optx.fixed_point(
            fn, solver, y0, args, options={"step_budget": budget}, throw=False
        )
        return sol.stats["num_steps"], sol.result

    for budget in (3, 7):
        num_steps, result = solve(jnp.array(budget))
        assert num_steps == budget
        assert result == optx.RESULTS.nonlinear_max_steps_reached
    assert solve._cache_size() == 1  # pyright: ignore[reportAttributeAccessIssue]


def test_return_best_and_history():
    fn, y0, args = tanh_problem(jr.PRNGKey(9), radius=0.9)
    solver = eqxdeq.SteadyState(1e-12, 1e-12, history_length=8)
    sol = optx.fixed_point(fn, solver, y0, args, max_steps=6, throw=False)
    history = sol.stats["residual_history"]
    assert history.shape == (8,)
    # `y0`, then the end of each of the 5 ODE steps.
    assert bool(jnp.all(jnp.isfinite(history[:6])))
    assert bool(jnp.all(jnp.isnan(history[6:])))
    assert history[0] == jnp.linalg.norm(fn(y0, args) - y0)
    # Not converged: the returned iterate is the best one seen.
    assert jnp.allclose(sol.stats["abs_residual"], jnp.min(history[:6]))
    assert jnp.allclose(
        jnp.linalg.norm(fn(sol.value, args) - sol.value), sol.stats["abs_residual"]
    )


def test_options():
    """Divergence is measured against `options["reference_residual"]` (as
    `eqxdeq.Fallback` sets it) rather than the residual at `y0`; `y0_evaluation`
    is not an option of `SteadyState`."""
    fn, y0, args = tanh_problem(jr.PRNGKey(8), radius=0.9)
    reference = jnp.linalg.norm(fn(y0, args) - y0) / 10
    termination = eqxdeq.Termination(divergence_factor=2.0)
    solver = eqxdeq.SteadyState(1e-10, 1e-10, termination=termination)
    options = {"reference_residual": reference}
    sol = optx.fixed_point(fn, solver, y0, args, options=options, throw=False)
    assert sol.stats["result"] == eqxdeq.RESULTS.diverged
    assert sol.stats["num_steps"] == 1
    with pytest.raises(ValueError, match="y0_evaluation"):
        options = {"y0_evaluation": (fn(y0, args), None)}
        optx.fixed_point(fn, solver, y0, args, options=options)


def test_validation():
    with pytest.raises(ValueError, match="dt0"):
        eqxdeq.SteadyState(1e-6, 1e-6, dt0=0.0)
    with pytest.raises(ValueError, match="dt0"):
        eqxdeq.SteadyState(1e-6, 1e-6, dt0=-1.0)
    with pytest.raises(ValueError, match="dt0"):
        eqxdeq.SteadyState(1e-6, 1e-6, dt0=float("inf"))
    # (A `TypeError` where the jaxtyping import hook checks the annotations.)
    with pytest.raises((ValueError, TypeError), match="solver"):
        eqxdeq.SteadyState(1e-6, 1e-6, solver=optx.Newton(1e-6, 1e-6))  # pyright: ignore
    with pytest.raises(ValueError, match="solver"):
        eqxdeq.SteadyState(1e-6, 1e-6, solver=diffrax.Kvaerno5())
    with pytest.raises(ValueError, match="solver"):
        eqxdeq.SteadyState(1e-6, 1e-6, solver=diffrax.SemiImplicitEuler())
    # Not dissipative (no steady state), and its `init` evaluates the vector field.
    with pytest.raises(ValueError, match="solver"):
        eqxdeq.SteadyState(1e-6, 1e-6, solver=diffrax.ReversibleHeun())
    with pytest.raises(ValueError, match="stepsize_controller"):
        eqxdeq.SteadyState(1e-6, 1e-6, solver=diffrax.Euler())
    with pytest.raises((ValueError, TypeError), match="stepsize_controller"):
        eqxdeq.SteadyState(1e-6, 1e-6, stepsize_controller=0.1)  # pyright: ignore
    with pytest.raises(ValueError, match="rtol"):
        eqxdeq.SteadyState(-1.0, 1e-6)
    with pytest.raises(ValueError, match="history_length"):
        eqxdeq.SteadyState(1e-6, 1e-6, history_length=-1)


#
# Gradients
#


def _loss(y):
    return jnp.sum(jnp.sin(y))


def _dense_gradient(fn, y0, args):
    return dense_ift_gradient(fn, y0, args, _loss)


def _rel_error(grad, ref):
    num = sum(
        jnp.sum((a - b) ** 2)
        for a, b in zip(jtu.tree_leaves(grad), jtu.tree_leaves(ref))
    )
    den = sum(jnp.sum(b**2) for b in jtu.tree_leaves(ref))
    return float(jnp.sqrt(num / den))


@eqx.filter_jit
@eqx.filter_grad
def _grad(args, fn, y0, solver, adjoint):
    sol = optx.fixed_point(fn, solver, y0, args, adjoint=adjoint, max_steps=MAX_STEPS)
    return _loss(sol.value)


@pytest.mark.parametrize("problem", ["tanh", "rotation"])
def test_implicit_adjoint(problem):
    if problem == "tanh":
        fn, y0, args = tanh_problem(jr.PRNGKey(10), radius=0.9)
    else:
        fn, y0, args, _ = rotation_problem()
    ref = _dense_gradient(fn, y0, args)
    grad = _grad(args, fn, y0, SOLVERS[jnp.float64], eqxdeq.ImplicitAdjoint())
    assert _rel_error(grad, ref) < 1e-8


@pytest.mark.parametrize("name", ["jfb", "shine", "phantom"])
def test_approximate_adjoints(name):
    fn, y0, args = tanh_problem(jr.PRNGKey(11), radius=0.5)
    y_star = dense_fixed_point(fn, y0, args)
    _, vjp = jax.vjp(lambda a: fn(y_star, a), args)
    jfb_ref = vjp(jax.grad(_loss)(y_star))[0]
    solver = SOLVERS[jnp.float64]
    if name == "jfb":
        grad = _grad(args, fn, y0, solver, eqxdeq.JFB())
        assert _rel_error(grad, jfb_ref) < 1e-9
    elif name == "shine":
        # Without an inverse-Jacobian estimate SHINE is JFB.
        grad = _grad(args, fn, y0, solver, eqxdeq.ShineAdjoint())
        assert _rel_error(grad, jfb_ref) < 1e-9
    else:
        grad = _grad(args, fn, y0, solver, eqxdeq.PhantomAdjoint(30))
        assert _rel_error(grad, _dense_gradient(fn, y0, args)) < 1e-8


@pytest.mark.slow
def test_backpropagation_through_the_ode_steps():
    fn, y0, args = tanh_problem(jr.PRNGKey(12), radius=0.5)
    ref = _dense_gradient(fn, y0, args)
    solver = SOLVERS[jnp.float64]
    grad = _grad(args, fn, y0, solver, optx.RecursiveCheckpointAdjoint())
    assert _rel_error(grad, ref) < 1e-6


def test_float32_gradient():
    fn, y0, args = tanh_problem(jr.PRNGKey(13), radius=0.9, dtype=jnp.float32)
    ref = _dense_gradient(fn, y0, jtu.tree_map(lambda x: x.astype(jnp.float64), args))
    grad = _grad(args, fn, y0, SOLVERS[jnp.float32], eqxdeq.ImplicitAdjoint())
    assert all(g.dtype == jnp.float32 for g in jtu.tree_leaves(grad))
    assert _rel_error(jtu.tree_map(lambda x: x.astype(jnp.float64), grad), ref) < 1e-4
