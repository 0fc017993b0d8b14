"""Shared problems and references for the test-suite."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu


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


def dense_newton(fn, y0, args, steps=50):
    """Dense Newton on `g(y) = f(y) - y` (flattened), a fixed number of steps.
    Traceable and differentiable: the derivatives of a converged Newton iteration are
    those of the fixed point, so this is also a reference *model*."""
    flat, unravel = jax.flatten_util.ravel_pytree(y0)

    def g(flat_y):
        return jax.flatten_util.ravel_pytree(fn(unravel(flat_y), args))[0] - flat_y

    def body(_, flat_y):
        return flat_y - jnp.linalg.solve(jax.jacfwd(g)(flat_y), g(flat_y))

    flat = jax.lax.fori_loop(0, steps, body, flat)
    return unravel(flat), jnp.max(jnp.abs(g(flat)))


def dense_fixed_point(fn, y0, args, steps=50):
    """Reference fixed point by dense Newton on `g(y) = f(y) - y` in float64."""
    to64 = lambda x: jnp.asarray(x, jnp.float64) if eqx.is_inexact_array(x) else x
    y_star, residual = eqx.filter_jit(dense_newton)(
        fn, jtu.tree_map(to64, y0), jtu.tree_map(to64, args), steps
    )
    assert residual < 1e-12, "dense Newton reference did not converge"
    return y_star


def dense_ift_gradient(fn, y0, args, loss):
    """d loss(y*) / d args by a dense implicit-function-theorem solve in float64,
    for an array `y`."""
    to64 = lambda x: jnp.asarray(x, jnp.float64) if eqx.is_inexact_array(x) else x
    args = jtu.tree_map(to64, args)
    y_star = dense_fixed_point(fn, y0, args)
    flat = y_star.reshape(-1)
    jac = jax.jacfwd(lambda v: fn(v.reshape(y_star.shape), args).reshape(-1))(flat)
    y_bar = jax.grad(loss)(y_star).reshape(-1)
    w = jnp.linalg.solve((jnp.eye(flat.size) - jac).T, y_bar)
    _, vjp = jax.vjp(lambda a: fn(y_star, a), args)
    return vjp(w.reshape(y_star.shape))[0]


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
        "newton_krylov": lambda tol, **kw: eqxdeq.NewtonKrylov(tol, tol, **kw),
        "newton_krylov_ls": lambda tol, **kw: eqxdeq.NewtonKrylov(
            tol, tol, pseudo_time_step=None, line_search=True, **kw
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
