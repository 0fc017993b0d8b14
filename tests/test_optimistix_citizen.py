"""eqxdeq's adjoints wherever optimistix accepts an adjoint.

Optimistix-style problems (written here) go through every optimistix entry point and
solver kind; `optimistix.ImplicitAdjoint` with a dense solve is the control in the
same parametrisation, and the tangents are also checked against a dense reference.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import optimistix as optx
import pytest

import eqxdeq

from .helpers import tree_allclose


TOL = 1e-11


# --- problems: (name, fn, y0, args); `fn(y, args)` --------------------------------


def _cos_fixed(y, a):
    return 0.5 * jnp.cos(y) + a


def _mlp_fixed(y, args):
    w, u, a = args
    return jnp.tanh(w @ y + u @ a)


def _tanh_cubic_root(y, a):
    return jnp.tanh(y) + y**3 - a


def _mlp_root(y, args):
    w, u, a = args
    return y - jnp.tanh(w @ y + u @ a)


def _quartic_minimise(y, a):
    return jnp.sum((y - a) ** 4) + 0.5 * jnp.sum(y**2) + jnp.sum(a * y)


def _residuals(y, a):
    return jnp.concatenate([y - a, 0.3 * jnp.sin(y) * a])


def _mlp_args(n=4):
    w = jr.normal(jr.PRNGKey(0), (n, n), jnp.float64)
    w = 0.6 * w / jnp.linalg.norm(w, 2)
    u = jr.normal(jr.PRNGKey(1), (n, n), jnp.float64) / n
    return w, u, jnp.linspace(-0.5, 0.7, n)


_A = jnp.array([0.5, 0.3])
# The MLP problems run in the slow step (each case is one ~10 s compilation).
_SLOW = pytest.mark.slow
_FIXED = [
    pytest.param("cos", _cos_fixed, jnp.zeros(2), _A, id="cos"),
    pytest.param("mlp", _mlp_fixed, jnp.zeros(4), None, id="mlp", marks=_SLOW),
]
_ROOT = [
    pytest.param("tanh_cubic", _tanh_cubic_root, jnp.zeros(2), _A, id="tanh_cubic"),
    pytest.param("mlp", _mlp_root, jnp.zeros(4), None, id="mlp", marks=_SLOW),
]


def _resolve(args):
    return _mlp_args() if args is None else args


def _tangent_like(args):
    return jax.tree_util.tree_map(
        lambda x: jnp.linspace(0.3, 1.1, x.size).reshape(x.shape), args
    )


def _jvp_vjp(solve, args):
    """Forward tangent and the gradient of a fixed scalar loss, both w.r.t. `args`."""
    tangent = _tangent_like(args)
    _, t_out = jax.jvp(solve, (args,), (tangent,))
    grad = jax.grad(lambda a: jnp.sum(jnp.sin(solve(a))))(args)
    return t_out, grad


def _dense_tangents(residual_fn, y_star, args):
    """IFT by hand: dy*/dargs · t = -(∂r/∂y)⁻¹ ∂r/∂args · t at a root of `r`."""
    jac_y = jax.jacfwd(residual_fn, argnums=0)(y_star, args)
    _, r_t = jax.jvp(lambda a: residual_fn(y_star, a), (args,), (_tangent_like(args),))
    return -jnp.linalg.solve(jac_y, r_t)


_EQXDEQ_EXACT = {
    "gmres": eqxdeq.ImplicitAdjoint(),
    "lu": eqxdeq.ImplicitAdjoint(lx.LU()),
}
_CONTROL = optx.ImplicitAdjoint()
# The dense backward solve is a second control on the same rewrite; slow step only.
_ADJOINTS = ["gmres", pytest.param("lu", marks=pytest.mark.slow)]


def _check_against_control(solve_with, adjoint, args, residual_fn, rtol, atol):
    """eqxdeq's exact adjoint against `optx.ImplicitAdjoint` (jvp and vjp) and against
    a dense IFT at a root of `residual_fn`. `solve_with(adj)` maps args to y*."""
    ours = _jvp_vjp(solve_with(_EQXDEQ_EXACT[adjoint]), args)
    control = _jvp_vjp(solve_with(_CONTROL), args)
    assert tree_allclose(ours, control, rtol=rtol, atol=atol)
    y_star = solve_with(_CONTROL)(args)
    dense = _dense_tangents(residual_fn, y_star, args)
    assert tree_allclose(ours[0], dense, rtol=rtol, atol=atol)


# --- optx.root_find ----------------------------------------------------------------

_ROOT_FINDERS = {
    "newton": optx.Newton(TOL, TOL),
    "chord": optx.Chord(TOL, TOL),
    # A least-squares solver, which optimistix runs on the residual.
    "dogleg": optx.Dogleg(TOL, TOL),
    # (A minimiser is left out: optimistix minimises `norm(g(y))` with its max norm,
    # whose Hessian is zero, so even `optx.ImplicitAdjoint` cannot differentiate it.)
}


@pytest.mark.parametrize("adjoint", _ADJOINTS)
@pytest.mark.parametrize("solver", list(_ROOT_FINDERS))
@pytest.mark.parametrize("name, fn, y0, args", _ROOT)
def test_root_find_matches_optimistix(adjoint, solver, name, fn, y0, args):
    del name
    args = _resolve(args)

    def solve_with(adj):
        def solve(a):
            sol = optx.root_find(
                fn, _ROOT_FINDERS[solver], y0, a, adjoint=adj, max_steps=256
            )
            return sol.value

        return solve

    _check_against_control(solve_with, adjoint, args, fn, rtol=1e-8, atol=1e-10)


# --- optx.fixed_point, with every solver kind --------------------------------------

_FIXED_POINT_SOLVERS = {
    # eqxdeq and optimistix fixed-point solvers: the fixed-point rewrite.
    "anderson": eqxdeq.Anderson(TOL, TOL),
    "newton_krylov": eqxdeq.NewtonKrylov(TOL, TOL),
    "optx_iteration": optx.FixedPointIteration(TOL, TOL),
    # Root finders and a least-squares solver, which optimistix turns into a root
    # find of f(y) - y (a different rewrite, and a wrapped `fn`). (No minimiser: see
    # `_ROOT_FINDERS`.)
    "optx_newton": optx.Newton(TOL, TOL),
    "optx_chord": optx.Chord(TOL, TOL),
    "optx_lm": optx.LevenbergMarquardt(TOL, TOL),
}


@pytest.mark.parametrize("adjoint", _ADJOINTS)
@pytest.mark.parametrize("solver", list(_FIXED_POINT_SOLVERS))
@pytest.mark.parametrize("name, fn, y0, args", _FIXED)
def test_fixed_point_matches_optimistix(adjoint, solver, name, fn, y0, args):
    del name
    args = _resolve(args)

    def solve_with(adj):
        def solve(a):
            sol = optx.fixed_point(
                fn, _FIXED_POINT_SOLVERS[solver], y0, a, adjoint=adj, max_steps=512
            )
            return sol.value

        return solve

    residual = lambda y, a: fn(y, a) - y
    _check_against_control(solve_with, adjoint, args, residual, rtol=1e-8, atol=1e-10)


# --- optx.minimise and optx.least_squares ------------------------------------------


@pytest.mark.parametrize("adjoint", _ADJOINTS)
@pytest.mark.parametrize("solver", ["bfgs", "nonlinear_cg"])
def test_minimise_matches_optimistix(adjoint, solver):
    minimiser = {
        "bfgs": optx.BFGS(TOL, TOL),
        "nonlinear_cg": optx.NonlinearCG(TOL, TOL),
    }[solver]
    y0 = jnp.zeros(2)

    def solve_with(adj):
        def solve(a):
            sol = optx.minimise(
                _quartic_minimise, minimiser, y0, a, adjoint=adj, max_steps=512
            )
            return sol.value

        return solve

    gradient = jax.grad(_quartic_minimise)
    _check_against_control(solve_with, adjoint, _A, gradient, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("adjoint", _ADJOINTS)
@pytest.mark.parametrize("solver", ["gauss_newton", "lm"])
def test_least_squares_matches_optimistix(adjoint, solver):
    lsq = {
        "gauss_newton": optx.GaussNewton(TOL, TOL),
        "lm": optx.LevenbergMarquardt(TOL, TOL),
    }[solver]
    y0 = jnp.zeros(2)

    def solve_with(adj):
        def solve(a):
            return optx.least_squares(_residuals, lsq, y0, a, adjoint=adj).value

        return solve

    ours = _jvp_vjp(solve_with(_EQXDEQ_EXACT[adjoint]), _A)
    control = _jvp_vjp(solve_with(_CONTROL), _A)
    assert tree_allclose(ours, control, rtol=1e-7, atol=1e-9)


# --- approximate adjoints refuse anything but a fixed-point solve -------------------

_APPROXIMATE = {
    "jfb": eqxdeq.JFB(),
    "phantom": eqxdeq.PhantomAdjoint(3),
    "phantom_unroll": eqxdeq.PhantomAdjoint(3, mode="unroll"),
    "shine": eqxdeq.ShineAdjoint(),
    "reversible": eqxdeq.ReversibleAdjoint(),
}


@pytest.mark.parametrize("adjoint", list(_APPROXIMATE))
@pytest.mark.parametrize(
    "entry",
    ["root_find", "fixed_point_newton", "fixed_point_lm", "minimise", "least_squares"],
)
def test_approximate_adjoints_refuse_other_problems(adjoint, entry):
    adj = _APPROXIMATE[adjoint]
    y0 = jnp.zeros(2)
    call = {
        "root_find": lambda: optx.root_find(
            _tanh_cubic_root, optx.Newton(TOL, TOL), y0, _A, adjoint=adj
        ),
        "fixed_point_newton": lambda: optx.fixed_point(
            _cos_fixed, optx.Newton(TOL, TOL), y0, _A, adjoint=adj
        ),
        "fixed_point_lm": lambda: optx.fixed_point(
            _cos_fixed, optx.LevenbergMarquardt(TOL, TOL), y0, _A, adjoint=adj
        ),
        "minimise": lambda: optx.minimise(
            _quartic_minimise, optx.BFGS(TOL, TOL), y0, _A, adjoint=adj
        ),
        "least_squares": lambda: optx.least_squares(
            _residuals, optx.GaussNewton(TOL, TOL), y0, _A, adjoint=adj
        ),
    }[entry]
    with pytest.raises(ValueError, match="only be used with `optimistix.fixed_point`"):
        eqx.filter_eval_shape(call)


@pytest.mark.parametrize("adjoint", ["jfb", "phantom", "shine"])
def test_approximate_adjoints_accept_optimistix_fixed_point_solvers(adjoint):
    """The fixed-point rewrite comes with optimistix's own fixed-point solvers too;
    SHINE degrades to JFB there (no inverse-Jacobian estimate)."""
    y0 = jnp.zeros(2)

    def solve(a, adj):
        solver = optx.FixedPointIteration(TOL, TOL)
        return optx.fixed_point(_cos_fixed, solver, y0, a, adjoint=adj).value

    ours = jax.grad(lambda a: jnp.sum(solve(a, _APPROXIMATE[adjoint])))(_A)
    jfb_like = jax.grad(lambda a: jnp.sum(solve(a, eqxdeq.JFB())))(_A)
    exact = jax.grad(lambda a: jnp.sum(solve(a, _CONTROL)))(_A)
    if adjoint == "phantom":
        # Closer to the exact gradient than JFB (three damped Neumann terms).
        assert jnp.linalg.norm(ours - exact) < jnp.linalg.norm(jfb_like - exact)
    else:
        assert tree_allclose(ours, jfb_like, rtol=1e-12)
    assert tree_allclose(jfb_like, jnp.ones(2), rtol=1e-12)  # JFB: ∂f/∂a = I
