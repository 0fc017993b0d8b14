"""eqxdeq's lineax solvers `Neumann`, `Richardson` and `GMRES`, mostly on `A = I - J`.

References are computed densely in NumPy float64. The solvers are shared between
tests, so that `lx.linear_solve` (which is `filter_jit`ted) compiles once per solver
and operator type rather than once per test.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse.linalg

import eqxdeq


N = 6
NEUMANN = eqxdeq.Neumann(steps=80)  # 0.5^81 ≈ 1e-24: exact in float64 for ‖J‖ = 0.5.
RICHARDSON = eqxdeq.Richardson(rtol=1e-13, atol=1e-13, max_steps=2000)
GMRES = eqxdeq.GMRES(rtol=1e-13, atol=0.0)
EXACT_SOLVERS = [NEUMANN, RICHARDSON, GMRES]


def _neumann(steps, damping=1.0):
    """Array-valued `steps` and `damping` are traced: one compilation for all."""
    return eqxdeq.Neumann(steps=jnp.array(steps), damping=jnp.array(damping))


def _contraction(seed, norm, n=N):
    """A random `J` rescaled so that `‖J‖₂ = norm`."""
    j = np.random.default_rng(seed).standard_normal((n, n))
    return norm * j / np.linalg.norm(j, 2)


def _symmetric(seed, eigenvalues):
    """`Q diag(eigenvalues) Qᵀ` for a random orthogonal `Q`."""
    eigenvalues = np.asarray(eigenvalues, np.float64)
    n = eigenvalues.shape[0]
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (q * eigenvalues[None, :]) @ q.T


def _vector(seed, n=N):
    return np.random.default_rng(seed + 1000).standard_normal(n)


def _system(seed, norm):
    """`(J, A = I - J, b)` as NumPy float64, with `‖J‖₂ = norm`."""
    j = _contraction(seed, norm)
    return j, np.eye(N) - j, _vector(seed)


def _op(a, dtype=jnp.float64):
    return lx.MatrixLinearOperator(jnp.asarray(a, dtype))


def _relerr(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return np.linalg.norm(x - y) / np.linalg.norm(y)


def _neumann_dense(j, b, steps, damping=1.0):
    """`τ Σ_{i=0}^{k} (I - τ(I - J))^i b` with explicit dense matrix powers."""
    m = np.eye(j.shape[0]) - damping * (np.eye(j.shape[0]) - j)
    return damping * sum(np.linalg.matrix_power(m, i) @ b for i in range(steps + 1))


#
# Richardson
#


@pytest.mark.parametrize("norm", [0.5, 0.9])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_richardson_dense(norm, dtype):
    _, a, b = _system(0, norm)
    if dtype == jnp.float64:
        solver, tol = RICHARDSON, 1e-8
    else:
        solver, tol = eqxdeq.Richardson(rtol=1e-6, atol=1e-6, max_steps=2000), 1e-4
    sol = lx.linear_solve(_op(a, dtype), jnp.asarray(b, dtype), solver)
    assert sol.value.dtype == dtype
    assert sol.result == lx.RESULTS.successful
    assert 0 < int(sol.stats["num_steps"]) < 2000
    assert _relerr(sol.value, np.linalg.solve(a, b)) < tol


def test_richardson_damping():
    # Eigenvalues of A in [0.5, 2.5]: with τ = 1, I - A has the eigenvalue -1.5 and
    # the iteration diverges; τ = 2 / (0.5 + 2.5) contracts at rate 2/3.
    a = _symmetric(1, np.linspace(0.5, 2.5, N))
    b = _vector(1)

    def solve(damping):
        # An array-valued damping is traced: one compilation for both.
        solver = eqxdeq.Richardson(1e-10, 1e-10, max_steps=200, damping=damping)
        return lx.linear_solve(_op(a), jnp.asarray(b), solver, throw=False)

    assert solve(jnp.array(1.0)).result == lx.RESULTS.max_steps_reached
    sol = solve(jnp.array(2 / 3))
    assert sol.result == lx.RESULTS.successful
    assert _relerr(sol.value, np.linalg.solve(a, b)) < 1e-8


def test_richardson_pytree():
    # A dict-valued operator with leaves of different shapes, applied matrix-free.
    j = _contraction(2, 0.8, n=7)
    b = _vector(2, n=7)
    struct = {
        "a": jax.ShapeDtypeStruct((3,), jnp.float64),
        "b": jax.ShapeDtypeStruct((2, 2), jnp.float64),
    }

    def flatten(x):
        return jnp.concatenate([x["a"], x["b"].reshape(-1)])

    def unflatten(v):
        return {"a": v[:3], "b": v[3:].reshape(2, 2)}

    def mv(x):
        v = flatten(x)
        return unflatten(v - jnp.asarray(j) @ v)

    op = lx.FunctionLinearOperator(mv, struct)
    sol = lx.linear_solve(op, unflatten(jnp.asarray(b)), RICHARDSON)
    assert sol.value["b"].shape == (2, 2)
    assert _relerr(flatten(sol.value), np.linalg.solve(np.eye(7) - j, b)) < 1e-9
    sol = lx.linear_solve(op.transpose(), unflatten(jnp.asarray(b)), RICHARDSON)
    assert _relerr(flatten(sol.value), np.linalg.solve(np.eye(7) - j.T, b)) < 1e-9


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
def test_mixed_dtype_pytree(solver):
    # Diagonal operator on {"x64": float64, "x32": float32}: no dtype promotion.
    d64 = np.array([0.3, -0.4])
    d32 = np.array([0.2, 0.1, -0.3])
    struct = {
        "x64": jax.ShapeDtypeStruct((2,), jnp.float64),
        "x32": jax.ShapeDtypeStruct((3,), jnp.float32),
    }

    def mv(x):
        return {
            "x64": x["x64"] - jnp.asarray(d64) * x["x64"],
            "x32": x["x32"] - jnp.asarray(d32, jnp.float32) * x["x32"],
        }

    b = {"x64": np.array([1.0, 2.0]), "x32": np.array([1.0, -1.0, 0.5])}
    vector = {"x64": jnp.asarray(b["x64"]), "x32": jnp.asarray(b["x32"], jnp.float32)}
    sol = lx.linear_solve(lx.FunctionLinearOperator(mv, struct), vector, solver)
    assert sol.value["x64"].dtype == jnp.float64
    assert sol.value["x32"].dtype == jnp.float32
    assert _relerr(sol.value["x64"], b["x64"] / (1 - d64)) < 1e-10
    assert _relerr(sol.value["x32"], b["x32"] / (1 - d32)) < 1e-5


def test_richardson_y0():
    _, a, b = _system(3, 0.5)
    exact = np.linalg.solve(a, b)
    solver = eqxdeq.Richardson(rtol=1e-10, atol=1e-10)

    def solve(y0):
        return lx.linear_solve(_op(a), jnp.asarray(b), solver, options={"y0": y0})

    cold = solve(jnp.zeros(N))
    warm = solve(jnp.asarray(exact + 1e-6))
    hot = solve(jnp.asarray(exact))
    assert int(hot.stats["num_steps"]) == 0
    assert 0 < int(warm.stats["num_steps"]) < int(cold.stats["num_steps"])
    assert _relerr(warm.value, exact) < 1e-9
    with pytest.raises(ValueError, match="y0"):
        solve(jnp.zeros(N + 1))
    with pytest.raises(ValueError, match="y0"):
        solve(jnp.zeros(N, jnp.float32))


def test_richardson_zero_tolerance_runs_max_steps():
    j, a, b = _system(4, 0.5)
    solver = eqxdeq.Richardson(rtol=0.0, atol=0.0, max_steps=4)
    sol = lx.linear_solve(_op(a), jnp.asarray(b), solver)
    assert sol.result == lx.RESULTS.successful
    assert int(sol.stats["num_steps"]) == 4
    # From x_0 = 0, k Richardson steps are k - 1 Neumann steps.
    assert _relerr(sol.value, _neumann_dense(j, b, 3)) < 1e-13


def test_richardson_failure():
    # ‖J‖₂ = ρ(J) = 1.5: the iteration diverges.
    j = _symmetric(5, [1.5, 0.5, 0.2, -0.1, -0.5, 0.0])
    op = _op(np.eye(N) - j)
    b = jnp.asarray(_vector(5))
    solver = eqxdeq.Richardson(rtol=1e-8, atol=1e-8)
    sol = lx.linear_solve(op, b, solver, throw=False)
    assert sol.result != lx.RESULTS.successful
    assert sol.result == lx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 10 * N  # the default `max_steps`
    with pytest.raises(Exception, match="maximum number of solver steps"):
        lx.linear_solve(op, b, solver, throw=True)
    # Overflow is a breakdown, and stops the loop.
    sol = lx.linear_solve(op, 1e300 * b, solver, throw=False)
    assert sol.result == lx.RESULTS.breakdown
    assert int(sol.stats["num_steps"]) < 10 * N
    # Non-finite input.
    sol = lx.linear_solve(op, b.at[0].set(jnp.nan), solver, throw=False)
    assert sol.result == lx.RESULTS.nonfinite_input
    assert int(sol.stats["num_steps"]) == 0


#
# Neumann
#


@pytest.mark.parametrize("damping", [1.0, 0.7, 1.3])
def test_neumann_series(damping):
    j, a, b = _system(6, 0.9)
    for steps in (0, 1, 2, 5):
        sol = lx.linear_solve(_op(a), jnp.asarray(b), _neumann(steps, damping))
        assert sol.result == lx.RESULTS.successful
        assert int(sol.stats["num_steps"]) == steps
        assert _relerr(sol.value, _neumann_dense(j, b, steps, damping)) < 1e-13
        if damping == 1.0:
            # Undamped: Σ_{i ≤ k} Jⁱ b.
            powers = sum(np.linalg.matrix_power(j, i) @ b for i in range(steps + 1))
            assert _relerr(sol.value, powers) < 1e-13
    if damping == 1.0:
        # A Python-integer number of steps is the same.
        sol = lx.linear_solve(_op(a), jnp.asarray(b), eqxdeq.Neumann(steps=2))
        assert _relerr(sol.value, _neumann_dense(j, b, 2)) < 1e-13


def test_neumann_zero_steps_is_identity():
    _, a, b = _system(7, 0.9)
    sol = lx.linear_solve(_op(a), jnp.asarray(b), eqxdeq.Neumann(0))
    assert np.array_equal(sol.value, b)
    sol = lx.linear_solve(_op(a), jnp.asarray(b), _neumann(0, damping=0.5))
    assert np.array_equal(sol.value, 0.5 * b)


def test_neumann_convergence_rate():
    # Symmetric J with spectral radius 0.5: the error after k steps is
    # ‖J^{k+1} A⁻¹ b‖, so consecutive errors have ratio → 0.5.
    j = _symmetric(8, [0.5, 0.2, 0.1, -0.1, -0.2, 0.05])
    a, b = np.eye(N) - j, _vector(8)
    exact = np.linalg.solve(a, b)

    def error(k):
        x = lx.linear_solve(_op(a), jnp.asarray(b), _neumann(k)).value
        return np.linalg.norm(np.asarray(x) - exact)

    errors = [error(k) for k in range(12)]
    for k in range(5, 12):
        assert 0.45 < errors[k] / errors[k - 1] < 0.55
    # For a non-symmetric J: ‖x_k - A⁻¹ b‖ ≤ ‖J‖^{k+1} ‖b‖ / (1 - ‖J‖).
    j, a, b = _system(9, 0.5)
    exact = np.linalg.solve(a, b)
    for k in range(8):
        bound = 0.5 ** (k + 1) * np.linalg.norm(b) / (1 - 0.5)
        assert error(k) <= bound * (1 + 1e-10)


def test_neumann_grad_is_transposed_series():
    # Reverse mode through a truncated solve is the same truncated series in Jᵀ:
    # the "phantom gradient".
    j, a, b = _system(10, 0.9)
    w = _vector(11)
    solver = _neumann(3, damping=0.8)
    grad = jax.grad(
        lambda b: jnp.dot(jnp.asarray(w), lx.linear_solve(_op(a), b, solver).value)
    )(jnp.asarray(b))
    assert _relerr(grad, _neumann_dense(j.T, w, 3, 0.8)) < 1e-13


def test_neumann_failure():
    j = _symmetric(12, [1e3, 0.5, 0.2, -0.1, -0.5, 0.0])
    op, b = _op(np.eye(N) - j), jnp.asarray(_vector(12))
    # Diverging but finite: an approximation by design, so "successful".
    sol = lx.linear_solve(op, b, _neumann(5), throw=False)
    assert sol.result == lx.RESULTS.successful
    # Overflow is never silent.
    sol = lx.linear_solve(op, b, _neumann(200), throw=False)
    assert sol.result == lx.RESULTS.breakdown
    with pytest.raises(Exception, match="breakdown"):
        lx.linear_solve(op, b, _neumann(200))
    sol = lx.linear_solve(op, b.at[1].set(jnp.inf), _neumann(2), throw=False)
    assert sol.result == lx.RESULTS.nonfinite_input


def test_neumann_traced_steps_do_not_recompile():
    j, a, b = _system(13, 0.5)
    traces = []

    @jax.jit
    def solve(steps):
        traces.append(None)
        return lx.linear_solve(_op(a), jnp.asarray(b), eqxdeq.Neumann(steps)).value

    for k in (0, 3, 4):
        assert _relerr(solve(jnp.array(k)), _neumann_dense(j, b, k)) < 1e-13
    assert len(traces) == 1


#
# Both: validation, transpose / conj, jit / grad / jvp / vmap.
#


def test_validation():
    for steps in (-1, 1.5, True, jnp.array(1.0)):
        with pytest.raises(ValueError, match="steps"):
            eqxdeq.Neumann(steps=steps)
    # (A TypeError from the type annotation under jaxtyping's import hook.)
    with pytest.raises((ValueError, TypeError), match="steps"):
        eqxdeq.Neumann(steps=jnp.array([1, 2]))
    for damping in (0.0, -0.5, 2.0, 3.0):
        with pytest.raises(ValueError, match="damping"):
            eqxdeq.Neumann(steps=1, damping=damping)
        with pytest.raises(ValueError, match="damping"):
            eqxdeq.Richardson(rtol=1e-3, atol=1e-3, damping=damping)
    with pytest.raises(ValueError, match="rtol"):
        eqxdeq.Richardson(rtol=-1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="atol"):
        eqxdeq.Richardson(rtol=1e-3, atol=-1e-3)
    for max_steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            eqxdeq.Richardson(rtol=1e-3, atol=1e-3, max_steps=max_steps)
    with pytest.raises(ValueError, match="max_steps"):
        eqxdeq.Richardson(rtol=0.0, atol=0.0)
    # Valid values, including NumPy/JAX scalars and traced values, pass.
    eqxdeq.Neumann(steps=np.int64(2), damping=np.float32(0.5))
    eqxdeq.Richardson(rtol=0, atol=1e-3, max_steps=jnp.array(5), damping=1)

    @jax.jit
    def make(x, k):
        neumann = eqxdeq.Neumann(steps=k, damping=x)
        richardson = eqxdeq.Richardson(rtol=x, atol=x, max_steps=k, damping=x)
        return neumann.damping + richardson.rtol

    make(jnp.array(-1.0), jnp.array(-1))


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
def test_non_square(solver):
    rectangular = lx.MatrixLinearOperator(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="square"):
        lx.linear_solve(rectangular, jnp.ones(3), solver)
    # Same size, different structure.
    reshaping = lx.FunctionLinearOperator(
        lambda x: x.reshape(2, 2), jax.ShapeDtypeStruct((4,), jnp.float64)
    )
    with pytest.raises(ValueError, match="square"):
        lx.linear_solve(reshaping, jnp.ones((2, 2)), solver)


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
def test_transpose_and_conj(solver):
    _, a, b = _system(14, 0.5)
    # Through the transposed operator.
    sol = lx.linear_solve(_op(a).transpose(), jnp.asarray(b), solver)
    assert _relerr(sol.value, np.linalg.solve(a.T, b)) < 1e-9

    # Through the solver's own `transpose` and `conj` of its state.
    a = a + 0.1j * _contraction(15, 0.3)
    b = b + 1j * _vector(15)
    op, vector = _op(a, jnp.complex128), jnp.asarray(b)

    def compute(state_options, vector):
        state, options = state_options
        value, result, _ = solver.compute(state, vector, options)
        return value, result

    @eqx.filter_jit
    def solve(op, vector):
        state = solver.init(op, {})
        transposed = compute(solver.transpose(state, {}), vector)
        conjugated = compute(solver.conj(state, {}), vector)
        return transposed, conjugated

    (transposed, result_t), (conjugated, result_c) = solve(op, vector)
    assert result_t == lx.RESULTS.successful
    assert result_c == lx.RESULTS.successful
    assert _relerr(transposed, np.linalg.solve(a.T, b)) < 1e-9
    assert _relerr(conjugated, np.linalg.solve(np.conj(a), b)) < 1e-9


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
def test_grad_and_jvp(solver):
    # L(J, b) = Σ sin(x) for x = (I - J)⁻¹ b: ∂L/∂b = A⁻ᵀ c, ∂L/∂J = A⁻ᵀ c xᵀ with
    # c = cos(x); and the tangent is x' = A⁻¹ (J' x + b').
    j, a, b = _system(16, 0.5)
    tj, tb = _contraction(17, 1.0), _vector(17)

    def solve(j, b):
        return lx.linear_solve(_op(jnp.eye(N) - j), b, solver).value

    @jax.jit
    def derivatives(j, b, tj, tb):
        grads = jax.grad(lambda j, b: jnp.sum(jnp.sin(solve(j, b))), (0, 1))(j, b)
        return grads, jax.jvp(solve, (j, b), (tj, tb))

    (grad_j, grad_b), (x, tx) = derivatives(*map(jnp.asarray, (j, b, tj, tb)))
    x_ref = np.linalg.solve(a, b)
    adjoint = np.linalg.solve(a.T, np.cos(x_ref))
    assert _relerr(x, x_ref) < 1e-9
    assert _relerr(grad_b, adjoint) < 1e-9
    assert _relerr(grad_j, np.outer(adjoint, x_ref)) < 1e-9
    assert _relerr(tx, np.linalg.solve(a, tj @ x_ref + tb)) < 1e-9


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
def test_vmap(solver):
    # Batched operators of different spectral radii, and batched right-hand sides.
    eigenvalues = np.array([1.0, 0.6, 0.3, -0.2, -0.8, 0.1])
    js = np.stack([_symmetric(18, r * eigenvalues) for r in (0.1, 0.3, 0.5)])
    bs = np.stack([_vector(18 + i) for i in range(3)])

    @jax.jit
    @jax.vmap
    def solve(j, b):
        sol = lx.linear_solve(_op(jnp.eye(N) - j), b, solver)
        return sol.value, sol.stats["num_steps"]

    values, num_steps = solve(jnp.asarray(js), jnp.asarray(bs))
    for j, b, value in zip(js, bs, values):
        assert _relerr(value, np.linalg.solve(np.eye(N) - j, b)) < 1e-9
    if isinstance(solver, eqxdeq.Richardson):
        # Each batch element stops when it has converged.
        assert num_steps[0] < num_steps[1] < num_steps[2]


#
# GMRES
#


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("restart", [4, 20])
def test_gmres_dense_non_contractive(dtype, restart):
    # ‖J‖ = 1.5: Neumann and Richardson diverge, GMRES does not need a contraction;
    # restart=4 < N restarts the Krylov subspace.
    _, a, b = _system(20, 1.5)
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    sol = lx.linear_solve(
        _op(a, dtype), jnp.asarray(b, dtype), eqxdeq.GMRES(tol, 0.0, restart=restart)
    )
    assert sol.value.dtype == dtype
    assert _relerr(sol.value, np.linalg.solve(a, b)) < 100 * tol
    residual = np.linalg.norm(a @ np.asarray(sol.value, np.float64) - b)
    assert residual <= 2 * tol * np.linalg.norm(b)
    if dtype == jnp.float64:
        # The same iterates as SciPy's restarted GMRES: the same number of steps.
        count = [0]

        def callback(_):
            count[0] += 1

        scipy.sparse.linalg.gmres(
            a,
            b,
            rtol=tol,
            atol=0.0,
            restart=restart,
            maxiter=100,
            callback=callback,
            callback_type="pr_norm",
        )
        assert int(sol.stats["num_steps"]) == count[0]


def test_gmres_stops_at_the_first_step_within_tolerance():
    # A with 3 distinct eigenvalues: GMRES is exact after 3 steps (the minimal
    # polynomial has degree 3), and stops there rather than at the end of a cycle.
    a = _symmetric(21, [2.0, 2.0, 0.5, 0.5, 1.3, 1.3])
    sol = lx.linear_solve(_op(a), jnp.asarray(_vector(21)), GMRES)
    assert int(sol.stats["num_steps"]) == 3
    assert _relerr(sol.value, np.linalg.solve(a, _vector(21))) < 1e-12
    # With a loose tolerance it stops earlier still, at the first step within it.
    loose = eqxdeq.GMRES(rtol=0.3, atol=0.0)
    out = lx.linear_solve(_op(a), jnp.asarray(_vector(21)), loose)
    steps = int(out.stats["num_steps"])
    assert 1 <= steps < 3
    residual = np.linalg.norm(a @ np.asarray(out.value) - _vector(21))
    assert residual <= 0.3 * np.linalg.norm(_vector(21))


def test_gmres_complex():
    _, a, b = _system(22, 1.2)
    a = a + 0.5j * _contraction(23, 1.0)
    b = b + 1j * _vector(23)
    sol = lx.linear_solve(
        _op(a, jnp.complex128), jnp.asarray(b), eqxdeq.GMRES(1e-12, 0.0, restart=4)
    )
    assert sol.value.dtype == jnp.complex128
    assert _relerr(sol.value, np.linalg.solve(a, b)) < 1e-10


def test_gmres_bfloat16_is_solved_in_float32():
    _, a, b = _system(24, 0.5)
    op = lx.FunctionLinearOperator(
        lambda x: (jnp.asarray(a, jnp.float32) @ x.astype(jnp.float32)).astype(
            jnp.bfloat16
        ),
        jax.ShapeDtypeStruct((N,), jnp.bfloat16),
    )
    sol = lx.linear_solve(op, jnp.asarray(b, jnp.bfloat16), eqxdeq.GMRES(0.02, 0.0))
    assert sol.value.dtype == jnp.bfloat16
    assert _relerr(sol.value.astype(jnp.float32), np.linalg.solve(a, b)) < 0.05


def test_gmres_y0():
    _, a, b = _system(25, 0.9)
    exact = np.linalg.solve(a, b)
    solver = eqxdeq.GMRES(rtol=1e-10, atol=0.0)
    cold = lx.linear_solve(_op(a), jnp.asarray(b), solver)
    warm = lx.linear_solve(
        _op(a), jnp.asarray(b), solver, options={"y0": jnp.asarray(exact)}
    )
    assert int(warm.stats["num_steps"]) == 0 < int(cold.stats["num_steps"])
    assert _relerr(warm.value, exact) < 1e-10
    with pytest.raises(ValueError, match="y0"):
        lx.linear_solve(
            _op(a), jnp.asarray(b), solver, options={"y0": jnp.zeros(N + 1)}
        )


def test_gmres_failures():
    # Singular, with b outside the range: the residual cannot decrease below the
    # component of b in the null space, so the solve stagnates.
    a = np.diag([1.0, 0.0, 2.0, 1.0, 3.0, 0.5])
    b = np.ones(N)
    sol = lx.linear_solve(_op(a), jnp.asarray(b), GMRES, throw=False)
    assert sol.result == lx.RESULTS.stagnation
    assert sol.stats["result"] == eqxdeq.RESULTS.stagnation
    # Too few steps.
    _, a, b = _system(26, 0.9)
    few = eqxdeq.GMRES(rtol=1e-13, atol=0.0, max_steps=2)
    sol = lx.linear_solve(_op(a), jnp.asarray(b), few, throw=False)
    assert sol.result == lx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 2
    with pytest.raises(Exception, match="maximum number of solver steps"):
        lx.linear_solve(_op(a), jnp.asarray(b), few)
    # A non-finite right-hand side.
    sol = lx.linear_solve(_op(a), jnp.full(N, jnp.nan), GMRES, throw=False)
    assert sol.result == lx.RESULTS.nonfinite_input
    # A zero right-hand side is solved by zero, in no steps.
    sol = lx.linear_solve(_op(a), jnp.zeros(N), GMRES)
    assert int(sol.stats["num_steps"]) == 0
    assert np.all(np.asarray(sol.value) == 0)


def test_gmres_validation():
    cases: tuple[tuple[str, dict[str, Any]], ...] = (
        ("rtol", dict(rtol=-1.0, atol=0.0)),
        ("atol", dict(rtol=1e-3, atol=float("nan"))),
        ("restart", dict(rtol=1e-3, atol=0.0, restart=0)),
        ("stagnation_iters", dict(rtol=1e-3, atol=0.0, stagnation_iters=0)),
        ("max_steps", dict(rtol=1e-3, atol=0.0, max_steps=0)),
        ("max_steps", dict(rtol=1e-3, atol=0.0, max_steps=2.5)),
    )
    for name, kwargs in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            eqxdeq.GMRES(**kwargs)
