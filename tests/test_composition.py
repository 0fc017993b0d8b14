"""eqxdeq composed with diffrax, lineax and JAX transformations.

- a DEQ inside the vector field of a diffrax neural ODE, differentiated by diffrax's
  adjoints;
- lineax solvers not covered by `test_adjoint.py` in the backward pass of
  `eqxdeq.ImplicitAdjoint`;
- eqxdeq's lineax solvers under `jit(grad(vmap(lx.linear_solve)))` and on a
  matrix-free pytree operator;
- forward mode through a continuous DEQ (`eqxdeq.SteadyState`).
"""

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import eqxdeq

from .helpers import dense_ift_gradient, dense_newton, tanh_problem


def _rel_error(x, y):
    """Relative 2-norm error between two pytrees, in float64."""
    x = jax.flatten_util.ravel_pytree(x)[0].astype(jnp.float64)
    y = jax.flatten_util.ravel_pytree(y)[0].astype(jnp.float64)
    return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))


#
# 1. A DEQ inside a diffrax vector field
#

HIDDEN, STATE = 8, 4


def _cell(z, args):
    weight, x = args
    return jnp.tanh(weight @ z + x)


def _cell_unrolled(weight, x, steps=80):
    """The fixed point of `_cell` by plain iteration in a `lax.fori_loop`,
    differentiated by backpropagation through the iterations: with ‖W‖ = 0.6 the
    iterate and its derivatives converge like 0.6^k (to ~1e-18 at k = 80)."""
    z0 = jnp.zeros(HIDDEN, x.dtype)
    return jax.lax.fori_loop(0, steps, lambda _, z: _cell(z, (weight, x)), z0)


def _params(key):
    wkey, ukey, vkey, bkey = jr.split(key, 4)
    weight = jr.normal(wkey, (HIDDEN, HIDDEN))
    weight = 0.6 * weight / jnp.linalg.norm(weight, 2)
    u = 0.5 * jr.normal(ukey, (HIDDEN, STATE))
    v = 0.5 * jr.normal(vkey, (STATE, HIDDEN))
    b = 0.1 * jr.normal(bkey, (HIDDEN,))
    return weight, u, v, b


class _DEQField(eqx.Module):
    """dy/dt = V z*(y, t), where z* = tanh(W z* + U y + b + cos(t))."""

    solver: optx.AbstractFixedPointSolver | None  # None: the unrolled reference

    def __call__(self, t, y, params):
        weight, u, v, b = params
        x = u @ y + b + jnp.cos(t)
        z0 = jnp.zeros(HIDDEN, y.dtype)
        if self.solver is None:
            z = _cell_unrolled(weight, x)
        else:
            z = optx.fixed_point(
                _cell,
                self.solver,
                z0,
                (weight, x),
                adjoint=eqxdeq.ImplicitAdjoint(),
                max_steps=500,
            ).value
        return v @ z


_FIXED_POINT_SOLVERS = {
    "picard": eqxdeq.Picard(1e-13, 1e-13),
    "anderson": eqxdeq.Anderson(1e-13, 1e-13),
    "newton": None,
}
_DIFFRAX_ADJOINTS = {
    "recursive": diffrax.RecursiveCheckpointAdjoint(),
    "backsolve": diffrax.BacksolveAdjoint(),
}


@eqx.filter_jit
def _ode_loss(params, y0, field, adjoint, ode_solver=diffrax.Tsit5()):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        ode_solver,
        t0=0.0,
        t1=1.0,
        dt0=0.125,
        y0=y0,
        args=params,
        stepsize_controller=diffrax.ConstantStepSize(),
        adjoint=adjoint,
    )
    assert sol.ys is not None
    return jnp.sum(jnp.sin(sol.ys[-1]))


def _ode_loss_of_pair(pair, field, adjoint, ode_solver=diffrax.Tsit5()):
    params, y0 = pair
    return _ode_loss(params, y0, field, adjoint, ode_solver)


_ode_value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_ode_loss_of_pair))


def _ode_problem():
    params = _params(jr.PRNGKey(0))
    y0 = jr.normal(jr.PRNGKey(1), (STATE,))
    return params, y0


# With Tsit5 this compiles for about 8 s (Euler: 4 s).
@pytest.mark.parametrize(
    "ode_solver",
    [diffrax.Euler(), pytest.param(diffrax.Tsit5(), marks=pytest.mark.slow)],
    ids=["euler", "tsit5"],
)
def test_deq_in_neural_ode_against_finite_differences(ode_solver):
    """Gradients w.r.t. (W, U, V, b, y0) of a loss at the end of a neural ODE whose
    vector field solves a DEQ (`Picard` + `ImplicitAdjoint`), differentiated by
    `diffrax.RecursiveCheckpointAdjoint`, match central finite differences along
    random directions."""
    params, y0 = _ode_problem()
    field = _DEQField(_FIXED_POINT_SOLVERS["picard"])
    recursive = _DIFFRAX_ADJOINTS["recursive"]
    _, grad = _ode_value_and_grad((params, y0), field, recursive, ode_solver)
    flat, unravel = jax.flatten_util.ravel_pytree((params, y0))
    flat_grad = jax.flatten_util.ravel_pytree(grad)[0]
    h = 1e-5
    for seed in range(3):
        direction = jr.normal(jr.PRNGKey(100 + seed), flat.shape)
        # (The loss from `_ode_value_and_grad`, to reuse its compilation.)
        plus, _ = _ode_value_and_grad(
            unravel(flat + h * direction), field, recursive, ode_solver
        )
        minus, _ = _ode_value_and_grad(
            unravel(flat - h * direction), field, recursive, ode_solver
        )
        fd = (plus - minus) / (2 * h)
        exact = jnp.dot(flat_grad, direction)
        assert abs(float(fd - exact)) < 1e-7 * max(1.0, abs(float(exact)))


# Each of these compiles a DEQ nested in a differentiated diffrax solve, twice:
# 10-20 s apiece.
@pytest.mark.slow
@pytest.mark.parametrize("adjoint", list(_DIFFRAX_ADJOINTS))
@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_deq_in_neural_ode(solver, adjoint):
    """The same gradients, by both diffrax adjoints, against the same model with
    the fixed point found by an unrolled iteration differentiated by
    backpropagation."""
    params, y0 = _ode_problem()
    field = _DEQField(_FIXED_POINT_SOLVERS[solver])
    reference = _DEQField(None)
    diffrax_adjoint = _DIFFRAX_ADJOINTS[adjoint]
    loss, grad = _ode_value_and_grad((params, y0), field, diffrax_adjoint)
    loss_ref, grad_ref = _ode_value_and_grad((params, y0), reference, diffrax_adjoint)
    assert abs(float(loss - loss_ref)) < 1e-12
    assert _rel_error(grad, grad_ref) < 1e-11
    if adjoint == "backsolve":
        # The continuous adjoint agrees with the discrete gradient to the accuracy
        # of the ODE discretisation.
        _, discrete = _ode_value_and_grad(
            (params, y0), reference, _DIFFRAX_ADJOINTS["recursive"]
        )
        assert _rel_error(grad, discrete) < 1e-6


def test_deq_in_neural_ode_jit_vmap():
    params, _ = _ode_problem()
    y0s = jr.normal(jr.PRNGKey(2), (3, STATE))
    field = _DEQField(_FIXED_POINT_SOLVERS["picard"])
    adjoint = _DIFFRAX_ADJOINTS["recursive"]

    @jax.jit
    def batched(params, y0s):
        return jax.vmap(lambda y0: _ode_loss(params, y0, field, adjoint))(y0s)

    losses = batched(params, y0s)
    for y0, loss in zip(y0s, losses):
        single, _ = _ode_value_and_grad((params, y0), field, adjoint)
        assert abs(float(loss - single)) < 1e-12


#
# 2. lineax solvers in the backward pass of `ImplicitAdjoint`
#


def _loss(y):
    return jnp.sum(jnp.sin(y))


def _dense_gradient(fn, y0, args):
    return dense_ift_gradient(fn, y0, args, _loss)


@eqx.filter_jit
@eqx.filter_grad
def _implicit_grad(args, fn, y0, adjoint):
    solver = eqxdeq.Anderson(1e-13, 1e-13)
    sol = optx.fixed_point(fn, solver, y0, args, adjoint=adjoint, max_steps=1000)
    return _loss(sol.value)


# The lineax solvers that tests/test_adjoint.py does not already use (it covers the
# default GMRES, `lx.GMRES`, `lx.LU` and `eqxdeq.Richardson`).
_LINEAR_SOLVERS = {
    "bicgstab": lx.BiCGStab(rtol=1e-13, atol=1e-13, max_steps=500),
    "normal_cg": lx.Normal(lx.CG(rtol=1e-13, atol=1e-13, max_steps=500)),
    "qr": lx.QR(),
    "svd": lx.SVD(),
    "neumann": eqxdeq.Neumann(steps=200),
}


@pytest.mark.parametrize("name", list(_LINEAR_SOLVERS))
def test_implicit_adjoint_linear_solvers(name):
    # ‖W‖ = 0.5: the Neumann series converges like 0.5^k.
    fn, y0, args = tanh_problem(jr.PRNGKey(3), n=16, batch=4, radius=0.5)
    ref = _dense_gradient(fn, y0, args)
    adjoint = eqxdeq.ImplicitAdjoint(_LINEAR_SOLVERS[name])
    grad = _implicit_grad(args, fn, y0, adjoint)
    assert _rel_error(grad, ref) < 1e-11


#
# 3. eqxdeq's lineax solvers in a plain `lx.linear_solve`
#

_EQXDEQ_LINEAR_SOLVERS = {
    "neumann": eqxdeq.Neumann(steps=100),
    "richardson": eqxdeq.Richardson(rtol=1e-13, atol=1e-13, max_steps=1000),
}


def _contractions(n=6, batch=3, norm=0.5):
    rng = np.random.default_rng(0)
    js = rng.standard_normal((batch, n, n))
    js = norm * js / np.linalg.norm(js, 2, axis=(1, 2), keepdims=True)
    bs = rng.standard_normal((batch, n))
    return js, bs


@pytest.mark.parametrize("name", list(_EQXDEQ_LINEAR_SOLVERS))
def test_linear_solve_jit_grad_vmap(name):
    """Reverse mode through a batch of solves `(I - J_i) x_i = b_i`."""
    solver = _EQXDEQ_LINEAR_SOLVERS[name]
    js, bs = _contractions()

    def loss(js, bs):
        def solve(j, b):
            operator = lx.MatrixLinearOperator(jnp.eye(j.shape[0]) - j)
            return lx.linear_solve(operator, b, solver).value

        return jnp.sum(jnp.sin(jax.vmap(solve)(js, bs)))

    grad_j, grad_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        jnp.asarray(js), jnp.asarray(bs)
    )
    for j, b, gj, gb in zip(js, bs, grad_j, grad_b):
        a = np.eye(j.shape[0]) - j
        x = np.linalg.solve(a, b)
        w = np.linalg.solve(a.T, np.cos(x))
        np.testing.assert_allclose(gb, w, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gj, np.outer(w, x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(_EQXDEQ_LINEAR_SOLVERS))
def test_linear_solve_matrix_free_pytree(name):
    """A `FunctionLinearOperator` on a dict: `x ↦ x - J(x)` with `J` acting on both
    leaves; reverse mode needs the transposed operator."""
    solver = _EQXDEQ_LINEAR_SOLVERS[name]
    rng = np.random.default_rng(1)
    j = rng.standard_normal((5, 5))
    j = jnp.asarray(0.5 * j / np.linalg.norm(j, 2))
    b = {
        "u": jnp.asarray(rng.standard_normal(3)),
        "v": jnp.asarray(rng.standard_normal(2)),
    }

    def loss(j, b):
        def matvec(x):
            flat = jnp.concatenate([x["u"], x["v"]])
            out = flat - j @ flat
            return {"u": out[:3], "v": out[3:]}

        struct = jax.eval_shape(lambda: b)
        operator = lx.FunctionLinearOperator(matvec, struct)
        x = lx.linear_solve(operator, b, solver).value
        return jnp.sum(jnp.sin(x["u"])) + jnp.sum(x["v"] ** 2), x

    (value, x), (grad_j, grad_b) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    )(j, b)
    a = np.eye(5) - np.asarray(j)
    flat_b = np.concatenate([b["u"], b["v"]])
    x_ref = np.linalg.solve(a, flat_b)
    np.testing.assert_allclose(np.concatenate([x["u"], x["v"]]), x_ref, rtol=1e-10)
    cotangent = np.concatenate([np.cos(x_ref[:3]), 2 * x_ref[3:]])
    w = np.linalg.solve(a.T, cotangent)
    np.testing.assert_allclose(np.concatenate([grad_b["u"], grad_b["v"]]), w, rtol=1e-9)
    np.testing.assert_allclose(grad_j, np.outer(w, x_ref), rtol=1e-9, atol=1e-12)


#
# 4. Forward mode through a continuous DEQ
#


def test_jvp_through_steady_state():
    fn, y0, (weight, bias) = tanh_problem(jr.PRNGKey(4), n=16, batch=4, radius=0.9)
    tangents = (
        jr.normal(jr.PRNGKey(5), weight.shape),
        jr.normal(jr.PRNGKey(6), bias.shape),
    )
    solver = eqxdeq.SteadyState(1e-12, 1e-12)

    @jax.jit
    def y_star(weight, bias):
        return optx.fixed_point(
            fn,
            solver,
            y0,
            (weight, bias),
            adjoint=eqxdeq.ImplicitAdjoint(),
            max_steps=2000,
        ).value

    primal, tangent = jax.jvp(y_star, (weight, bias), tangents)
    # Dense reference: y*' = (I - ∂f/∂y)⁻¹ (∂f/∂θ · θ').
    ref, _ = dense_newton(fn, y0, (weight, bias), steps=30)
    flat = ref.reshape(-1)
    jac = jax.jacfwd(lambda v: fn(v.reshape(ref.shape), (weight, bias)).reshape(-1))(
        flat
    )
    rhs = jax.jvp(lambda w, b: fn(ref, (w, b)), (weight, bias), tangents)[1]
    tangent_ref = jnp.linalg.solve(jnp.eye(flat.size) - jac, rhs.reshape(-1))
    assert _rel_error(primal, ref) < 1e-10
    assert _rel_error(tangent, tangent_ref.reshape(ref.shape)) < 1e-8
