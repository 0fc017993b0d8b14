"""Shared problems and references for the test-suite."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    # `eqx.tree_equal` returns a Python bool or, for array leaves, a bool array.
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


def tanh_layer(z, args):
    """`z ↦ tanh(z W + c)` for a batch `z` of shape `(batch, n)`; `args = (W, c)`."""
    weight, bias = args
    return jnp.tanh(z @ weight + bias)


def tanh_problem(key, n=16, batch=4, radius=0.9, dtype=jnp.float64, input_scale=0.1):
    """A tanh layer whose weight is symmetric with spectral norm (= radius) `radius`.

    With a small `input_scale` the fixed point is near 0, where tanh' ≈ 1, so the
    Jacobian's spectral radius is close to `radius`. Returns `(fn, y0, args)`.
    """
    wkey, xkey = jr.split(key)
    weight = jr.normal(wkey, (n, n), dtype=jnp.float64)
    weight = (weight + weight.T) / 2
    weight = radius * weight / jnp.linalg.norm(weight, 2)
    bias = input_scale * jr.normal(xkey, (batch, n), dtype=jnp.float64)
    args = (weight.astype(dtype), bias.astype(dtype))
    y0 = jnp.zeros((batch, n), dtype)
    return tanh_layer, y0, args


def linear_problem(key, n=8, radius=0.7, dtype=jnp.float64):
    """`f(y) = A y + b` with `‖A‖₂ = radius`; the fixed point is `(I - A)⁻¹ b`.

    Returns `(fn, y0, args, y_star)`.
    """
    akey, bkey = jr.split(key)
    a = jr.normal(akey, (n, n), dtype=jnp.float64)
    a = radius * a / jnp.linalg.norm(a, 2)
    b = jr.normal(bkey, (n,), dtype=jnp.float64)
    y_star = jnp.linalg.solve(jnp.eye(n) - a, b)

    def fn(y, args):
        a, b = args
        return a @ y + b

    args = (a.astype(dtype), b.astype(dtype))
    return fn, jnp.zeros(n, dtype), args, y_star.astype(dtype)


def dense_fixed_point(fn, y0, args, steps=50):
    """Reference fixed point by dense Newton on `g(y) = f(y) - y` in float64."""
    to64 = lambda x: jnp.asarray(x, jnp.float64) if eqx.is_inexact_array(x) else x
    y0 = jtu.tree_map(to64, y0)
    args = jtu.tree_map(to64, args)
    flat, unravel = jax.flatten_util.ravel_pytree(y0)

    def g(flat_y):
        y = unravel(flat_y)
        fy = fn(y, args)
        return jax.flatten_util.ravel_pytree(fy)[0] - flat_y

    for _ in range(steps):
        jac = jax.jacfwd(g)(flat)
        flat = flat - jnp.linalg.solve(jac, g(flat))
    assert np.max(np.abs(g(flat))) < 1e-12, "dense Newton reference did not converge"
    return unravel(flat)


def linear_layer(y, args):
    """`y ↦ A y + b` for `args = (A, b)`: the map of `linear_problem` as a global
    function, so that repeated solves share one compilation."""
    a, b = args
    return a @ y + b


def _solver_factories():
    import optimistix as optx

    import eqxdeq

    return {
        "picard": lambda tol, **kw: eqxdeq.Picard(tol, tol, **kw),
        "picard_relaxed": lambda tol, **kw: eqxdeq.Picard(
            tol, tol, relaxation=0.5, **kw
        ),
        "anderson": lambda tol, **kw: eqxdeq.Anderson(tol, tol, **kw),
        "anderson_ls": lambda tol, **kw: eqxdeq.Anderson(
            tol, tol, line_search=True, **kw
        ),
        "broyden": lambda tol, **kw: eqxdeq.Broyden(tol, tol, **kw),
        "broyden_ls": lambda tol, **kw: eqxdeq.Broyden(
            tol, tol, line_search=True, **kw
        ),
        "broyden_lr": lambda tol, **kw: eqxdeq.DescentSearchSolver(
            tol,
            tol,
            descent=eqxdeq.BroydenDescent(),
            search=optx.LearningRate(0.7),
            **kw,
        ),
        "anderson_bt": lambda tol, **kw: eqxdeq.DescentSearchSolver(
            tol,
            tol,
            descent=eqxdeq.AndersonDescent(),
            search=eqxdeq.DerivativeFreeBacktracking(),
            **kw,
        ),
    }


# Every eqxdeq fixed-point solver configuration under test, by name:
# `FIXED_POINT_SOLVERS[name](tol, **kwargs)` builds it with `rtol = atol = tol` and
# any of the common keyword arguments (`termination`, `return_best`,
# `history_length`).
FIXED_POINT_SOLVERS = _solver_factories()
