"""When a solve stops: the convergence criteria, divergence, stalls, `max_steps` and
the runtime step budget."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
import pytest
from equinox.internal import ω

import eqxdeq

from .helpers import FIXED_POINT_SOLVERS, tanh_layer, tanh_problem


slow = pytest.mark.slow


def _picard(*, termination=eqxdeq.Termination(), **kwargs):
    return eqxdeq.Picard(1e-8, 1e-8, termination=termination, **kwargs)


#
# Convergence criteria.
#


def diagonal_map(y, args):
    a, b = args
    return a * y + b


@pytest.mark.parametrize("criterion", ["elementwise", "norm"])
def test_criterion(criterion):
    # Picard on f(y) = a ⊙ y + b from y0 = 0 has the closed form
    # y_k = y* (1 - a^k), g_k = f(y_k) - y_k = a^k b, f(y_k) = y* (1 - a^(k+1)).
    # One component is large and converges fast, the other is small and converges
    # slowly: the elementwise criterion weighs the small one by its own size and
    # stops much later than the norm criterion.
    a = np.array([0.5, 0.8])
    y_star = np.array([1000.0, 0.1])
    b = (1 - a) * y_star
    rtol, atol = 1e-6, 1e-8
    steps = np.arange(100)[:, None]
    g = a**steps * b
    f = y_star * (1 - a ** (steps + 1))
    if criterion == "elementwise":
        measure = np.max(np.abs(g) / (atol + rtol * np.abs(f)), axis=1)
        stop = measure < 1
    else:
        measure = np.max(np.abs(g), axis=1) / (atol + rtol * np.max(np.abs(f), axis=1))
        stop = measure <= 1
    expected_evals = int(np.argmax(stop)) + 1
    # The criterion is met at the last evaluation and not at the one before, with
    # margins far above rounding.
    assert measure[expected_evals - 1] < 0.99 and measure[expected_evals - 2] > 1.01
    if criterion == "elementwise":
        assert expected_evals > 40
    else:
        assert expected_evals == 20

    solver = eqxdeq.Picard(
        rtol,
        atol,
        termination=eqxdeq.Termination(criterion=criterion),
        history_length=64,
    )
    args = (jnp.array(a), jnp.array(b))
    sol = optx.fixed_point(diagonal_map, solver, jnp.zeros(2), args, throw=False)
    assert sol.result == optx.RESULTS.successful
    assert sol.stats["num_fn_evals"] == expected_evals
    # The solver's iterates are the closed-form ones.
    history = sol.stats["residual_history"]
    np.testing.assert_allclose(
        history[:expected_evals],
        np.linalg.norm(g[:expected_evals], axis=1),
        rtol=1e-9,
    )
    assert jnp.all(jnp.isnan(history[expected_evals:]))


#
# Divergence.
#


def doubling(y, args):
    del args
    return 2 * y + 1


@pytest.mark.parametrize(
    "divergence_factor,expected_evals",
    # The residual at y_k = 2^k - 1 is 2^k: divergence once 2^k > factor.
    [(1e4, 15), (10.0, 5), (None, 50)],
)
def test_divergence(divergence_factor, expected_evals):
    termination = eqxdeq.Termination(divergence_factor=divergence_factor)
    sol = optx.fixed_point(
        doubling,
        _picard(termination=termination),
        jnp.array(0.0),
        max_steps=50,
        throw=False,
    )
    assert sol.stats["num_fn_evals"] == expected_evals
    if divergence_factor is None:
        assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
        assert sol.stats["result"] == eqxdeq.RESULTS.nonlinear_max_steps_reached
    else:
        assert sol.result == optx.RESULTS.nonlinear_divergence
        assert sol.stats["result"] == eqxdeq.RESULTS.diverged
    # The best iterate is y0, the one with the smallest residual.
    assert sol.value == 0
    assert sol.stats["best_abs_residual"] == 1


def test_divergence_throws():
    with pytest.raises(eqx.EquinoxRuntimeError, match="Nonlinear solve diverged"):
        optx.fixed_point(doubling, _picard(), jnp.array(0.0), max_steps=50)


def nan_beyond_two(y, args):
    del args
    return jnp.where(y < 2.5, y + 1, jnp.nan)


@pytest.mark.parametrize("divergence_factor", [1e4, None])
@pytest.mark.parametrize(
    "name",
    [pytest.param("picard"), pytest.param("anderson"), pytest.param("broyden")],
)
def test_nan_is_divergence(name, divergence_factor):
    # Every method takes the steps 0 → 1 → 2 → 3 (the residual is constant, so
    # Anderson and Broyden have no curvature information and fall back to Picard),
    # and f(3) is NaN.
    termination = eqxdeq.Termination(divergence_factor=divergence_factor)
    solver = FIXED_POINT_SOLVERS[name](1e-8, termination=termination)
    sol = optx.fixed_point(
        nan_beyond_two, solver, jnp.array(0.0), max_steps=50, throw=False
    )
    assert sol.result == optx.RESULTS.nonlinear_divergence
    assert sol.stats["result"] == eqxdeq.RESULTS.diverged
    assert sol.stats["num_fn_evals"] == 4
    assert jnp.isfinite(sol.value)
    assert sol.stats["best_abs_residual"] == 1


#
# Stalls.
#


def affine(y, c):
    return c * y + 1


@pytest.mark.parametrize(
    "contraction,stalls",
    [
        (1.0, True),  # no fixed point: the residual is constant
        (0.9999, True),  # progress of 1e-4 per step, below `stall_tol=1e-3`
        (0.99, False),  # progress of 1e-2 per step
    ],
)
def test_stall(contraction, stalls):
    termination = eqxdeq.Termination(stall_patience=5)
    sol = optx.fixed_point(
        affine,
        _picard(termination=termination),
        jnp.array(0.0),
        jnp.array(contraction),
        max_steps=50,
        throw=False,
    )
    if stalls:
        # The first evaluation is progress (from +∞); five more without.
        assert sol.stats["num_fn_evals"] == 6
        assert sol.result == optx.RESULTS.nonlinear_divergence
        assert sol.stats["result"] == eqxdeq.RESULTS.stalled
    else:
        assert sol.stats["num_fn_evals"] == 50
        assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
        assert sol.stats["result"] == eqxdeq.RESULTS.nonlinear_max_steps_reached


def test_no_stall_detection_by_default():
    sol = optx.fixed_point(
        affine, _picard(), jnp.array(0.0), jnp.array(1.0), max_steps=50, throw=False
    )
    assert sol.stats["num_fn_evals"] == 50
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert sol.stats["result"] == eqxdeq.RESULTS.nonlinear_max_steps_reached


#
# Running out of steps.
#


def test_max_steps():
    fn, y0, args = tanh_problem(jr.PRNGKey(0), radius=0.99)
    sol = optx.fixed_point(fn, _picard(), y0, args, max_steps=10, throw=False)
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert sol.stats["result"] == eqxdeq.RESULTS.nonlinear_max_steps_reached
    assert sol.stats["num_steps"] == sol.stats["num_fn_evals"] == 10
    with pytest.raises(eqx.EquinoxRuntimeError, match="maximum number of steps"):
        optx.fixed_point(fn, _picard(), y0, args, max_steps=10)


@pytest.mark.parametrize(
    "name", ["picard", pytest.param("anderson", marks=slow), "broyden_ls"]
)
def test_step_budget_does_not_recompile(name):
    _, y0, args = tanh_problem(jr.PRNGKey(0), radius=0.99)
    solver = FIXED_POINT_SOLVERS[name](1e-10)
    num_traces = [0]

    @eqx.filter_jit
    def solve(args, budget):
        num_traces[0] += 1
        return optx.fixed_point(
            tanh_layer,
            solver,
            y0,
            args,
            options={"step_budget": budget},
            max_steps=1000,
            throw=False,
        )

    # None of these budgets suffices to converge (that takes 60+ evaluations).
    for budget in (3, 7, 12):
        sol = solve(args, jnp.array(budget))
        assert sol.stats["num_fn_evals"] == sol.stats["num_steps"] == budget
        assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
        assert sol.stats["result"] == eqxdeq.RESULTS.nonlinear_max_steps_reached
    # A budget larger than needed does not change the solve.
    sol = solve(args, jnp.array(10_000))
    assert sol.result == optx.RESULTS.successful
    assert sol.stats["num_fn_evals"] < 1000
    assert num_traces[0] == 1


def test_step_budget_python_int():
    _, y0, args = tanh_problem(jr.PRNGKey(0), radius=0.99)
    sol = optx.fixed_point(
        tanh_layer, _picard(), y0, args, options={"step_budget": 4}, throw=False
    )
    assert sol.stats["num_fn_evals"] == 4
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached


def test_step_budget_under_vmap():
    # Per-sample budgets.
    budgets = jnp.array([2, 5])

    def solve(budget):
        return optx.fixed_point(
            affine,
            _picard(),
            jnp.array(0.0),
            jnp.array(0.5),
            options={"step_budget": budget},
            throw=False,
        )

    sol = jax.vmap(solve)(budgets)
    assert jnp.array_equal(sol.stats["num_fn_evals"], budgets)


class _MyState(eqx.Module):
    progress: eqxdeq.Progress


class _MyPicard(eqxdeq.AbstractProgressSolver):
    """The custom solver of docs/api/solvers.md ("Writing a solver")."""

    rtol: float
    atol: float
    norm: Callable = optx.max_norm
    termination: eqxdeq.Termination = eqxdeq.Termination()
    damping: float = 0.5

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        progress = eqxdeq.Progress.start(
            y, aux_struct, keep_best=True, history_length=8
        )
        return _MyState(progress)

    def step(self, fn, y, args, options, state, tags):
        f, aux = fn(y, args)
        g = (f**ω - y**ω).ω
        progress = state.progress.observe(self, y, f, g, aux).end_step(self)
        return (y**ω + self.damping * g**ω).ω, _MyState(progress), aux

    def extra_stats(self, state):
        return {}


def test_a_custom_solver_gets_termination_and_stats_from_progress():
    fn = lambda y, args: jnp.cos(y)
    y0 = jnp.array(1.0)
    sol = optx.fixed_point(fn, _MyPicard(1e-8, 1e-8), y0)
    np.testing.assert_allclose(sol.value, 0.7390851332151607, rtol=1e-7)
    same = optx.fixed_point(fn, eqxdeq.Picard(1e-8, 1e-8, relaxation=0.5), y0)
    for key in ("num_fn_evals", "num_accepted_steps", "abs_residual"):
        np.testing.assert_array_equal(sol.stats[key], same.stats[key])
    assert set(sol.stats) >= set(same.stats) - {"residual_history"}
    assert jnp.all(jnp.isfinite(sol.stats["residual_history"]))
    # Step budget and divergence come for free.
    short = optx.fixed_point(
        fn, _MyPicard(1e-8, 1e-8), y0, options={"step_budget": 3}, throw=False
    )
    assert short.stats["num_fn_evals"] == 3
    assert short.result == optx.RESULTS.nonlinear_max_steps_reached
    grow = lambda y, args: 3.0 * y + 1.0
    bad = optx.fixed_point(grow, _MyPicard(1e-8, 1e-8, damping=1.0), y0, throw=False)
    assert bad.stats["result"] == eqxdeq.RESULTS.diverged
    # The best iterate is returned: y0, where the residual was smallest.
    np.testing.assert_array_equal(bad.value, y0)
    # And it is a stage that Fallback hands over from at its best iterate.
    fallback = eqxdeq.Fallback(
        _MyPicard(1e-8, 1e-8, damping=1.0), eqxdeq.Anderson(1e-8, 1e-8)
    )
    sol = optx.fixed_point(lambda y, args: -2.0 * y + 1.0, fallback, y0)
    np.testing.assert_allclose(sol.value, 1 / 3, rtol=1e-7)
    assert sol.stats["stage"] == 1
