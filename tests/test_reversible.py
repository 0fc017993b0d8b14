"""`eqxdeq.Reversible` (the reversible fixed-point iteration) and
`eqxdeq.ReversibleAdjoint` (its exact gradient, computed backwards in O(1) memory)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest

import eqxdeq
from eqxdeq._solver.reversible import Checkpoints

from .helpers import (
    dense_fixed_point,
    dense_ift_gradient,
    linear_problem,
    tanh_problem,
)


def _to64(tree):
    return jtu.tree_map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree
    )


def rel_error(x, ref):
    """Relative 2-norm error over all leaves, in float64."""
    x, ref = _to64(x), _to64(ref)
    leaves = list(zip(jtu.tree_leaves(x), jtu.tree_leaves(ref), strict=True))
    num = sum(jnp.sum((a - b) ** 2) for a, b in leaves)
    den = sum(jnp.sum(b**2) for _, b in leaves)
    return float(jnp.sqrt(num / den))


def _loss(y):
    return jnp.sum(jnp.sin(y))


@eqx.filter_jit
def grad_args_y0(args, y0, fn, solver, adjoint, max_steps):
    """Gradients of `loss(y_N)` with respect to `args` and `y0`."""

    def loss(args_y0):
        args, y0 = args_y0
        sol = optx.fixed_point(
            fn, solver, y0, args, adjoint=adjoint, max_steps=max_steps, throw=False
        )
        return _loss(sol.value)

    return jax.grad(loss)((args, y0))


def _tol(dtype):
    return 1e-10 if dtype == jnp.float64 else 1e-5


# ---------------------------------------------------------------------------
# The solver.


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("radius", [0.5, 0.9])
def test_converges_to_dense_reference(radius, dtype):
    fn, y0, args = tanh_problem(jr.PRNGKey(0), radius=radius, dtype=dtype)
    tol = _tol(dtype)
    sol = optx.fixed_point(fn, eqxdeq.Reversible(tol, tol), y0, args, max_steps=1000)
    assert sol.value.dtype == dtype
    ref = dense_fixed_point(fn, y0, args, steps=10)
    # The error is about the residual divided by 1 - (Lipschitz constant).
    assert float(jnp.max(jnp.abs(_to64(sol.value) - ref))) < 20 * tol
    # The second sequence converges too.
    assert float(jnp.max(jnp.abs(_to64(sol.state.z) - ref))) < 20 * tol
    stats = sol.stats
    assert int(stats["num_fn_evals"]) == 2 * int(stats["num_steps"])
    assert int(stats["num_accepted_steps"]) == int(stats["num_steps"])
    assert stats["result"] == eqxdeq.RESULTS.successful
    # `abs_residual` is |f(y) - y|_2 at the returned y.
    residual = fn(sol.value, args) - sol.value
    np.testing.assert_allclose(
        stats["abs_residual"], jnp.linalg.norm(residual), rtol=1e-3
    )
    assert float(stats["best_abs_residual"]) <= float(stats["abs_residual"])
    np.testing.assert_allclose(
        stats["rel_residual"],
        stats["abs_residual"] / jnp.linalg.norm(fn(sol.value, args)),
        rtol=1e-3,
    )


def test_linear_closed_form():
    fn, y0, args, y_star = linear_problem(jr.PRNGKey(1), n=16, radius=0.7)
    sol = optx.fixed_point(fn, eqxdeq.Reversible(1e-12, 1e-12), y0, args)
    assert float(jnp.max(jnp.abs(sol.value - y_star))) < 1e-10


def test_dict_pytree():
    fn, _, (weight, bias) = tanh_problem(jr.PRNGKey(2), radius=0.8)

    def cell(z, args):
        weight, bias = args
        h = jnp.tanh(z["h"] @ weight + bias + 0.1 * z["s"])
        s = 0.5 * z["s"] + jnp.mean(h)
        return {"h": h, "s": s.astype(z["s"].dtype)}

    y0 = {"h": jnp.zeros(bias.shape), "s": jnp.zeros((), jnp.float32)}
    with jax.numpy_dtype_promotion("standard"):
        sol = optx.fixed_point(
            cell, eqxdeq.Reversible(1e-6, 1e-6), y0, (weight, bias), max_steps=500
        )
        ref = dense_fixed_point(cell, y0, (weight, bias), steps=10)
    assert sol.value["s"].dtype == jnp.float32
    assert sol.value["h"].dtype == jnp.float64
    assert rel_error(sol.value, ref) < 1e-5


def test_jit_and_vmap():
    fn, y0, (weight, bias) = tanh_problem(jr.PRNGKey(3), radius=0.9)
    biases = jnp.stack([0.1 * bias, bias, 5 * bias])
    solver = eqxdeq.Reversible(1e-10, 1e-10)

    @jax.jit
    @jax.vmap
    def solve(b):
        sol = optx.fixed_point(fn, solver, y0, (weight, b), max_steps=1000)
        return sol.value, sol.stats["num_steps"]

    values, steps = solve(biases)
    for i, b in enumerate(biases):
        single = optx.fixed_point(fn, solver, y0, (weight, b), max_steps=1000)
        # Each sample stops when it converges, as in an unbatched solve.
        assert int(steps[i]) == int(single.stats["num_steps"])
        np.testing.assert_allclose(values[i], single.value, rtol=0, atol=1e-14)
    assert len(set(np.asarray(steps).tolist())) > 1


def test_two_evaluations_per_step():
    fn, y0, args = tanh_problem(jr.PRNGKey(4), radius=0.5)
    calls = []

    def counted(y, args):
        jax.debug.callback(lambda: calls.append(1))
        return fn(y, args)

    sol = optx.fixed_point(counted, eqxdeq.Reversible(1e-10, 1e-10), y0, args)
    jax.effects_barrier()
    # Measured here: 26 steps, 52 evaluations (Picard with the same relaxation: 30
    # evaluations, undamped Picard 29, Anderson 16).
    assert (
        len(calls) == int(sol.stats["num_fn_evals"]) == 2 * int(sol.stats["num_steps"])
    )
    assert int(sol.stats["num_steps"]) < 40


def test_divergence():
    fn = lambda y, args: 2.0 * y + 1.0
    sol = optx.fixed_point(
        fn, eqxdeq.Reversible(1e-8, 1e-8), jnp.zeros(4), max_steps=1000, throw=False
    )
    assert sol.result == optx.RESULTS.nonlinear_divergence
    assert sol.stats["result"] == eqxdeq.RESULTS.diverged
    assert int(sol.stats["num_steps"]) < 100
    with pytest.raises(Exception, match="diverge"):
        optx.fixed_point(fn, eqxdeq.Reversible(1e-8, 1e-8), jnp.zeros(4))


def test_stall():
    fn = lambda y, args: y + 1.0  # no fixed point; the residual stays at 1
    termination = eqxdeq.Termination(stall_patience=5)
    solver = eqxdeq.Reversible(1e-8, 1e-8, termination=termination)
    sol = optx.fixed_point(fn, solver, jnp.zeros(4), max_steps=1000, throw=False)
    assert sol.stats["result"] == eqxdeq.RESULTS.stalled
    assert int(sol.stats["num_steps"]) < 20


def test_step_budget_and_history():
    fn, y0, args = tanh_problem(jr.PRNGKey(5), radius=0.9)
    solver = eqxdeq.Reversible(1e-10, 1e-10, history_length=8)

    @jax.jit
    def solve(budget):
        return optx.fixed_point(
            fn, solver, y0, args, options={"step_budget": budget}, throw=False
        )

    for budget in (2, 3):  # one compilation, two budgets
        sol = solve(jnp.array(budget))
        assert int(sol.stats["num_steps"]) == budget
        assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
        history = np.asarray(sol.stats["residual_history"])
        # Two entries per step: the residual at z_n, then at y_{n+1}.
        assert np.all(np.isfinite(history[: 2 * budget]))
        assert np.all(np.isnan(history[2 * budget :]))
        assert history[2 * budget - 1] == float(sol.stats["abs_residual"])
        assert np.isclose(history[0], np.linalg.norm(fn(y0, args) - y0))
    assert solve._cache_size() == 1  # pyright: ignore[reportAttributeAccessIssue]


def test_aux():
    fn, y0, args = tanh_problem(jr.PRNGKey(6), radius=0.5)
    fn_aux = lambda y, args: (fn(y, args), jnp.sum(y))
    sol = optx.fixed_point(
        fn_aux, eqxdeq.Reversible(1e-10, 1e-10), y0, args, has_aux=True
    )
    assert sol.aux == jnp.sum(sol.value)  # the aux of the returned iterate

    # The aux carries no gradient through ReversibleAdjoint (as through
    # ImplicitAdjoint): a loss of the aux alone has zero gradient.
    def aux_loss(args):
        sol = optx.fixed_point(
            fn_aux,
            eqxdeq.Reversible(1e-10, 1e-10),
            y0,
            args,
            has_aux=True,
            adjoint=eqxdeq.ReversibleAdjoint(),
        )
        return sol.aux

    grad = jax.grad(aux_loss)(args)
    assert all(not bool(jnp.any(g)) for g in jtu.tree_leaves(grad))


# ---------------------------------------------------------------------------
# Every adjoint works with the solver.


@pytest.mark.parametrize(
    "adjoint",
    [
        eqxdeq.ImplicitAdjoint(),
        eqxdeq.JFB(),
        eqxdeq.PhantomAdjoint(3),
        eqxdeq.PhantomAdjoint(3, mode="unroll"),
        eqxdeq.ShineAdjoint(),
        optx.RecursiveCheckpointAdjoint(),
        eqxdeq.ReversibleAdjoint(),
    ],
    ids=lambda a: type(a).__name__,
)
def test_every_adjoint(adjoint):
    fn, y0, args = tanh_problem(jr.PRNGKey(7), radius=0.2)
    solver = eqxdeq.Reversible(1e-12, 1e-12)
    grad, _ = grad_args_y0(args, y0, fn, solver, adjoint, 256)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jtu.tree_leaves(grad))
    # The exact ones, ReversibleAdjoint included, agree with the dense implicit
    # gradient once the solve has converged tightly (here in 21 steps). Measured:
    # 4e-12 (ReversibleAdjoint), 4e-12 (BPTT), 5e-13 (ImplicitAdjoint).
    exact = (
        eqxdeq.ImplicitAdjoint,
        optx.RecursiveCheckpointAdjoint,
        eqxdeq.ReversibleAdjoint,
    )
    if isinstance(adjoint, exact):
        assert rel_error(grad, dense_ift_gradient(fn, y0, args, _loss)) < 1e-9


# ---------------------------------------------------------------------------
# ReversibleAdjoint: the gradient of the iterations, as backpropagation gives it.


@pytest.mark.parametrize(
    "radius, tol, max_steps",
    [
        (0.2, 1e-12, 256),  # converged tightly: 19 steps
        (0.5, 0.0, 6),  # 6 steps
        (0.9, 0.0, 6),
    ],
)
def test_matches_bptt_float64(radius, tol, max_steps):
    fn, _, args = tanh_problem(jr.PRNGKey(8), radius=radius)
    y0 = 0.3 * jr.normal(jr.PRNGKey(9), args[1].shape)
    solver = eqxdeq.Reversible(tol, tol)
    rev = grad_args_y0(args, y0, fn, solver, eqxdeq.ReversibleAdjoint(), max_steps)
    bptt = grad_args_y0(
        args, y0, fn, solver, optx.RecursiveCheckpointAdjoint(), max_steps
    )
    assert jtu.tree_structure(rev) == jtu.tree_structure(bptt)
    # Measured: 4e-12 (radius 0.2, 21 steps), 4e-14 (0.5), 1e-11 (0.9).
    assert rel_error(rev, bptt) < 1e-10
    if tol == 0:
        # y0 alone (after a converged solve its gradient is ~1e-13: rounding noise).
        assert rel_error(rev[1], bptt[1]) < 1e-10


def test_matches_bptt_module_parameters():
    """Parameters of an `eqx.nn.Linear` closed over by `fn`, the input and `y0`."""
    model = eqx.nn.Linear(16, 16, key=jr.PRNGKey(10))
    model = eqx.tree_at(lambda m: m.weight, model, 0.6 * model.weight)
    x = 0.5 * jr.normal(jr.PRNGKey(11), (16,))
    y0 = 0.1 * jr.normal(jr.PRNGKey(12), (16,))

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(inputs, adjoint):
        model, x, y0 = inputs
        fn = lambda y, x: jnp.tanh(model(y) + x)
        solver = eqxdeq.Reversible(1e-6, 1e-6)
        sol = optx.fixed_point(fn, solver, y0, x, adjoint=adjoint, max_steps=64)
        return _loss(sol.value)

    rev = grad((model, x, y0), eqxdeq.ReversibleAdjoint())
    bptt = grad((model, x, y0), optx.RecursiveCheckpointAdjoint())
    # Measured: 3e-13 (11 steps).
    assert rel_error(rev, bptt) < 1e-10
    assert rel_error(rev[0].weight, bptt[0].weight) < 1e-10
    assert float(jnp.linalg.norm(rev[0].weight)) > 0


def test_float32_reconstruction():
    """Inverting a contraction amplifies rounding errors, so the reconstructed
    iterates drift from the forward ones geometrically in the number of steps.

    Measured relative gradient errors of ReversibleAdjoint(checkpoints=0) (the
    pure reconstruction) against BPTT on this tanh problem (n = 16, batch 4),
    relaxation 0.8, after N steps:

    | radius | N  | float32 | float64 |
    | ------ | -- | ------- | ------- |
    | 0.2    | 5  | 4e-7    | 5e-16   |
    | 0.2    | 20 | 8e-6    | 2e-12   |
    | 0.5    | 5  | 4e-6    | 8e-15   |
    | 0.5    | 10 | 8e-4    | 1e-11   |
    | 0.5    | 20 | 1e-3    | 1e-6    |
    | 0.9    | 5  | 3e-4    | 1e-12   |
    | 0.9    | 10 | 1e-1    | 4e-7    |
    | 0.9    | 20 | 2e-1    | 4e-2    |

    (with relaxation 0.5 at radius 0.9: float32 3e-7 / 4e-5 / 5e-2 and float64
    6e-16 / 3e-14 / 4e-9 at N = 5 / 10 / 20). The float32 BPTT gradient itself is
    within 3e-7 of the float64 one.
    """
    fn, y0, args = tanh_problem(jr.PRNGKey(0), radius=0.5, dtype=jnp.float32)
    solver = eqxdeq.Reversible(0.0, 0.0, checkpoints=0)
    adjoint = eqxdeq.ReversibleAdjoint(checkpoints=0)
    rev, _ = grad_args_y0(args, y0, fn, solver, adjoint, 5)
    bptt, _ = grad_args_y0(args, y0, fn, solver, optx.RecursiveCheckpointAdjoint(), 5)
    assert all(g.dtype == jnp.float32 for g in jtu.tree_leaves(rev))
    assert rel_error(rev, bptt) < 1e-4


def test_checkpoints_bound_the_reconstruction_error():
    """20 steps at radius 0.9 in float32: the pure reconstruction's gradient is
    off by 2e-1 (its iterates drifted from the forward ones by 1e10 times their
    size: a failure, raised by default), with 8 checkpoints (every 4th step kept)
    by 1e-5."""
    fn, y0, args = tanh_problem(jr.PRNGKey(0), radius=0.9, dtype=jnp.float32)
    solver = eqxdeq.Reversible(0.0, 0.0, checkpoints=0)
    bptt = grad_args_y0(args, y0, fn, solver, optx.RecursiveCheckpointAdjoint(), 20)
    pure = eqxdeq.ReversibleAdjoint(checkpoints=0)
    with pytest.raises(eqx.EquinoxRuntimeError, match="reconstruction drifted"):
        grad_args_y0(args, y0, fn, solver, pure, 20)
    pure = eqxdeq.ReversibleAdjoint(checkpoints=0, on_failure="nan")
    assert all(
        bool(jnp.all(jnp.isnan(g)))
        for g in jtu.tree_leaves(grad_args_y0(args, y0, fn, solver, pure, 20))
    )
    # The checkpoints are set on the solver; the adjoint reads them.
    solver = eqxdeq.Reversible(0.0, 0.0, checkpoints=8)
    default = eqxdeq.ReversibleAdjoint()
    assert rel_error(grad_args_y0(args, y0, fn, solver, default, 20), bptt) < 1e-4


def test_reconstruction_overflow_raises():
    """100 steps without checkpoints in float32: the reconstruction overflows. The
    backward pass raises instead of returning a NaN gradient; checkpoints fix it."""
    fn, y0, args = tanh_problem(jr.PRNGKey(0), radius=0.5, dtype=jnp.float32)
    solver = eqxdeq.Reversible(0.0, 0.0, checkpoints=0)
    pure = eqxdeq.ReversibleAdjoint(checkpoints=0)
    with pytest.raises(eqx.EquinoxRuntimeError, match="overflowed"):
        grad_args_y0(args, y0, fn, solver, pure, 100)
    solver = eqxdeq.Reversible(0.0, 0.0, checkpoints=32)
    grads = grad_args_y0(args, y0, fn, solver, eqxdeq.ReversibleAdjoint(), 100)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jtu.tree_leaves(grads))


@pytest.mark.parametrize("num_steps", [0, 1, 7, 8, 9, 16, 23, 64])
def test_checkpoint_thinning(num_steps):
    """Slot i holds step i * stride, the stride doubling whenever the slots fill, so
    the copies always span the whole solve."""
    slots = 4
    y0 = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    checkpoints = Checkpoints.start(y0, slots)
    record = jax.jit(Checkpoints.record)
    for step in range(1, num_steps + 1):
        y = jtu.tree_map(lambda x: x + step, y0)
        z = jtu.tree_map(lambda x: x - step, y0)
        checkpoints = record(checkpoints, jnp.array(step), y, z)
    stride = int(checkpoints.stride)
    assert num_steps // stride < slots
    assert stride == 1 or num_steps // (stride // 2) >= slots
    for i in range(num_steps // stride + 1):
        np.testing.assert_array_equal(checkpoints.y["a"][i], i * stride)
        np.testing.assert_array_equal(checkpoints.z["b"][i], -i * stride)
    # `restore` picks the copy exactly at multiples of the stride.
    dummy = jtu.tree_map(lambda x: x + 0.5, y0)
    for step in range(num_steps + 1):
        y, z = checkpoints.restore(jnp.array(step), dummy, dummy)
        expected = step if step % stride == 0 else 0.5
        np.testing.assert_array_equal(y["b"], expected)


def test_float32_close_to_ift_when_converged():
    """Converged to float32's resolution on a weakly contractive layer, the
    reversible gradient is close to the implicit one (measured: 1.4e-5 after 10
    steps; BPTT 1.3e-5; ReversibleAdjoint against BPTT 8e-6)."""
    fn, y0, args = tanh_problem(jr.PRNGKey(13), radius=0.2, dtype=jnp.float32)
    solver = eqxdeq.Reversible(1e-6, 1e-6)
    rev, _ = grad_args_y0(args, y0, fn, solver, eqxdeq.ReversibleAdjoint(), 256)
    assert rel_error(rev, dense_ift_gradient(fn, y0, args, _loss)) < 1e-4


def test_vmap_of_grad():
    fn, y0, (weight, bias) = tanh_problem(jr.PRNGKey(14), radius=0.2)
    biases = jnp.stack([0.1 * bias, bias, 10 * bias])
    solver = eqxdeq.Reversible(1e-12, 1e-12)

    def grad(b):
        return grad_args_y0(
            (weight, b), y0, fn, solver, eqxdeq.ReversibleAdjoint(), 256
        )

    batched = jax.vmap(grad)(biases)
    for i, b in enumerate(biases):
        single = grad(b)
        # Batched products round differently, and the backward reconstruction
        # amplifies that (measured: 7e-12).
        assert rel_error(jtu.tree_map(lambda g: g[i], batched), single) < 1e-9


def _grad_temp_bytes(adjoint, max_steps, checkpoints=8):
    """Scratch memory of the compiled gradient of a Reversible solve."""
    fn, y0, (weight, bias) = tanh_problem(jr.PRNGKey(15), radius=0.9)

    def loss(b):
        solver = eqxdeq.Reversible(1e-10, 1e-10, checkpoints=checkpoints)
        sol = optx.fixed_point(
            fn, solver, y0, (weight, b), adjoint=adjoint, max_steps=max_steps
        )
        return jnp.sum(sol.value)

    compiled = jax.jit(jax.grad(loss)).lower(bias).compile()
    return compiled.memory_analysis().temp_size_in_bytes  # pyright: ignore


@pytest.mark.parametrize("checkpoints", [0, 8])
def test_memory_flat_in_max_steps(checkpoints):
    # Measured: 7104 bytes at max_steps 16, 64 and 4096 without checkpoints, 20656
    # with 8 (16 copies of the 512-byte state, and one more buffer while thinning).
    # (No checkpoints: 0 on the solver and the adjoint, see `ReversibleAdjoint`.)
    reversible = eqxdeq.ReversibleAdjoint(checkpoints=checkpoints)
    assert _grad_temp_bytes(reversible, 64, checkpoints) == _grad_temp_bytes(
        reversible, 4096, checkpoints
    )


@pytest.mark.slow
def test_bptt_memory_grows_in_max_steps():
    """...whereas backpropagating through the same iterations does (so the test
    above can fail). Measured: 21520 bytes at max_steps 64, 151376 at 4096. Slow
    only for its compile time; `test_adjoint.py` checks the same growth for
    Anderson in the fast suite."""
    bptt = optx.RecursiveCheckpointAdjoint()
    assert _grad_temp_bytes(bptt, 4096) > 2 * _grad_temp_bytes(bptt, 64)
    assert _grad_temp_bytes(bptt, 64) > _grad_temp_bytes(
        eqxdeq.ReversibleAdjoint(checkpoints=0), 64, checkpoints=0
    )
    assert _grad_temp_bytes(bptt, 4096) > _grad_temp_bytes(
        eqxdeq.ReversibleAdjoint(), 4096
    )


# ---------------------------------------------------------------------------
# Errors.


def test_adjoint_requires_reversible_solver():
    fn, y0, args = tanh_problem(jr.PRNGKey(16), radius=0.5)
    with pytest.raises(ValueError, match=r"Reversible\(\.\.\.\)`, but got `Picard`"):
        optx.fixed_point(
            fn,
            eqxdeq.Picard(1e-6, 1e-6),
            y0,
            args,
            adjoint=eqxdeq.ReversibleAdjoint(),
        )


@pytest.mark.parametrize("relaxation", [0.0, 1.0, 1.5, -0.2])
def test_bad_relaxation(relaxation):
    with pytest.raises(ValueError, match=r"Reversible\(relaxation=\.\.\.\)"):
        eqxdeq.Reversible(1e-6, 1e-6, relaxation=relaxation)


def test_bad_fields():
    with pytest.raises(ValueError, match=r"Reversible\(rtol=\.\.\.\)"):
        eqxdeq.Reversible(-1.0, 1e-6)
    with pytest.raises(ValueError, match=r"Reversible\(history_length=\.\.\.\)"):
        eqxdeq.Reversible(1e-6, 1e-6, history_length=-1)
    for bad in (3, -2):
        with pytest.raises(ValueError, match=r"Reversible\(checkpoints=\.\.\.\)"):
            eqxdeq.Reversible(1e-6, 1e-6, checkpoints=bad)  # pyright: ignore
        with pytest.raises(ValueError, match=r"ReversibleAdjoint\(checkpoints="):
            eqxdeq.ReversibleAdjoint(checkpoints=bad)  # pyright: ignore


def test_adjoint_validates_the_solver_checkpoints():
    """The checkpoints are set on the solver: the adjoint reads them, and an
    explicit `ReversibleAdjoint(checkpoints=...)` must agree (it used to overwrite
    the solver's setting)."""
    fn, y0, args = tanh_problem(jr.PRNGKey(16), radius=0.5)

    def slots(solver, adjoint):
        sol = optx.fixed_point(
            fn, solver, y0, args, adjoint=adjoint, max_steps=4, throw=False
        )
        return jtu.tree_leaves(sol.state.checkpoints.y)[0].shape[0]

    solver = eqxdeq.Reversible(1e-8, 1e-8, checkpoints=16)
    assert slots(solver, eqxdeq.ReversibleAdjoint()) == 16
    assert slots(solver, eqxdeq.ReversibleAdjoint(checkpoints=16)) == 16
    with pytest.raises(ValueError, match=r"`eqxdeq\.Reversible\(checkpoints=16\)`"):
        slots(solver, eqxdeq.ReversibleAdjoint(checkpoints=8))


def test_forward_mode_is_not_supported():
    fn, y0, (weight, bias) = tanh_problem(jr.PRNGKey(17), radius=0.5)

    def y_star(b):
        solver = eqxdeq.Reversible(1e-8, 1e-8)
        adjoint = eqxdeq.ReversibleAdjoint()
        return optx.fixed_point(fn, solver, y0, (weight, b), adjoint=adjoint).value

    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(y_star, (bias,), (bias,))
