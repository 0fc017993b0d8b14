"""Newton–Krylov: inexact Newton with matrix-free Jacobian-vector products, on
contractive and non-contractive layers, its Jacobian-vector-product count, and the
Jacobian-descent mechanism of the generic loop."""

from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import eqxdeq
from eqxdeq._descent.jacobian import krylov_matvecs

from .helpers import dense_fixed_point, tanh_layer, tanh_problem


def _non_contractive_tanh(n=32, batch=4, norm=1.6, input_scale=0.1):
    """`z ↦ tanh(z W + x)` with symmetric `W` of spectral norm 1.6 and a small
    input: Picard oscillates (Jacobian eigenvalues below -1 at the fixed point) and
    Anderson stalls, while the fixed point is a stable steady state of
    dz/dt = f(z) - z."""
    return tanh_problem(
        jr.PRNGKey(0), n=n, batch=batch, radius=norm, input_scale=input_scale
    )


def _per_sample(solver, fn, y0, args, max_steps=200):
    weight, bias = args

    def solve(y0_i, bias_i):
        return optx.fixed_point(
            fn, solver, y0_i, (weight, bias_i), max_steps=max_steps, throw=False
        )

    return jax.jit(jax.vmap(solve))(y0, bias)


_LINE_SEARCH: dict[str, Any] = dict(pseudo_time_step=None, line_search=True)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize(
    "options, max_evals", [({}, 12), (_LINE_SEARCH, 10)], ids=["ptc", "line_search"]
)
def test_converges_superlinearly_on_a_contraction(dtype, options, max_evals):
    fn, y0, args = tanh_problem(jr.PRNGKey(0), radius=0.99, dtype=dtype)
    y_star = dense_fixed_point(fn, y0, args)
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
    solver = eqxdeq.NewtonKrylov(tol, tol, **options)
    sol = optx.fixed_point(fn, solver, y0, args, max_steps=100)
    anderson = optx.fixed_point(fn, eqxdeq.Anderson(tol, tol), y0, args, max_steps=500)
    # Measured: float64 (Anderson 63) pseudo-transient 11, line search 9; float32
    # (Anderson 32) 9 and 8.
    assert sol.stats["num_fn_evals"] <= max_evals
    assert sol.stats["num_fn_evals"] <= anderson.stats["num_fn_evals"] / 2.5
    assert sol.stats["num_jvps"] > 0
    assert sol.value.dtype == dtype
    np.testing.assert_allclose(sol.value, y_star.astype(dtype), rtol=0, atol=100 * tol)


@pytest.mark.parametrize(
    "options, max_evals",
    [({}, 10), (_LINE_SEARCH, 6), (dict(pseudo_time_step=None), 6)],
    ids=["ptc", "line_search", "newton"],
)
def test_linear_map_with_expanding_eigenvalues(options, max_evals):
    # f(y) = A y + b with eigenvalues of A in [-1.5, 0.5]: Picard diverges, Newton
    # solves the (linear) problem in one step up to the forcing tolerance, and
    # pseudo-transient continuation in a few (the shift shrinks with the residual).
    key_a, key_b = jr.split(jr.PRNGKey(1))
    q, _ = jnp.linalg.qr(jr.normal(key_a, (8, 8)))
    a = q @ jnp.diag(jnp.linspace(-1.5, 0.5, 8)) @ q.T
    b = jr.normal(key_b, (8,))
    fn = lambda y, args: args[0] @ y + args[1]
    y_star = jnp.linalg.solve(jnp.eye(8) - a, b)
    y0 = jnp.zeros(8)
    picard = optx.fixed_point(fn, eqxdeq.Picard(1e-8, 1e-8), y0, (a, b), throw=False)
    assert picard.result != optx.RESULTS.successful
    solver = eqxdeq.NewtonKrylov(1e-8, 1e-8, **options)
    sol = optx.fixed_point(fn, solver, y0, (a, b))
    np.testing.assert_allclose(sol.value, y_star, rtol=1e-7, atol=1e-7)
    assert sol.stats["num_fn_evals"] <= max_evals


@pytest.mark.parametrize("pseudo_time_step", [1.0, 0.1])
def test_pseudo_transient_solves_a_non_contractive_layer(pseudo_time_step):
    fn, y0, args = _non_contractive_tanh()
    tol = 1e-6
    # Measured (samples converged of 4): Picard 0, Anderson 1, Newton with a line
    # search 1; pseudo-transient Newton–Krylov 4 (dt0 = 1: 13-17 evaluations;
    # dt0 = 0.1: 99-108).
    picard = _per_sample(eqxdeq.Picard(tol, tol), fn, y0, args)
    assert not jnp.any(picard.result == optx.RESULTS.successful)
    anderson = _per_sample(eqxdeq.Anderson(tol, tol), fn, y0, args)
    assert not jnp.all(anderson.result == optx.RESULTS.successful)
    line_search = eqxdeq.NewtonKrylov(tol, tol, **_LINE_SEARCH)
    newton = _per_sample(line_search, fn, y0, args)
    assert not jnp.all(newton.result == optx.RESULTS.successful)
    solver = eqxdeq.NewtonKrylov(tol, tol, pseudo_time_step=pseudo_time_step)
    sol = _per_sample(solver, fn, y0, args)
    assert jnp.all(sol.result == optx.RESULTS.successful)
    residual = fn(sol.value, args) - sol.value
    assert jnp.max(jnp.abs(residual)) < 10 * tol
    # The fixed point found has a Jacobian with spectral radius > 1 for some sample:
    # a point that no contraction-based iteration can converge to.
    weight, bias = args
    slope = 1 - jnp.tanh(sol.value @ weight + bias) ** 2
    jac = slope[:, :, None] * weight.T[None]
    radius = jnp.max(jnp.abs(jnp.linalg.eigvals(jac)), axis=-1)
    assert jnp.any(radius > 1)


@pytest.mark.parametrize(
    "solver",
    [lx.GMRES(rtol=1e-6, atol=1e-6, restart=3, max_steps=7), lx.BiCGStab(1e-6, 1e-6)],
    ids=["gmres", "bicgstab"],
)
def test_krylov_matvec_count_matches_lineax(solver):
    # `num_jvps` relies on how many operator applications lineax's Krylov solvers
    # make per step; count them with a host callback so a change in lineax fails
    # here, loudly, rather than silently miscounting.
    count = []
    matrix = jnp.eye(10) + 0.3 * jr.normal(jr.PRNGKey(0), (10, 10)) / jnp.sqrt(10)

    def mv(v):
        jax.debug.callback(lambda: count.append(1))
        return matrix @ v

    operator = lx.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((10,), jnp.float64))
    sol = lx.linear_solve(operator, jnp.ones(10), solver, throw=False)
    jax.effects_barrier()
    assert len(count) == int(krylov_matvecs(solver, sol.stats["num_steps"], 10))


def test_jvp_count_in_stats():
    fn, y0, args = tanh_problem(jr.PRNGKey(0), radius=0.9)
    sol = optx.fixed_point(fn, eqxdeq.NewtonKrylov(1e-8, 1e-8), y0, args)
    # Every step is accepted (no line search): one Krylov solve per step except
    # after the last (converged) evaluation.
    assert sol.stats["num_accepted_steps"] == sol.stats["num_fn_evals"]
    linear_solver = eqxdeq.NewtonKrylovDescent.linear_solver
    assert isinstance(linear_solver, lx.GMRES)
    restart = min(linear_solver.restart, y0.size)
    steps = sol.stats["num_linear_steps"]
    # One Krylov solve per accepted step (after the last one the solve stops).
    solves = sol.stats["num_accepted_steps"]
    assert sol.stats["num_jvps"] == steps + (steps - solves) * restart
    assert {"num_jvps", "num_linear_steps", "num_inexact_solves"} <= set(sol.stats)


@pytest.mark.parametrize("forcing", ["eisenstat-walker", 1e-3])
def test_bicgstab_and_constant_forcing(forcing):
    fn, y0, args = tanh_problem(jr.PRNGKey(2), radius=0.9)
    y_star = dense_fixed_point(fn, y0, args)
    solver = eqxdeq.NewtonKrylov(
        1e-9, 1e-9, linear_solver=lx.BiCGStab(0.0, 0.0, max_steps=50), forcing=forcing
    )
    sol = optx.fixed_point(fn, solver, y0, args, max_steps=100)
    np.testing.assert_allclose(sol.value, y_star, rtol=0, atol=1e-8)


def test_optimistix_newton_descent_composes():
    # Any descent taking `FunctionInfo.ResidualJac` works in the generic loop; here
    # optimistix's Newton descent with a dense solve (the Jacobian is materialised
    # from the linearisation only because LU asks for a matrix).
    fn, y0, args = tanh_problem(jr.PRNGKey(3), radius=0.9)
    y_star = dense_fixed_point(fn, y0, args)
    solver = eqxdeq.DescentSearchSolver(
        1e-10,
        1e-10,
        descent=optx.NewtonDescent(linear_solver=lx.LU()),
        search=eqxdeq.DerivativeFreeBacktracking(),
    )
    sol = optx.fixed_point(fn, solver, y0, args, max_steps=50)
    np.testing.assert_allclose(sol.value, y_star, rtol=0, atol=1e-9)
    assert sol.stats["num_fn_evals"] <= 8


def test_jit_vmap_grad_jvp():
    fn, y0, args = tanh_problem(jr.PRNGKey(4), radius=0.9)
    solver = eqxdeq.NewtonKrylov(1e-10, 1e-10)

    def solve(args):
        sol = optx.fixed_point(
            tanh_layer, solver, y0, args, adjoint=eqxdeq.ImplicitAdjoint()
        )
        return sol.value

    loss = lambda args: jnp.sum(solve(args) ** 2)
    grads = jax.jit(jax.grad(loss))(args)
    # Dense float64 implicit-function-theorem reference.
    y_star = dense_fixed_point(fn, y0, args)
    jac_y = jax.jacfwd(lambda y: fn(y, args))(y_star).reshape(y0.size, y0.size)
    cot = jnp.linalg.solve((jnp.eye(y0.size) - jac_y).T, 2 * y_star.reshape(-1))
    _, vjp = jax.vjp(lambda a: fn(y_star, a), args)
    (expected,) = vjp(cot.reshape(y0.shape))
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-7, atol=1e-10)
    # jvp agrees with the vjp.
    tangent = jax.tree_util.tree_map(jnp.ones_like, args)
    _, out_tangent = jax.jvp(solve, (args,), (tangent,))
    lhs = jnp.sum(2 * solve(args) * out_tangent)
    rhs = sum(jnp.sum(g * t) for g, t in zip(grads, tangent))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-7)
    # vmap over inputs.
    weight, bias = args
    batched = jax.vmap(lambda b: solve((weight, b)))(jnp.stack([bias, 2 * bias]))
    np.testing.assert_allclose(batched[0], solve(args), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("options", [{}, _LINE_SEARCH], ids=["ptc", "line_search"])
def test_backprop_through_iterations_from_the_fixed_point(options):
    """`y0` already the fixed point: the pseudo-time step's 0/0 must not turn into a
    NaN gradient under backpropagation through the iterations (found by running
    optimistix-style problems)."""

    def fn(y, a):
        return a * jnp.tanh(y)

    solver = eqxdeq.NewtonKrylov(1e-8, 1e-8, **options)

    def loss(a):
        sol = optx.fixed_point(
            fn, solver, jnp.zeros(3), a, adjoint=optx.RecursiveCheckpointAdjoint()
        )
        return jnp.sum(sol.value + a * sol.value)

    value, grad = jax.value_and_grad(loss)(jnp.array(0.5))
    assert value == 0 and grad == 0  # y* = 0 for every a with |a| < 1


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: eqxdeq.NewtonKrylovDescent(linear_solver=lx.LU()), "linear_solver"),
        (lambda: eqxdeq.NewtonKrylovDescent(forcing=1.5), "forcing"),
        (lambda: eqxdeq.NewtonKrylovDescent(forcing="fixed"), "forcing"),
        (lambda: eqxdeq.NewtonKrylovDescent(forcing_max=1.0), "forcing_max"),
        (lambda: eqxdeq.NewtonKrylov(1e-6, 1e-6, pseudo_time_step=0.0), "pseudo"),
        (lambda: eqxdeq.NewtonKrylov(1e-6, 1e-6, line_search=True), "line_search"),
        (lambda: eqxdeq.NewtonKrylov(-1.0, 1e-6), "rtol"),
    ],
)
def test_bad_options(make, name):
    with pytest.raises(ValueError, match=name):
        make()
