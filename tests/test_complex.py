"""Complex states: every solver against the known fixed point (or optimistix's
`FixedPointIteration`), real statistics, and every adjoint against
`optimistix.ImplicitAdjoint` and the closed-form tangent.

The cos problem and the linear problem are one layer, `A y + b + s cos(y)`, with
`A = 0` or `s = 0`: they share every compilation (the test is about the arithmetic,
and compiling is most of its time)."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
import pytest

import eqxdeq

from .helpers import FIXED_POINT_SOLVERS


# optimistix warns on every complex solve.
pytestmark = pytest.mark.filterwarnings("ignore:Complex support")

TOL = 1e-11  # solver tolerances
MATCH = 1e-8  # how close results must be
N = 4


def make_solver(name, tol):
    """Every solver configuration of `FIXED_POINT_SOLVERS`, and the solvers outside
    the descent+search loop."""
    if name in FIXED_POINT_SOLVERS:
        return FIXED_POINT_SOLVERS[name](tol)
    if name == "reversible":
        return eqxdeq.Reversible(tol, tol)
    if name == "fallback":
        stages = (eqxdeq.Picard(tol, tol), eqxdeq.Anderson(tol, tol))
        return eqxdeq.Fallback(*stages, stage_steps=(5, None))
    assert name == "steady_state"
    return eqxdeq.SteadyState(tol, tol)


SOLVER_NAMES = list(FIXED_POINT_SOLVERS) + ["reversible", "fallback", "steady_state"]
SOLVERS = {name: make_solver(name, TOL) for name in SOLVER_NAMES}


# The problems, as global functions so that repeated solves share a compilation.


def array_layer(y, args):
    """`A y + b + s cos(y)`: the cos problem (`A = 0`) and the linear one (`s = 0`)."""
    matrix, b, s = args
    return matrix @ y + b + s * jnp.cos(y)


def pytree_layer(y, args):
    """A complex and a real leaf, coupled both ways (not holomorphic in `y["a"]`:
    the real leaf sees `|a|`)."""
    c, d = args
    za, zb = y["a"], y["b"]
    return {
        "a": 0.4 * jnp.sin(za) + (0.2 * jnp.tanh(zb)).astype(za.dtype) + c,
        "b": 0.3 * jnp.tanh(zb) + 0.2 * jnp.abs(za) + d,
    }


def _complex_normal(key, shape):
    re, im = jr.normal(key, (2,) + shape, dtype=jnp.float64)
    return jax.lax.complex(re, im)


def reference(fn, y0, args):
    """optimistix's own fixed-point iteration, to convergence."""
    solver = optx.FixedPointIteration(rtol=1e-14, atol=1e-14)
    return optx.fixed_point(fn, solver, y0, args, max_steps=10_000).value


@ft.cache
def problem(name):
    """`(fn, y0, args, y_star)`."""
    if name == "pytree":
        args = (jnp.array([0.3 - 0.2j, 0.1 + 0.5j, -0.2j]), jnp.array([0.2, -0.4, 0.1]))
        y0 = {"a": jnp.zeros(3, jnp.complex128), "b": jnp.zeros(3, jnp.float64)}
        return pytree_layer, y0, args, reference(pytree_layer, y0, args)
    y0 = jnp.zeros(N, jnp.complex128)
    if name == "cos":
        b = jnp.array([0.5 + 0.2j, 0.3 - 0.1j, -0.2 + 0.4j, 0.1j])
        args = (jnp.zeros((N, N), jnp.complex128), b, jnp.array(0.5 + 0j))
        return array_layer, y0, args, reference(array_layer, y0, args)
    assert name == "linear"
    akey, bkey = jr.split(jr.PRNGKey(0))
    matrix = _complex_normal(akey, (N, N))
    matrix = 0.6 * matrix / jnp.linalg.norm(matrix, 2).astype(matrix.dtype)
    b = _complex_normal(bkey, (N,))
    # The known fixed point (I - A)⁻¹ b.
    y_star = jnp.linalg.solve(jnp.eye(N, dtype=matrix.dtype) - matrix, b)
    return array_layer, y0, (matrix, b, jnp.array(0j)), y_star


def exact_tangent(args, tangent, y_star):
    """`dy* = (I - ∂f/∂y)⁻¹ (∂f/∂θ · t)` for `array_layer`, densely: here
    `∂f/∂y = A - s diag(sin y*)` (holomorphic)."""
    (matrix, _, s), (t_matrix, t_b, t_s) = args, tangent
    jac = matrix - s * jnp.diag(jnp.sin(y_star))
    direct = t_matrix @ y_star + t_b + t_s * jnp.cos(y_star)
    return jnp.linalg.solve(jnp.eye(N, dtype=jac.dtype) - jac, direct), jac, direct


def assert_close(x, y, tol=MATCH):
    for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y), strict=True):
        assert a.dtype == b.dtype
        error = float(jnp.max(jnp.abs(a - b)))
        assert error < tol, error


def assert_real_stats(stats):
    floating = {
        key: value
        for key, value in stats.items()
        if eqx.is_array(value) and jnp.issubdtype(value.dtype, jnp.inexact)
    }
    assert "abs_residual" in floating and "rel_residual" in floating
    for key, value in floating.items():
        assert value.dtype == jnp.float64, (key, value.dtype)


def test_references():
    """The references themselves: optimistix's iteration solves the linear problem
    to its closed form, and the cos problem's point is a fixed point."""
    fn, y0, args, y_star = problem("linear")
    assert_close(reference(fn, y0, args), y_star, 1e-12)
    fn, y0, args, y_star = problem("cos")
    assert_close(fn(y_star, args), y_star, 1e-12)


# Each solver on the pytree state compiles anew; these variants of solvers tested
# there already (same descent or search) run with the slow tests.
_SLOW_ON_PYTREE = (
    "picard_relaxed",
    "anderson",
    "broyden_ls",
    "broyden_lr",
    "newton_krylov_ls",
    "anderson_bt",
    "fallback",
)


def _solver_cases(slow=True):
    for name in SOLVER_NAMES:
        for name_problem in ("cos", "linear", "pytree"):
            if slow and name_problem == "pytree" and name in _SLOW_ON_PYTREE:
                yield pytest.param(name, name_problem, marks=pytest.mark.slow)
            else:
                yield name, name_problem


@pytest.mark.parametrize("name, name_problem", list(_solver_cases()))
def test_solver_finds_the_fixed_point(name, name_problem):
    fn, y0, args, y_star = problem(name_problem)
    sol = optx.fixed_point(fn, SOLVERS[name], y0, args, max_steps=2000)
    assert sol.stats["result"] == eqxdeq.RESULTS.successful
    assert_close(sol.value, y_star)
    assert_real_stats(sol.stats)
    assert float(sol.stats["abs_residual"]) < 1e-9


def test_statistics_and_norms():
    """Residual history and the `"norm"` criterion with optimistix's 2-norm: all
    statistics real, the residuals those of |z|."""
    fn, y0, args, y_star = problem("cos")
    termination = eqxdeq.Termination(criterion="norm")
    solver = eqxdeq.Anderson(
        TOL, TOL, optx.two_norm, termination=termination, history_length=6
    )
    sol = optx.fixed_point(fn, solver, y0, args, max_steps=200)
    assert_close(sol.value, y_star)
    assert_real_stats(sol.stats)
    # The first entry is ‖f(y0) - y0‖_2, a norm of moduli.
    # (y0 = 0.)
    expected = jnp.sqrt(jnp.sum(jnp.abs(array_layer(y0, args)) ** 2))
    assert jnp.allclose(sol.stats["residual_history"][0], expected, rtol=1e-14)


def test_anderson_gram_matrix_is_hermitian():
    fn, y0, args, _ = problem("linear")
    solver = eqxdeq.Anderson(TOL, TOL, memory=3)
    sol = optx.fixed_point(fn, solver, y0, args, max_steps=2000)
    state = sol.state.descent_state
    assert state.gram.dtype == jnp.complex128
    # G_ij = <Δg_i, Δg_j> = Δg_iᴴ Δg_j.
    expected = state.dg.conj() @ state.dg.T
    assert jnp.allclose(state.gram, state.gram.conj().T, rtol=0, atol=0)
    assert jnp.allclose(state.gram, expected, rtol=1e-10, atol=0)


@eqx.filter_jit
def _broyden_update(descent, args, y_prev, y):
    info = optx.FunctionInfo.Residual
    g_prev, g = array_layer(y_prev, args) - y_prev, array_layer(y, args) - y
    state = descent.init(y, info(jax.eval_shape(lambda: y)))
    state = descent.query(y_prev, info(g_prev), state)
    return descent.query(y, info(g), state), g - g_prev


def test_broyden_secant_condition():
    """After an update, the good Broyden estimate satisfies the secant condition
    `H Δg = Δy`, and `inverse_jacobian_rmv` is its conjugate transpose."""
    _, _, args, _ = problem("linear")
    descent = eqxdeq.BroydenDescent(memory=8)
    keys = jr.split(jr.PRNGKey(1), 4)
    y_prev, y, x, z = (_complex_normal(k, (N,)) for k in keys)
    state, dg = _broyden_update(descent, args, y_prev, y)
    assert int(state.count) == 1
    h_dg = descent.inverse_jacobian_mv(state, dg)
    assert jnp.allclose(h_dg, y - y_prev, rtol=1e-12, atol=1e-12)
    # <x, H z> = <Hᴴ x, z>.
    lhs = jnp.vdot(x, descent.inverse_jacobian_mv(state, z))
    rhs = jnp.vdot(descent.inverse_jacobian_rmv(state, x), z)
    assert jnp.allclose(lhs, rhs, rtol=1e-12)


# Gradients and tangents.

FORWARD = eqxdeq.Picard(1e-13, 1e-13)


def _solve(args, fn, y0, adjoint, solver: optx.AbstractFixedPointSolver = FORWARD):
    return optx.fixed_point(fn, solver, y0, args, adjoint=adjoint, max_steps=5000)


@eqx.filter_jit
def _jvp(
    args, tangent, fn, y0, adjoint, solver: optx.AbstractFixedPointSolver = FORWARD
):
    return jax.jvp(
        lambda a: _solve(a, fn, y0, adjoint, solver).value, (args,), (tangent,)
    )[1]


@eqx.filter_jit
def _grad(args, fn, y0, adjoint, solver: optx.AbstractFixedPointSolver = FORWARD):
    """The gradient of the real loss Σ|y*|². (JAX's convention for a complex
    input: the conjugate of 2 ∂L/∂z̄; the control is taken the same way.)"""

    def loss(a):
        y = _solve(a, fn, y0, adjoint, solver).value
        return sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jtu.tree_leaves(y))

    return jax.grad(loss)(args)


def _tangent(args, key=jr.PRNGKey(7)):
    leaves, treedef = jtu.tree_flatten(args)
    out = []
    for k, leaf in zip(jr.split(key, len(leaves)), leaves):
        if jnp.iscomplexobj(leaf):
            out.append(_complex_normal(k, leaf.shape))
        else:
            out.append(jr.normal(k, leaf.shape, leaf.dtype))
    return jtu.tree_unflatten(treedef, out)


@ft.cache
def control(name_problem):
    """`optimistix.ImplicitAdjoint`'s tangent and gradient (after Picard)."""
    fn, y0, args, _ = problem(name_problem)
    adjoint = optx.ImplicitAdjoint()
    return _jvp(args, _tangent(args), fn, y0, adjoint), _grad(args, fn, y0, adjoint)


IMPLICIT_ADJOINTS = {
    "default": eqxdeq.ImplicitAdjoint(),
    "lu": eqxdeq.ImplicitAdjoint(lx.LU()),
    "richardson": eqxdeq.ImplicitAdjoint(
        eqxdeq.Richardson(1e-13, 1e-13, max_steps=1000)
    ),
    "neumann": eqxdeq.ImplicitAdjoint(eqxdeq.Neumann(steps=100)),
}


@pytest.mark.parametrize("name_problem", ["cos", "linear"])
@pytest.mark.parametrize("name", list(IMPLICIT_ADJOINTS))
def test_implicit_adjoints_match_optimistix(name, name_problem):
    fn, y0, args, y_star = problem(name_problem)
    adjoint = IMPLICIT_ADJOINTS[name]
    tangent = _tangent(args)
    jvp_control, grad_control = control(name_problem)
    out = _jvp(args, tangent, fn, y0, adjoint)
    assert_close(out, jvp_control)
    assert_close(out, exact_tangent(args, tangent, y_star)[0])
    assert_close(_grad(args, fn, y0, adjoint), grad_control)


def _split_layer(y, args):
    """`pytree_layer` with its complex leaf as two real ones."""
    out = pytree_layer({"a": jax.lax.complex(*y["a"]), "b": y["b"]}, args)
    return {"a": (jnp.real(out["a"]), jnp.imag(out["a"])), "b": out["b"]}


@pytest.mark.parametrize(
    "name, mode",
    [
        ("default", "jvp"),
        pytest.param("default", "grad", marks=pytest.mark.slow),
        pytest.param("lu", "jvp", marks=pytest.mark.slow),
        pytest.param("lu", "grad", marks=pytest.mark.slow),
    ],
)
def test_implicit_adjoint_pytree_state(name, mode):
    """A state mixing complex and real leaves is a real vector space (the backward
    solve runs on real and imaginary parts, right also for its non-holomorphic
    layer): against the same problem written with real leaves only."""
    fn, y0, args, _ = problem("pytree")
    adjoint, split_adjoint = IMPLICIT_ADJOINTS[name], optx.ImplicitAdjoint()
    split_y0 = {"a": (jnp.zeros(3), jnp.zeros(3)), "b": jnp.zeros(3)}
    if mode == "jvp":
        tangent = _tangent(args)
        out = _jvp(args, tangent, fn, y0, adjoint)
        out_split = _jvp(args, tangent, _split_layer, split_y0, split_adjoint)
        assert_close(out["a"], jax.lax.complex(*out_split["a"]))
        assert_close(out["b"], out_split["b"])
    else:
        grad = _grad(args, fn, y0, adjoint)
        assert_close(grad, _grad(args, _split_layer, split_y0, split_adjoint))


def split_tanh_layer(y, args):
    """`tanh(Re z) + i tanh(Im z)` of `z = W y + b`: not holomorphic."""
    weight, b = args
    z = weight @ y + b
    return jax.lax.complex(jnp.tanh(jnp.real(z)), jnp.tanh(jnp.imag(z)))


def _split_tanh_real(y, args):
    """`split_tanh_layer` on `(Re y, Im y)`."""
    out = split_tanh_layer(jax.lax.complex(*y), args)
    return jnp.real(out), jnp.imag(out)


@pytest.mark.parametrize(
    "name",
    [
        "default",
        pytest.param("richardson", marks=pytest.mark.slow),
        pytest.param("neumann", marks=pytest.mark.slow),
    ],
)
def test_matrix_free_adjoints_on_a_non_holomorphic_layer(name):
    """The matrix-free backward solves apply ∂f/∂y by Jacobian-vector products, so
    they stay right when f is not holomorphic (`lineax.LU` would not: it
    materialises ∂f/∂y as a complex matrix)."""
    wkey, bkey = jr.split(jr.PRNGKey(3))
    weight = _complex_normal(wkey, (N, N))
    weight = 0.5 * weight / jnp.linalg.norm(weight, 2).astype(weight.dtype)
    args = (weight, _complex_normal(bkey, (N,)))
    y0 = jnp.zeros(N, jnp.complex128)
    tangent = _tangent(args)
    out = _jvp(args, tangent, split_tanh_layer, y0, IMPLICIT_ADJOINTS[name])
    real_y0 = (jnp.zeros(N), jnp.zeros(N))
    re, im = _jvp(args, tangent, _split_tanh_real, real_y0, optx.ImplicitAdjoint())
    assert_close(out, jax.lax.complex(re, im))


def test_jfb_and_phantom_formulas():
    """JFB's tangent is ∂f/∂θ · t at y*; Neumann phantom gradients are
    τ Σ_{i≤k} (I - τ(I - ∂f/∂y))^i of it; unrolled ones are k damped steps."""
    fn, y0, args, y_star = problem("linear")
    tangent = _tangent(args)
    _, jac, direct = exact_tangent(args, tangent, y_star)
    assert_close(_jvp(args, tangent, fn, y0, eqxdeq.JFB()), direct)

    k, tau = 4, 0.7
    eye = jnp.eye(N, dtype=jac.dtype)
    term = expected = tau * direct
    for _ in range(k):
        term = (eye - tau * (eye - jac)) @ term
        expected = expected + term
    phantom = eqxdeq.PhantomAdjoint(steps=k, damping=tau)
    assert_close(_jvp(args, tangent, fn, y0, phantom), expected)

    # Unrolled: t_{j+1} = (1 - τ) t_j + τ (∂f/∂y t_j + ∂f/∂θ · t), from t_0 = 0.
    t_y = jnp.zeros(N, jnp.complex128)
    for _ in range(k):
        t_y = (1 - tau) * t_y + tau * (jac @ t_y + direct)
    unroll = eqxdeq.PhantomAdjoint(steps=k, damping=tau, mode="unroll")
    assert_close(_jvp(args, tangent, fn, y0, unroll), t_y)

    # Reverse mode: JFB's gradient is the one-step gradient (∂f/∂θ)ᵀ ȳ.
    def one_step_loss(a):
        return jnp.sum(jnp.abs(array_layer(y_star, a)) ** 2)

    assert_close(_grad(args, fn, y0, eqxdeq.JFB()), jax.grad(one_step_loss)(args))


@pytest.mark.slow
def test_phantom_gradients_finite():
    fn, y0, args, _ = problem("linear")
    for adjoint in (
        eqxdeq.PhantomAdjoint(steps=4, damping=0.7),
        eqxdeq.PhantomAdjoint(steps=4, damping=0.7, mode="unroll"),
    ):
        grads = _grad(args, fn, y0, adjoint)
        assert all(jnp.all(jnp.isfinite(g)) for g in jtu.tree_leaves(grads))


@pytest.mark.parametrize(
    "solver_name", ["broyden", pytest.param("anderson", marks=pytest.mark.slow)]
)
def test_shine_applies_the_estimate(solver_name):
    """SHINE's tangent is P (∂f/∂θ · t) with P = -H the forward solver's
    inverse-Jacobian estimate, and refining it reaches the exact tangent."""
    fn, y0, args, y_star = problem("cos")
    solver = SOLVERS[solver_name]
    tangent = _tangent(args)
    exact, _, direct = exact_tangent(args, tangent, y_star)
    sol = optx.fixed_point(fn, solver, y0, args, max_steps=2000)
    descent = solver.descent  # pyright: ignore[reportAttributeAccessIssue]
    expected = -descent.inverse_jacobian_mv(sol.state.descent_state, direct)
    assert_close(_jvp(args, tangent, fn, y0, eqxdeq.ShineAdjoint(), solver), expected)
    grads = _grad(args, fn, y0, eqxdeq.ShineAdjoint(), solver)
    assert all(jnp.all(jnp.isfinite(g)) for g in jtu.tree_leaves(grads))
    refine = eqxdeq.ShineAdjoint(eqxdeq.Richardson(1e-13, 1e-13, max_steps=500))
    assert_close(_jvp(args, tangent, fn, y0, refine, solver), exact)


def test_shine_after_picard_is_jfb():
    fn, y0, args, y_star = problem("cos")
    tangent = _tangent(args)
    _, _, direct = exact_tangent(args, tangent, y_star)
    assert_close(_jvp(args, tangent, fn, y0, eqxdeq.ShineAdjoint()), direct)


def test_reversible_adjoint_matches_backpropagation():
    fn, y0, args, _ = problem("cos")
    solver = eqxdeq.Reversible(1e-12, 1e-12, relaxation=0.6)
    grad = _grad(args, fn, y0, eqxdeq.ReversibleAdjoint(), solver)
    bptt = optx.RecursiveCheckpointAdjoint()
    assert_close(grad, _grad(args, fn, y0, bptt, solver))


@pytest.mark.parametrize(
    "name",
    [
        "newton_krylov",
        "steady_state",
        pytest.param("anderson", marks=pytest.mark.slow),
        pytest.param("fallback", marks=pytest.mark.slow),
    ],
)
def test_implicit_adjoint_after_other_solvers(name):
    fn, y0, args, y_star = problem("cos")
    tangent = _tangent(args)
    out = _jvp(args, tangent, fn, y0, eqxdeq.ImplicitAdjoint(), SOLVERS[name])
    assert_close(out, exact_tangent(args, tangent, y_star)[0])


@pytest.mark.slow
@pytest.mark.parametrize("name, name_problem", list(_solver_cases(slow=False)))
def test_solver_complex64(name, name_problem):
    """Single precision: complex64 states get float32 statistics."""
    fn, y0, args, y_star = problem(name_problem)
    to32 = lambda x: x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)
    y0, args, y_star = jtu.tree_map(to32, (y0, args, y_star))
    sol = optx.fixed_point(fn, make_solver(name, 1e-5), y0, args, max_steps=2000)
    assert_close(sol.value, y_star, 1e-4)
    for key in ("abs_residual", "rel_residual", "best_abs_residual"):
        assert sol.stats[key].dtype == jnp.float32, key
