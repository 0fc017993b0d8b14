"""Every gradient method against a dense float64 implicit-function-theorem reference."""

import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
import pytest

import eqxdeq

from .helpers import dense_fixed_point, tanh_problem


def _to64(tree):
    return jtu.tree_map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree
    )


def _loss_of_fixed_point(y):
    return jnp.sum(jnp.sin(y))


def dense_gradient(fn, y0, args):
    """d loss(y*) / d args by a dense IFT solve in float64."""
    args = _to64(args)
    y_star = dense_fixed_point(fn, y0, args)
    flat = y_star.reshape(-1)
    jac = jax.jacfwd(lambda v: fn(v.reshape(y_star.shape), args).reshape(-1))(flat)
    y_bar = jax.grad(_loss_of_fixed_point)(y_star).reshape(-1)
    w = jnp.linalg.solve((jnp.eye(flat.size) - jac).T, y_bar)
    _, vjp = jax.vjp(lambda a: fn(y_star, a), args)
    return vjp(w.reshape(y_star.shape))[0], y_star, jac


def jfb_gradient(fn, y_star, args):
    """The one-step gradient: (∂f/∂θ)ᵀ ȳ at y*."""
    y_bar = jax.grad(_loss_of_fixed_point)(y_star)
    _, vjp = jax.vjp(lambda a: fn(y_star, a), args)
    return vjp(y_bar)[0]


def rel_error(grad, ref):
    """Relative 2-norm error, computed in float64."""
    grad, ref = _to64(grad), _to64(ref)
    leaves = list(zip(jtu.tree_leaves(grad), jtu.tree_leaves(ref), strict=True))
    num = sum(jnp.sum((a - b) ** 2) for a, b in leaves)
    den = sum(jnp.sum(b**2) for _, b in leaves)
    return float(jnp.sqrt(num / den))


@eqx.filter_jit
@eqx.filter_grad
def grad_through(args, fn, solver, y0, adjoint):
    sol = optx.fixed_point(fn, solver, y0, args, adjoint=adjoint, max_steps=5000)
    return _loss_of_fixed_point(sol.value)


def _tol(dtype):
    return 1e-13 if dtype == jnp.float64 else 1e-6


def _richardson_tol(dtype):
    # In float32 a fixed-point iteration on the adjoint system at spectral radius
    # 0.99 amplifies rounding by 1/(1 - 0.99), so its residual stalls near 1e-5.
    return 1e-13 if dtype == jnp.float64 else 1e-5


def _bound(dtype):
    return 1e-8 if dtype == jnp.float64 else 1e-4


exact_adjoints = {
    "implicit-default": lambda dtype: eqxdeq.ImplicitAdjoint(),
    "implicit-lu": lambda dtype: eqxdeq.ImplicitAdjoint(lx.LU()),
    "implicit-gmres": lambda dtype: eqxdeq.ImplicitAdjoint(
        lx.GMRES(rtol=_tol(dtype), atol=_tol(dtype))
    ),
    "implicit-richardson": lambda dtype: eqxdeq.ImplicitAdjoint(
        eqxdeq.Richardson(_richardson_tol(dtype), _richardson_tol(dtype), 20000)
    ),
    "shine-refined": lambda dtype: eqxdeq.ShineAdjoint(
        eqxdeq.Richardson(_richardson_tol(dtype), _richardson_tol(dtype), 20000)
    ),
    "bptt": lambda dtype: optx.RecursiveCheckpointAdjoint(),
}


def _exact_cases():
    """All exact adjoints at radius 0.5 and 0.99 in both dtypes with Anderson; the
    rest of the cross-product (Broyden, radius 0.9) is marked slow."""
    for name in exact_adjoints:
        for dtype in (jnp.float64, jnp.float32):
            for radius in (0.5, 0.9, 0.99):
                for solver_cls in (eqxdeq.Anderson, eqxdeq.Broyden):
                    slow = radius == 0.9 or solver_cls is eqxdeq.Broyden
                    marks = [pytest.mark.slow] if slow else []
                    yield pytest.param(name, radius, dtype, solver_cls, marks=marks)


@pytest.mark.parametrize("name, radius, dtype, solver_cls", list(_exact_cases()))
def test_exact_adjoints(name, radius, dtype, solver_cls):
    fn, y0, args = tanh_problem(
        jr.PRNGKey(0), n=12, batch=3, radius=radius, dtype=dtype
    )
    ref, _, _ = dense_gradient(fn, y0, args)
    tol = _tol(dtype)
    solver = solver_cls(rtol=tol, atol=tol)
    grad = grad_through(args, fn, solver, y0, exact_adjoints[name](dtype))
    assert jtu.tree_structure(grad) == jtu.tree_structure(args)
    assert all(g.dtype == dtype for g in jtu.tree_leaves(grad))
    # BPTT differentiates the iteration, which has converged to `tol`, so it is
    # exact only up to the contraction of the last iterations, and in float32 it
    # accumulates rounding over every iteration.
    bound = _bound(dtype)
    if name == "bptt" and (radius == 0.99 or dtype == jnp.float32):
        bound = 10 * bound
    assert rel_error(grad, ref) < bound


def test_jfb_is_the_one_step_gradient():
    fn, y0, args = tanh_problem(jr.PRNGKey(1), n=12, batch=3, radius=0.9)
    ref, y_star, _ = dense_gradient(fn, y0, args)
    solver = eqxdeq.Anderson(rtol=1e-13, atol=1e-13)
    grad = grad_through(args, fn, solver, y0, eqxdeq.JFB())
    assert rel_error(grad, jfb_gradient(fn, y_star, args)) < 1e-10
    # ...which is not the exact gradient.
    assert rel_error(grad, ref) > 1e-2


@pytest.mark.parametrize("mode", ["neumann", "unroll"])
def test_phantom_converges_to_exact_like_rho_to_the_k(mode):
    radius = 0.5
    fn, y0, args = tanh_problem(jr.PRNGKey(2), n=12, batch=3, radius=radius)
    ref, y_star, _ = dense_gradient(fn, y0, args)
    solver = eqxdeq.Anderson(rtol=1e-13, atol=1e-13)
    jfb = jfb_gradient(fn, y_star, args)
    first = 0 if mode == "neumann" else 1
    # k = 0 (Neumann) or k = 1 (unroll) is JFB.
    grad = grad_through(args, fn, solver, y0, eqxdeq.PhantomAdjoint(first, mode=mode))
    assert rel_error(grad, jfb) < 1e-10
    errors = []
    for k in range(first, first + 8, 2):
        adjoint = eqxdeq.PhantomAdjoint(steps=k, mode=mode)
        errors.append(rel_error(grad_through(args, fn, solver, y0, adjoint), ref))
    ratios = [b / a for a, b in zip(errors, errors[1:])]
    # The error contracts by about the spectral radius of ∂f/∂y per term (≤ radius),
    # so by about radius² every two terms.
    assert all(r < radius**2 * 1.2 for r in ratios), ratios
    assert errors[-1] < 0.05 * errors[0]


def test_phantom_damping():
    fn, y0, args = tanh_problem(jr.PRNGKey(3), n=12, batch=3, radius=0.9)
    ref, _, _ = dense_gradient(fn, y0, args)
    solver = eqxdeq.Anderson(rtol=1e-13, atol=1e-13)
    errors = [
        rel_error(
            grad_through(
                args, fn, solver, y0, eqxdeq.PhantomAdjoint(k, damping=0.5, mode=mode)
            ),
            ref,
        )
        for mode in ("neumann", "unroll")
        for k in (5, 40)
    ]
    # Damping τ = 0.5 on a radius-0.9 layer contracts by 0.5 + 0.5 * 0.9 = 0.95 per
    # term: 35 more terms shrink the error by about 0.95^35 ≈ 0.17.
    assert errors[1] < 0.3 * errors[0] and errors[3] < 0.3 * errors[2], errors


@pytest.mark.parametrize(
    "solver, n, batch, radius, input_scale",
    [
        (eqxdeq.Anderson(1e-10, 1e-10, memory=8), 16, 2, 0.9, 0.1),
        (eqxdeq.Anderson(1e-10, 1e-10, memory=8), 16, 2, 0.99, 0.1),
        (eqxdeq.Anderson(1e-10, 1e-10, memory=8), 16, 1, 0.99, 1.0),
        (eqxdeq.Broyden(1e-10, 1e-10, memory=64), 8, 1, 0.9, 0.1),
        (eqxdeq.Broyden(1e-10, 1e-10, memory=64), 16, 2, 0.9, 1.0),
        (eqxdeq.Broyden(1e-10, 1e-10, memory=64), 16, 2, 0.99, 1.0),
    ],
)
def test_shine_closer_than_jfb(solver, n, batch, radius, input_scale):
    """The forward solver's inverse-Jacobian estimate beats the identity.

    The estimate is only accurate on the directions the solver explored, so how much
    it helps depends on the problem: measured SHINE/JFB errors here are 0.27/0.56,
    0.32/0.63, 0.12/0.43 (Anderson) and 0.24/0.47, 0.21/0.39, 0.24/0.43 (Broyden).
    On nearly linear problems of larger size Broyden's estimate can be worse than
    the identity (see the docs of `ShineAdjoint`).
    """
    fn, y0, args = tanh_problem(
        jr.PRNGKey(4), n=n, batch=batch, radius=radius, input_scale=input_scale
    )
    ref, _, _ = dense_gradient(fn, y0, args)
    shine = rel_error(grad_through(args, fn, solver, y0, eqxdeq.ShineAdjoint()), ref)
    jfb = rel_error(grad_through(args, fn, solver, y0, eqxdeq.JFB()), ref)
    assert shine < 0.8 * jfb, (shine, jfb)


def test_shine_without_estimate_is_jfb():
    fn, y0, args = tanh_problem(jr.PRNGKey(6), n=12, batch=3, radius=0.9)
    solver = eqxdeq.Picard(rtol=1e-13, atol=1e-13)
    shine = grad_through(args, fn, solver, y0, eqxdeq.ShineAdjoint())
    jfb = grad_through(args, fn, solver, y0, eqxdeq.JFB())
    assert rel_error(shine, jfb) < 1e-12
    solver = optx.FixedPointIteration(rtol=1e-13, atol=1e-13)
    shine = grad_through(args, fn, solver, y0, eqxdeq.ShineAdjoint())
    assert rel_error(shine, jfb) < 1e-8


def test_pytree_and_nested_module_parameters():
    """Parameters inside nested equinox modules; a dict-valued state."""

    class Inner(eqx.Module):
        weight: jax.Array

    class Cell(eqx.Module):
        inner: Inner
        bias: jax.Array

        def __call__(self, z, x):
            h = jnp.tanh(z["h"] @ self.inner.weight + x + self.bias)
            return {"h": h, "s": 0.5 * z["s"] + jnp.mean(h)}

    _, _, (weight, x) = tanh_problem(jr.PRNGKey(7), n=10, batch=2, radius=0.8)
    cell = Cell(Inner(weight), jnp.full((1, 10), 0.1))
    y0 = {"h": jnp.zeros((2, 10)), "s": jnp.zeros(())}
    fn = lambda z, args: args[0](z, args[1])

    def loss(cell, adjoint):
        sol = optx.fixed_point(
            fn, eqxdeq.Anderson(1e-13, 1e-13), y0, (cell, x), adjoint=adjoint
        )
        return jnp.sum(jnp.sin(sol.value["h"])) + sol.value["s"] ** 2

    exact = eqx.filter_grad(loss)(cell, optx.ImplicitAdjoint(lx.LU()))
    for adjoint in (
        eqxdeq.ImplicitAdjoint(),
        eqxdeq.ShineAdjoint(eqxdeq.Richardson(1e-13, 1e-13)),
    ):
        grad = eqx.filter_jit(eqx.filter_grad(loss))(cell, adjoint)
        assert rel_error(grad, exact) < 1e-8


@pytest.mark.parametrize(
    "solver",
    [eqxdeq.Anderson(1e-6, 1e-6), eqxdeq.NewtonKrylov(1e-6, 1e-6)],
    ids=["anderson", "newton_krylov"],
)
def test_mixed_dtype_state(solver):
    """A float32 leaf and a float64 leaf: the backward linear solve runs on a
    uniform (float64) view of the state, with tolerances for float32. (lineax's
    GMRES on the mixed pytree itself fails to trace.)"""

    def cell(z, args):
        weight, x = args
        h = jnp.tanh(z["h"] @ weight + x)
        return {"h": h, "s": 0.5 * z["s"] + jnp.mean(h).astype(z["s"].dtype)}

    _, _, (weight, x) = tanh_problem(jr.PRNGKey(7), n=10, batch=2, radius=0.8)

    def loss(args, y0, adjoint, solver):
        sol = optx.fixed_point(cell, solver, y0, args, adjoint=adjoint)
        h = sol.value["h"].astype(jnp.float64)
        return jnp.sum(jnp.sin(h)) + sol.value["s"] ** 2

    mixed = {"h": jnp.zeros((2, 10), jnp.float32), "s": jnp.zeros((), jnp.float64)}
    args32 = (weight.astype(jnp.float32), x.astype(jnp.float32))
    # Reference: the same model entirely in float64, dense solve.
    y0_64 = {"h": jnp.zeros((2, 10)), "s": jnp.zeros(())}
    exact = jax.grad(loss)(
        (weight, x), y0_64, optx.ImplicitAdjoint(lx.LU()), eqxdeq.Anderson(1e-13, 1e-13)
    )
    for adjoint in (eqxdeq.ImplicitAdjoint(), eqxdeq.ImplicitAdjoint(lx.LU())):
        grad = eqx.filter_jit(eqx.filter_grad(loss))(args32, mixed, adjoint, solver)
        assert all(g.dtype == jnp.float32 for g in jtu.tree_leaves(grad))
        assert rel_error(grad, exact) < 1e-4


def test_forward_mode_and_hessian_vector_product():
    fn, y0, (weight, bias) = tanh_problem(jr.PRNGKey(8), n=12, batch=3, radius=0.9)
    tangent = jr.normal(jr.PRNGKey(9), bias.shape)

    def y_star(bias, adjoint):
        solver = eqxdeq.Anderson(1e-13, 1e-13)
        return optx.fixed_point(fn, solver, y0, (weight, bias), adjoint=adjoint).value

    dense = optx.ImplicitAdjoint(lx.LU())
    _, jvp = jax.jvp(lambda b: y_star(b, eqxdeq.ImplicitAdjoint()), (bias,), (tangent,))
    _, jvp_ref = jax.jvp(lambda b: y_star(b, dense), (bias,), (tangent,))
    assert rel_error(jvp, jvp_ref) < 1e-10

    def hvp(adjoint):
        loss = lambda b: jnp.sum(y_star(b, adjoint) ** 3)
        return jax.jvp(jax.grad(loss), (bias,), (tangent,))[1]

    assert rel_error(hvp(eqxdeq.ImplicitAdjoint()), hvp(dense)) < 1e-9


def test_jvp_through_approximate_adjoints():
    fn, y0, (weight, bias) = tanh_problem(jr.PRNGKey(10), n=12, batch=3, radius=0.5)
    tangent = jr.normal(jr.PRNGKey(11), bias.shape)
    _, y_star, jac = dense_gradient(fn, y0, (weight, bias))
    # JFB's tangent is ∂f/∂θ · t.
    jfb_tangent = jax.jvp(lambda b: fn(y_star, (weight, b)), (bias,), (tangent,))[1]
    for adjoint in (
        eqxdeq.JFB(),
        eqxdeq.PhantomAdjoint(0),
        eqxdeq.PhantomAdjoint(1, mode="unroll"),
    ):

        def y_of(b):
            solver = eqxdeq.Anderson(1e-13, 1e-13)
            return optx.fixed_point(fn, solver, y0, (weight, b), adjoint=adjoint).value

        _, out = jax.jvp(y_of, (bias,), (tangent,))
        assert rel_error(out, jfb_tangent) < 1e-10


def test_memory_flat_in_max_steps():
    fn, y0, (weight, bias) = tanh_problem(jr.PRNGKey(12), n=16, batch=4, radius=0.9)

    def temp_bytes(adjoint, max_steps):
        def loss(b):
            solver = eqxdeq.Anderson(1e-10, 1e-10)
            sol = optx.fixed_point(
                fn, solver, y0, (weight, b), adjoint=adjoint, max_steps=max_steps
            )
            return jnp.sum(sol.value)

        compiled = jax.jit(jax.grad(loss)).lower(bias).compile()
        analysis = compiled.memory_analysis()
        assert analysis is not None, "this backend reports no memory analysis"
        return analysis.temp_size_in_bytes

    for adjoint in (eqxdeq.ImplicitAdjoint(), eqxdeq.JFB(), eqxdeq.ShineAdjoint()):
        assert temp_bytes(adjoint, 16) == temp_bytes(adjoint, 4096)
    # ... whereas backpropagating through the iterations grows with max_steps.
    bptt = optx.RecursiveCheckpointAdjoint()
    assert temp_bytes(bptt, 4096) > 2 * temp_bytes(bptt, 16)


_FAILING_BACKWARD = """
import jax, jax.numpy as jnp, optimistix as optx, eqxdeq
jax.config.update("jax_enable_x64", True)
# At the fixed point z* = 0 of z -> a z with a = 1.5, I - df/dz = -0.5 I, so
# Richardson on the adjoint system diverges and runs out of steps.
fn = lambda z, a: a * z
def loss(a):
    adjoint = eqxdeq.ImplicitAdjoint(eqxdeq.Richardson(1e-8, 1e-8, max_steps=50))
    sol = optx.fixed_point(fn, eqxdeq.Picard(1e-8, 1e-8), jnp.zeros(3), a,
                           adjoint=adjoint)
    return jnp.sum(sol.value)
print("GRADIENT", jax.grad(loss)(jnp.array(1.5)))
"""


@pytest.mark.parametrize("on_error", ["raise", "nan"])
def test_backward_failure_is_not_silent(on_error):
    """A failed backward solve raises; with `EQX_ON_ERROR=nan` the gradient is NaN.

    Run in a subprocess: equinox reads `EQX_ON_ERROR` at import time.
    """
    env = dict(os.environ, EQX_ON_ERROR=on_error)
    out = subprocess.run(
        [sys.executable, "-c", _FAILING_BACKWARD],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if on_error == "raise":
        assert out.returncode != 0
        assert "maximum number of solver steps" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert "GRADIENT nan" in out.stdout


def test_backward_with_a_working_solver_on_the_same_problem():
    fn = lambda z, a: a * z

    def loss(a):
        adjoint = eqxdeq.ImplicitAdjoint(lx.LU())
        sol = optx.fixed_point(
            fn, eqxdeq.Picard(1e-8, 1e-8), jnp.zeros(3), a, adjoint=adjoint
        )
        return jnp.sum(sol.value)

    assert jax.grad(loss)(jnp.array(1.5)) == 0


def test_vmap_and_filter_jit_training_step():
    fn, y0, (weight, bias) = tanh_problem(jr.PRNGKey(13), n=8, batch=1, radius=0.9)
    biases = jr.normal(jr.PRNGKey(14), (5, 1, 8)) * 0.3

    @eqx.filter_jit
    def step(weight):
        def per_sample(w, b):
            sol = optx.fixed_point(
                fn,
                eqxdeq.Broyden(1e-12, 1e-12),
                y0,
                (w, b),
                adjoint=eqxdeq.ImplicitAdjoint(),
            )
            return jnp.sum(jnp.sin(sol.value))

        total = lambda w: jnp.sum(jax.vmap(per_sample, in_axes=(None, 0))(w, biases))
        return jax.grad(total)(weight)

    grad = step(weight)
    ref = sum(dense_gradient(fn, y0, (weight, b))[0][0] for b in biases)
    assert rel_error(grad, ref) < 1e-8
