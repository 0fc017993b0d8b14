"""`eqxdeq.nn.DEQ` and its initial-state policies, against dense references."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import optimistix as optx
import pytest

import eqxdeq
from eqxdeq.nn import (
    DEQ,
    half_normal_like,
    HalfNormal,
    Predictor,
    VariationalDropout,
    Zeros,
    zeros_like,
)

from .helpers import dense_fixed_point, dense_ift_gradient, FIXED_POINT_SOLVERS


N, M = 8, 3  # state size, input size


def _rng(key):
    return np.random.default_rng(np.asarray(key))


def _matrix(key, n, m, norm, dtype=jnp.float64):
    """A random `(n, m)` matrix of spectral norm `norm` (built in NumPy: eager JAX
    would compile an SVD for every shape)."""
    a = _rng(key).standard_normal((n, m))
    return jnp.asarray(norm * a / np.linalg.norm(a, 2), dtype)


def _err(a):
    """`max |a|` of an array, as a Python float. (The modulus is taken before the
    cast: numpy >= 2.5's `eigvals` returns a complex array even for real
    eigenvalues, and casting complex to float warns.)"""
    return float(np.max(np.abs(np.asarray(a))).astype(np.float64))


class TanhCell(eqx.Module):
    """`z ↦ tanh(W z + U x + b)` on one sample."""

    weight: jax.Array
    inp: jax.Array
    bias: jax.Array

    def __call__(self, z, x, *, key=None):
        del key
        return jnp.tanh(self.weight @ z + self.inp @ x + self.bias)


def make_cell(key, radius=0.6, n=N, m=M, dtype=jnp.float64, input_norm=1.0):
    wkey, ukey, bkey = jr.split(key, 3)
    return TanhCell(
        _matrix(wkey, n, n, radius, dtype),
        _matrix(ukey, n, m, input_norm, dtype),
        jnp.asarray(0.1 * _rng(bkey).standard_normal(n), dtype),
    )


class BatchTanhCell(eqx.Module):
    """The same map on a batch `(batch, n)`: the whole batch is one state."""

    cell: TanhCell

    def __call__(self, z, x, *, key=None):
        del key
        c = self.cell
        return jnp.tanh(z @ c.weight.T + x @ c.inp.T + c.bias[None, :])


class DropoutCell(eqx.Module):
    weight: jax.Array
    inp: jax.Array
    dropout: VariationalDropout

    def __call__(self, z, x, *, key=None):
        return jnp.tanh(self.dropout(self.weight @ z, key=key) + self.inp @ x)


class LinearCell(eqx.Module):
    """`tanh(lin(z) + inp(x))` with equinox layers (for spectral normalisation)."""

    lin: eqx.nn.Linear
    inp: eqx.nn.Linear

    def __init__(self, key, n=N, m=M):
        k1, k2 = jr.split(key)
        self.lin = eqx.nn.Linear(n, n, key=k1)
        self.inp = eqx.nn.Linear(m, n, key=k2)

    def __call__(self, z, x, *, key=None):
        del key
        # (Spectrally normalised, ‖∂f/∂z‖₂ ≤ 0.5.)
        return jnp.tanh(0.5 * self.lin(z) + self.inp(x))


class LinearMapCell(eqx.Module):
    """`z ↦ A z + U x`: affine, so Picard's residuals are `Aᵏ r₀` exactly."""

    weight: jax.Array
    inp: jax.Array

    def __call__(self, z, x, *, key=None):
        del key
        return self.weight @ z + self.inp @ x


class TwoScaleCell(eqx.Module):
    """A state of two resolutions `(z1: (4,), z2: (2, 3))`, coupled both ways."""

    a: jax.Array  # (4, 4)
    b: jax.Array  # (4, 6)
    c: jax.Array  # (6, 4)
    d: jax.Array  # (6, 6)
    u: jax.Array  # (6, M)

    def __call__(self, z, x, *, key=None):
        del key
        z1, z2 = z
        f2 = z2.reshape(-1)
        new1 = jnp.tanh(self.a @ z1 + self.b @ f2 + x[:1].repeat(4))
        new2 = jnp.tanh(self.c @ z1 + self.d @ f2 + self.u @ x)
        return new1, new2.reshape(2, 3)


def _apply(z, args):
    """The cell as a fixed-point map `f(z, args)` for the dense references."""
    cell, x, key = args
    return cell(z, x, key=key)


def _input(key, shape=(M,), dtype=jnp.float64):
    return jnp.asarray(_rng(key).standard_normal(shape), dtype)


def _loss_weights(key, shape=(N,)):
    return jnp.asarray(_rng(key).standard_normal(shape))


def _with_cell(deq, cell):
    return eqx.tree_at(lambda d: d.cell, deq, cell)


def _grad_close(a, b, atol):
    """Two gradients (pytrees of arrays) agree to `atol`; returns the max error."""
    errors = jtu.tree_leaves(jtu.tree_map(lambda u, v: _err(u - v), a, b))
    error = max(float(e) for e in errors)
    assert error < atol, error
    return error


# Few solver configurations, shared by the tests so that their compilations are too
# (a traced `step_budget` stands in for small step limits). Picard compiles fastest.

TIGHT = eqxdeq.Anderson(1e-12, 1e-12)
PICARD = eqxdeq.Picard(1e-12, 1e-12)
STEPS = 100


def _deq(cell, solver: optx.AbstractFixedPointSolver = PICARD, latent=(N,), **kwargs):
    return DEQ(cell, latent, solver, max_steps=kwargs.pop("max_steps", STEPS), **kwargs)


def _budget(k):
    return jnp.array(k)


def _loss(w):
    return lambda z: jnp.sum(w * z) + jnp.sum(z**2)


def _reference(cell, x):
    return dense_fixed_point(_apply, jnp.zeros(N), (cell, x, None))


#
# 1. Correctness against dense references.
#


def test_fixed_point_matches_dense_newton(getkey):
    cell, x = make_cell(getkey()), _input(getkey())
    reference = _reference(cell, x)
    assert _err(reference) > 0.1  # not trivial: the test can fail
    for solver in (TIGHT, PICARD):
        z, stats = _deq(cell, solver)(x)
        assert z.shape == (N,) and z.dtype == jnp.float64
        assert bool(stats.successful)
        assert _err(z - reference) < 1e-10


def test_implicit_gradient_matches_dense_ift(getkey):
    cell, x, loss = (
        make_cell(getkey()),
        _input(getkey()),
        _loss(_loss_weights(getkey())),
    )
    deq = _deq(cell)
    got = eqx.filter_grad(lambda c: loss(_with_cell(deq, c)(x)[0]))(cell)
    reference = dense_ift_gradient(_apply, jnp.zeros(N), (cell, x, None), loss)[0]
    _grad_close(got, reference, 1e-8)
    assert _err(reference.weight) > 0.1


def test_jfb_gradient_is_one_step_gradient(getkey):
    cell, x, loss = (
        make_cell(getkey()),
        _input(getkey()),
        _loss(_loss_weights(getkey())),
    )
    deq = _deq(cell, adjoint=eqxdeq.JFB())
    got = eqx.filter_grad(lambda c: loss(_with_cell(deq, c)(x)[0]))(cell)
    z_star = lax.stop_gradient(deq(x)[0])
    one_step = eqx.filter_grad(lambda c: loss(c(z_star, x)))(cell)
    _grad_close(got, one_step, 1e-10)
    # ...which is not the exact gradient (the check discriminates).
    exact = dense_ift_gradient(_apply, jnp.zeros(N), (cell, x, None), loss)[0]
    assert _err(exact.weight - got.weight) > 1e-2


def test_float32(getkey):
    cell = make_cell(getkey(), dtype=jnp.float32)
    x = _input(getkey(), dtype=jnp.float32)
    deq = _deq(cell, eqxdeq.Anderson(1e-6, 1e-6))
    z, stats = deq(x)
    assert z.dtype == jnp.float32 and stats.abs_residual.dtype == jnp.float32
    assert bool(stats.successful)
    reference = _reference(cell, x)  # in float64
    assert _err(z.astype(jnp.float64) - reference) < 1e-5
    loss = lambda z: jnp.sum(z**2)
    grad = eqx.filter_grad(lambda c: loss(_with_cell(deq, c)(x)[0]))(cell)
    assert grad.weight.dtype == jnp.float32
    exact = dense_ift_gradient(_apply, jnp.zeros(N), (cell, x, None), loss)[0]
    assert _err(grad.weight.astype(jnp.float64) - exact.weight) < 1e-4


#
# 2. vmap, jit, training.
#


@eqx.filter_jit
def _jit_vmap(deq, xs, keys):
    return jax.vmap(deq)(xs, key=keys)


def test_vmap_and_jit_per_sample_stats(getkey):
    batch = 5
    cell = make_cell(getkey())
    # Inputs of very different sizes converge in different numbers of steps.
    xs = _input(getkey(), (batch, M)) * jnp.array([0.0, 0.1, 1.0, 3.0, 10.0])[:, None]
    keys = jr.split(getkey(), batch)
    deq = _deq(cell, PICARD)
    zs, stats = jax.vmap(deq)(xs, key=keys)
    assert zs.shape == (batch, N)
    for field in ("num_steps", "num_fn_evals", "abs_residual", "nstep", "init_loss"):
        assert getattr(stats, field).shape == (batch,), field
    assert stats.successful.shape == (batch,) and bool(jnp.all(stats.successful))
    assert len(set(stats.num_steps.tolist())) > 1  # each sample to its own tolerance
    for i in range(batch):
        assert _err(zs[i] - _reference(cell, xs[i])) < 1e-10
        # The same as an unbatched call.
        z_i, stats_i = deq(xs[i], key=keys[i])
        assert _err(zs[i] - z_i) < 1e-13
        assert int(stats_i.num_steps) == int(stats.num_steps[i])
    zs_jit, stats_jit = _jit_vmap(deq, xs, keys)
    assert _err(zs_jit - zs) < 1e-13
    assert jnp.array_equal(stats_jit.num_steps, stats.num_steps)


def test_batch_as_one_state_matches_vmap(getkey):
    batch = 4
    cell, xs = make_cell(getkey()), _input(getkey(), (batch, M))
    z_vmap, _ = jax.vmap(_deq(cell))(xs)
    z_one, stats = _deq(BatchTanhCell(cell), latent=(batch, N))(xs)
    assert z_one.shape == (batch, N) and stats.num_steps.shape == ()
    assert bool(stats.successful)
    assert _err(z_one - z_vmap) < 1e-10


def test_training_step_with_optax(getkey):
    batch = 8
    deq = _deq(make_cell(getkey(), radius=0.5))
    readout = eqx.nn.Linear(N, 1, key=getkey())
    model = (deq, readout)
    xs = _input(getkey(), (batch, M))
    ys = jnp.sin(jnp.sum(xs, axis=1, keepdims=True))
    optim = optax.adam(1e-2)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model, xs, ys, keys):
        deq, readout = model
        zs, stats = jax.vmap(deq)(xs, key=keys)
        pred = jax.vmap(readout)(zs)
        return jnp.mean((pred - ys) ** 2), stats

    traces = []

    @eqx.filter_jit
    def step(model, opt_state, key):
        traces.append(None)
        keys = jr.split(key, batch)
        (loss, stats), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, xs, ys, keys
        )
        with jax.numpy_dtype_promotion("standard"):
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, opt_state = optim.update(grads, opt_state, params)
            model = eqx.apply_updates(model, updates)
        return model, opt_state, loss, stats

    losses = []
    for _ in range(6):
        model, opt_state, loss, stats = step(model, opt_state, getkey())
        assert bool(jnp.all(stats.successful))
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # The cell was trained too, not just the readout...
    assert not jnp.array_equal(
        model[0].cell.weight,  # pyright: ignore[reportFunctionMemberAccess]
        deq.cell.weight,  # pyright: ignore[reportFunctionMemberAccess]
    )
    # ...but not the solver: the DEQ's only parameters are the cell's, and the step
    # compiled once (the weak type of the solver's step size did not flip).
    params = eqx.filter(deq, eqx.is_inexact_array)
    assert len(jtu.tree_leaves(params)) == len(jtu.tree_leaves(deq.cell)) == 3
    assert model[0].solver == deq.solver
    assert len(traces) == 1


#
# 3. Dropout: one mask per solve.
#


def _dropout_deq(key, p=0.5):
    wkey, ukey = jr.split(key)
    # ‖W‖₂ = 0.35: contractive even with the kept entries scaled by 1/(1-p) = 2.
    weight, inp = _matrix(wkey, N, N, 0.35), _matrix(ukey, N, M, 1.0)
    return _deq(DropoutCell(weight, inp, VariationalDropout(p)))


def test_dropout_mask_fixed_within_a_solve(getkey):
    deq, x, key = _dropout_deq(getkey()), _input(getkey()), getkey()
    z, stats = deq(x, key=key)
    assert bool(stats.successful)
    # The DEQ passes the second half of `jr.split(key)` to the cell, at every
    # iteration: z is a fixed point of the cell with that one mask...
    init_key, solve_key = jr.split(key)
    assert _err(deq.cell(z, x, key=solve_key) - z) < 1e-10
    # ...and not of the cell with another mask.
    assert _err(deq.cell(z, x, key=init_key) - z) > 1e-2
    # Another key: another mask and another fixed point; the same key: the same.
    assert _err(deq(x, key=getkey())[0] - z) > 1e-2
    assert jnp.array_equal(deq(x, key=key)[0], z)
    # Per sample under vmap.
    keys = jnp.stack([key, getkey()])
    zs, _ = jax.vmap(deq)(jnp.stack([x, x]), key=keys)
    assert _err(zs[0] - z) < 1e-10
    assert _err(zs[1] - z) > 1e-2


def test_dropout_inference_mode(getkey):
    deq, x = _dropout_deq(getkey()), _input(getkey())
    inference = eqx.nn.inference_mode(deq)
    z, stats = inference(x)  # no key needed
    assert bool(stats.successful)
    reference = _reference(eqx.nn.inference_mode(deq.cell), x)
    assert _err(z - reference) < 1e-10
    assert jnp.array_equal(inference(x, key=getkey())[0], z)
    # In training the cell needs the key.
    with pytest.raises(RuntimeError, match="key="):
        deq(x)


#
# 4. Spectral normalisation: state.
#


def _state_leaves(state):
    return [jnp.array(a) for a in jtu.tree_leaves(state)]


def test_spectral_norm_state_advances_once_per_call(getkey):
    cell = eqxdeq.nn.apply_norm(LinearCell(getkey()), "spectral", key=getkey())
    deq = _deq(cell)
    state = eqx.nn.State(deq)
    x = _input(getkey())
    old = _state_leaves(state)
    # One power-iteration step.
    expected = _state_leaves(eqxdeq.nn.reset_norm(cell, eqx.nn.State(deq)))
    z, stats, new_state = deq(x, state, key=getkey())
    assert bool(stats.successful)
    new = _state_leaves(new_state)
    assert len(new) == len(old) == 4  # (u, v) of two layers
    assert all(not jnp.allclose(a, b, atol=1e-6) for a, b in zip(old, new))
    assert all(jnp.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(expected, new))
    # The solve used one fixed normalised weight (from the advanced state).
    reference = _reference(eqxdeq.nn.remove_norm(cell, new_state), x)
    assert _err(z - reference) < 1e-10
    # Inference mode does not advance it.
    z_inf, _, same_state = eqx.nn.inference_mode(deq)(x, new_state)
    assert all(jnp.array_equal(a, b) for a, b in zip(new, _state_leaves(same_state)))
    assert _err(z_inf - reference) < 1e-10


def test_spectral_norm_training_threads_state(getkey):
    batch = 4
    deq, state = eqx.nn.make_with_state(DEQ)(
        eqxdeq.nn.apply_norm(LinearCell(getkey()), "spectral", key=getkey()),
        (N,),
        PICARD,
    )
    xs = _input(getkey(), (batch, M))
    ys = jnp.cos(xs[:, :1])
    optim = optax.sgd(1e-1)
    opt_state = optim.init(eqx.filter(deq, eqx.is_inexact_array))

    def loss_fn(deq, state, keys):
        zs, stats, state = jax.vmap(deq, in_axes=(0, None), out_axes=(0, 0, None))(
            xs, state, key=keys
        )
        return jnp.mean((zs[:, :1] - ys) ** 2), (state, stats)

    @eqx.filter_jit
    def step(deq, state, opt_state, key):
        keys = jr.split(key, batch)
        (loss, (state, stats)), grads = eqx.filter_value_and_grad(
            loss_fn, has_aux=True
        )(deq, state, keys)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optim.update(grads, opt_state)
            deq = eqx.apply_updates(deq, updates)
        return deq, state, opt_state, loss, stats

    snapshots, losses = [_state_leaves(state)], []
    for _ in range(2):
        deq, state, opt_state, loss, stats = step(deq, state, opt_state, getkey())
        assert bool(jnp.all(stats.successful))
        snapshots.append(_state_leaves(state))
        losses.append(float(loss))
    assert losses[1] < losses[0]
    for before, after in zip(snapshots, snapshots[1:]):
        assert all(not jnp.array_equal(a, b) for a, b in zip(before, after))


#
# 5. Inference settings and step budgets.
#


def _slow_cell(key):
    # ‖W‖₂ = 0.95 and small inputs (tanh' ≈ 1): Picard needs about 40 steps.
    return make_cell(key, radius=0.95, input_norm=0.1)


def test_inference_max_steps_and_solver(getkey):
    cell, x = _slow_cell(getkey()), _input(getkey())
    deq = DEQ(cell, (N,), PICARD, max_steps=4, inference_max_steps=9)
    assert int(deq(x)[1].num_steps) == 4 and not bool(deq(x)[1].successful)
    assert int(eqx.nn.inference_mode(deq)(x)[1].num_steps) == 9
    assert int(deq(x, inference=True)[1].num_steps) == 9
    # The call-time flag overrides the field.
    assert int(eqx.nn.inference_mode(deq)(x, inference=False)[1].num_steps) == 4

    deq = _deq(cell, PICARD, inference_solver=TIGHT)
    z_train, train = deq(x)
    z_test, test = eqx.nn.inference_mode(deq)(x)
    assert bool(train.successful) and bool(test.successful)
    # Anderson in inference, Picard in training.
    assert int(test.num_steps) < int(train.num_steps)
    assert int(train.num_steps) == int(_deq(cell, PICARD)(x)[1].num_steps)
    assert int(test.num_steps) == int(_deq(cell, TIGHT)(x)[1].num_steps)
    assert _err(z_test - _reference(cell, x)) < 1e-10


def test_step_budget_traced_no_recompile(getkey):
    cell, x = _slow_cell(getkey()), _input(getkey())
    deq = _deq(cell, PICARD)
    traces = []

    @eqx.filter_jit
    def run(deq, x, budget):
        traces.append(None)
        return deq(x, step_budget=budget)[1]

    stats2 = run(deq, x, _budget(2))
    stats5 = run(deq, x, _budget(5))
    assert int(stats2.num_steps) == 2 and int(stats5.num_steps) == 5
    assert stats2.result == eqxdeq.RESULTS.nonlinear_max_steps_reached
    assert not bool(stats5.successful)
    assert len(traces) == 1
    assert int(deq(x)[1].num_steps) > 5


#
# 6. Stats.
#


def test_abs_residual_by_hand(getkey):
    cell, x = _slow_cell(getkey()), _input(getkey())
    for solver in (PICARD, TIGHT):
        z, stats = _deq(cell, solver)(x, step_budget=_budget(3))
        by_hand = jnp.linalg.norm(cell(z, x) - z)
        assert by_hand > 1e-4  # not converged: a real number to compare
        assert jnp.allclose(stats.abs_residual, by_hand, rtol=1e-10, atol=0)
        rel = by_hand / jnp.linalg.norm(cell(z, x))
        assert jnp.allclose(stats.rel_residual, rel, rtol=1e-10, atol=0)
        # Not converged, a `return_best` solver returns its best iterate: the lowest
        # residuals are those at the returned iterate.
        assert float(stats.abs_lowest) == float(stats.abs_residual)
        assert float(stats.rel_lowest) == float(stats.rel_residual)
        # Converged.
        z, stats = _deq(cell, solver)(x)
        by_hand = jnp.linalg.norm(cell(z, x) - z)
        assert jnp.allclose(stats.abs_residual, by_hand, rtol=1e-6, atol=1e-15)


def _dense_spectral_radius(cell, z, x):
    jac = jax.jacfwd(lambda z: cell(z, x))(z)
    return _err(np.linalg.eigvals(np.asarray(jac)))


def test_spectral_radius_stat(getkey):
    # A symmetric weight with eigenvalues 0.8, 0.3, ...: ∂f/∂z = D W with D > 0
    # diagonal has real eigenvalues, and a clear dominant one.
    q, _ = np.linalg.qr(_rng(getkey()).standard_normal((N, N)))
    eigenvalues = np.array([0.8, 0.3, -0.28, 0.2, -0.15, 0.1, 0.05, -0.02])
    weight = jnp.asarray((q * eigenvalues) @ q.T)
    cell = TanhCell(weight, _matrix(getkey(), N, M, 2.0), jnp.zeros(N))
    x = _input(getkey())
    z, stats = _deq(cell, TIGHT, spectral_radius_iters=30)(x, key=getkey())
    dense = _dense_spectral_radius(cell, z, x)
    assert stats.spectral_radius is not None
    assert abs(float(stats.spectral_radius) - float(dense)) < 1e-3
    # The Jacobian at z* is not that at 0, nor W: the estimate is taken at z*.
    assert abs(float(_dense_spectral_radius(cell, jnp.zeros(N), x) - dense)) > 1e-2
    assert abs(float(dense) - 0.8) > 1e-2
    assert _deq(cell, TIGHT)(x)[1].spectral_radius is None


PICARD_HISTORY = eqxdeq.Picard(1e-12, 1e-12, history_length=STEPS)


def test_history_and_nstep(getkey):
    cell, x = make_cell(getkey()), _input(getkey())
    z, stats = _deq(cell, PICARD_HISTORY)(x, step_budget=_budget(STEPS))
    history, steps = stats.residual_history, int(stats.num_steps)
    assert history is not None
    assert history.shape == (STEPS,) and bool(stats.successful)
    assert bool(jnp.all(jnp.isfinite(history[:steps])))
    assert bool(jnp.all(jnp.isnan(history[steps:])))
    assert jnp.allclose(history[steps - 1], stats.abs_residual, rtol=1e-12)
    assert jnp.allclose(history[0], jnp.linalg.norm(cell(jnp.zeros(N), x)))
    assert int(stats.nstep) == steps
    assert float(stats.abs_lowest) == float(jnp.nanmin(history))
    # Without a history: None, and nstep = num_steps.
    _, stats = _deq(cell, PICARD)(x)
    assert stats.residual_history is None
    assert int(stats.nstep) == int(stats.num_steps) == steps


def test_nstep_with_non_monotone_history(getkey):
    # A non-normal weight (spectral radius 0.5, norm ≈ 2): Picard's residual grows
    # for a few steps before it converges. Stopped early, a `return_best` solver
    # returns the best iterate seen, and `nstep` says which.
    weight = 0.5 * jnp.eye(N) + 1.5 * jnp.eye(N, k=1)
    cell = TanhCell(weight, _matrix(getkey(), N, M, 0.1), jnp.zeros(N))
    x = _input(getkey())
    iterates = [jnp.zeros(N)]  # z_k = f^k(0): the k-th evaluation is at z_{k-1}
    for _ in range(12):
        iterates.append(cell(iterates[-1], x))
    keep_last = eqxdeq.Picard(1e-12, 1e-12, history_length=STEPS, return_best=False)
    early = 0
    for budget in (3, 6, 9, 10, 12):
        z, stats = _deq(cell, PICARD_HISTORY)(x, step_budget=_budget(budget))
        assert stats.residual_history is not None
        history = stats.residual_history[:budget]
        nstep = int(stats.nstep)
        assert nstep == int(jnp.argmin(history)) + 1
        assert _err(z - iterates[nstep - 1]) < 1e-14
        early += nstep < budget
        # A solver that returns its last iterate.
        z, stats = _deq(cell, keep_last)(x, step_budget=_budget(budget))
        assert int(stats.nstep) == int(stats.num_steps) == budget
        assert _err(z - iterates[budget - 1]) < 1e-14
    assert early >= 2  # the case is exercised


def test_unsuccessful_is_reported_not_raised(getkey):
    cell, x = _slow_cell(getkey()), _input(getkey())
    z, stats = DEQ(cell, (N,), PICARD, max_steps=4)(x)
    assert not bool(stats.successful)
    assert stats.result == eqxdeq.RESULTS.nonlinear_max_steps_reached
    assert bool(jnp.all(jnp.isfinite(z)))
    with pytest.raises(Exception, match="maximum number of"):
        DEQ(cell, (N,), PICARD, max_steps=4, throw=True)(x)


def test_stats_carry_no_gradient(getkey):
    cell, x = make_cell(getkey()), _input(getkey())
    predictor = eqx.nn.Linear(M, N, key=getkey())
    # Differentiating through the loop, the residuals would have a gradient but for
    # the DEQ's own stop_gradient (the implicit adjoint gives them none anyway).
    deq = _deq(
        cell,
        PICARD_HISTORY,
        adjoint=optx.RecursiveCheckpointAdjoint(),
        spectral_radius_iters=5,
        init=Predictor(predictor),
    )
    # Weights for the logged fields (random, so that gradients cannot cancel).
    weights = {
        "abs_residual": 1.3,
        "rel_residual": 0.7,
        "abs_lowest": 2.1,
        "residual_history": jr.uniform(getkey(), (STEPS,), jnp.float64) + 0.5,
        "spectral_radius": 1.7,
    }

    def stats_loss(deq, init_loss):
        _, stats = deq(x, key=jr.PRNGKey(0), step_budget=_budget(5))
        if init_loss:
            return stats.init_loss
        values = [
            jnp.sum(w * jnp.nan_to_num(getattr(stats, f))) for f, w in weights.items()
        ]
        assert all(v.shape == () for v in values)
        return sum(values)

    grads = eqx.filter_grad(stats_loss)(deq, False)
    assert all(bool(jnp.all(g == 0)) for g in jtu.tree_leaves(grads))
    # init_loss does: to the predictor only (z* is behind a stop_gradient).
    grads = eqx.filter_grad(stats_loss)(deq, True)
    assert _err(grads.init.predictor.weight) > 1e-3
    assert bool(jnp.all(grads.cell.weight == 0))


#
# 7. Initial-state policies.
#


def test_half_normal(getkey):
    cell, x = make_cell(getkey()), _input(getkey())
    struct = jax.ShapeDtypeStruct((1000,), jnp.float64)
    with pytest.raises(ValueError, match="key="):
        HalfNormal()(x, struct, key=None)
    z0 = HalfNormal(2.0)(x, struct, key=getkey())
    assert z0.shape == (1000,) and z0.dtype == jnp.float64
    # About half zero (standard error 0.016), the rest N(0, σ²) with σ = 2.
    zero = z0 == 0
    assert abs(float(jnp.mean(zero)) - 0.5) < 0.07
    assert abs(float(jnp.std(z0[~zero])) - 2.0) < 0.2
    assert abs(float(jnp.mean(z0[~zero]))) < 0.3
    deq = _deq(cell, init=HalfNormal())
    with pytest.raises(ValueError, match="key="):
        deq(x)
    key = getkey()
    z, stats = deq(x, key=key)
    assert bool(stats.successful)
    assert _err(z - _reference(cell, x)) < 1e-10
    # The DEQ draws z0 from the first half of `jr.split(key)` (seen in an unconverged
    # solve, which depends on z0).
    z0 = HalfNormal()(x, jax.ShapeDtypeStruct((N,), jnp.float64), key=jr.split(key)[0])
    early = deq(x, key=key, step_budget=_budget(3))[0]
    assert jnp.array_equal(early, _deq(cell)(x, z0=z0, step_budget=_budget(3))[0])
    assert _err(early - _deq(cell)(x, step_budget=_budget(3))[0]) > 1e-3


def test_predictor_init_loss_and_gradient(getkey):
    cell, x = make_cell(getkey()), _input(getkey())
    predictor = eqx.nn.Linear(M, N, key=getkey())
    deq = _deq(cell, init=Predictor(predictor))
    z, stats = deq(x)
    assert jnp.allclose(stats.init_loss, jnp.mean((predictor(x) - z) ** 2), rtol=1e-12)
    assert float(stats.init_loss) > 1e-3
    grads = eqx.filter_grad(lambda d: d(x)[1].init_loss)(deq)
    by_hand = eqx.filter_grad(lambda p: jnp.mean((p(x) - lax.stop_gradient(z)) ** 2))(
        predictor
    )
    _grad_close(grads.init.predictor, by_hand, 1e-10)
    # z* does not depend on where the solve starts: a loss on z* gives the
    # predictor no gradient.
    grads = eqx.filter_grad(lambda d: jnp.sum(d(x)[0] ** 2))(deq)
    assert all(bool(jnp.all(g == 0)) for g in jtu.tree_leaves(grads.init))
    assert _err(grads.cell.weight) > 1e-3


def test_good_predictor_reduces_steps(getkey):
    cell, x = _slow_cell(getkey()), _input(getkey())
    reference = _reference(cell, x)
    guess = reference + 1e-10 * _loss_weights(getkey())
    _, cold = _deq(cell, PICARD)(x)
    _, warm = _deq(cell, PICARD, init=Predictor(lambda x: guess))(x)
    assert bool(cold.successful) and bool(warm.successful)
    assert int(warm.num_steps) < int(cold.num_steps) / 2
    assert float(warm.init_loss) < 1e-11
    # A given z0 does the same, with no SkipDEQ loss.
    _, given = _deq(cell, PICARD)(x, z0=guess)
    assert int(given.num_steps) == int(warm.num_steps)
    assert float(given.init_loss) == 0


def test_init_bad_structure(getkey):
    cell, x = make_cell(getkey()), _input(getkey())
    deq = _deq(cell)
    bad = [jnp.zeros(N + 1), jnp.zeros(N, jnp.float32), (jnp.zeros(N),)]
    for z0 in bad + [jnp.zeros((N, 1)), {"z": jnp.zeros(N)}]:
        with pytest.raises(ValueError, match="z0"):
            deq(x, z0=z0)
    for z0 in bad:
        with pytest.raises(ValueError, match="predictor"):
            _deq(cell, init=Predictor(lambda x, z0=z0: z0))(x)
    # A z0 of the right shape and dtype is accepted, also when weakly typed (derived
    # from a Python scalar).
    z, _ = deq(x)
    for z0 in (jnp.zeros(N), jnp.full((N,), 0.5), 0.5 + jnp.zeros(N)):
        assert _err(deq(x, z0=z0)[0] - z) < 1e-10
        assert _err(_deq(cell, init=Predictor(lambda x: z0))(x)[0] - z) < 1e-10


def test_zeros_and_half_normal_like_pytree(getkey):
    tree = {
        "a": jnp.ones((2, 3), jnp.float32),
        "b": jax.ShapeDtypeStruct((4,), jnp.float64),
        "c": (jnp.ones((5,), jnp.float16), jax.ShapeDtypeStruct((5,), jnp.float16)),
    }
    is_struct = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    expected = [((2, 3), jnp.float32), ((4,), jnp.float64)] + [((5,), jnp.float16)] * 2
    zeros = zeros_like(tree)
    assert jtu.tree_structure(zeros) == jtu.tree_structure(tree, is_leaf=is_struct)
    for leaf, (shape, dtype) in zip(jtu.tree_leaves(zeros), expected):
        assert isinstance(leaf, jax.Array)
        assert leaf.shape == shape and leaf.dtype == dtype
        assert np.all(np.asarray(leaf) == 0)
    samples = half_normal_like(getkey(), tree, scale=3.0)
    assert jtu.tree_structure(samples) == jtu.tree_structure(zeros)
    for leaf, (shape, dtype) in zip(jtu.tree_leaves(samples), expected):
        assert leaf.shape == shape and leaf.dtype == dtype
        leaf = np.asarray(leaf)
        assert np.any(leaf == 0) and np.any(leaf != 0)
    # Each leaf gets its own key.
    c0, c1 = samples["c"]
    assert not np.array_equal(c0, c1)
    assert bool(eqx.tree_equal(Zeros()(None, tree, key=None), zeros, typematch=True))


#
# 8. Fixed-point correction.
#


def test_trajectory_states(getkey):
    cell, x = _slow_cell(getkey()), _input(getkey())
    deq = DEQ(cell, (N,), PICARD, max_steps=60)
    z, full = deq(x)
    assert bool(full.successful)
    states, stats = deq.trajectory(x, n_states=3)
    assert isinstance(states, tuple) and len(states) == 3
    assert _err(states[-1] - z) < 1e-14
    assert bool(stats.successful)
    # The full solve converges in the third segment (after 40 steps), so the steps
    # counted over the segments are those of the full solve.
    steps = int(full.num_steps)
    assert 40 < steps < 60
    assert int(stats.num_steps) == int(stats.nstep) == steps
    # The intermediate states are on the way to z*.
    errors = [float(jnp.linalg.norm(s - z)) for s in states]
    assert errors[0] > errors[1] > 1e-12
    # Explicit indexing.
    same, _ = deq.trajectory(x, indexing=[20, 40])
    assert all(jnp.array_equal(a, b) for a, b in zip(same, states))
    states, _ = deq.trajectory(x, n_states=1)
    assert len(states) == 1 and _err(states[0] - z) < 1e-14


def test_trajectory_gradient_of_first_state(getkey):
    cell, x, w = _slow_cell(getkey()), _input(getkey()), _loss_weights(getkey())
    deq = DEQ(cell, (N,), PICARD, max_steps=60)

    def loss(cell, i):
        states, _ = _with_cell(deq, cell).trajectory(
            x,
            indexing=[20, 40],
            correction_adjoint=eqxdeq.PhantomAdjoint(steps=1, mode="unroll"),
        )
        return jnp.sum(w * states[i]), states

    (_, states), got = eqx.filter_value_and_grad(loss, has_aux=True)(cell, 0)
    # The iterate that the segment's 20 steps return, then one differentiated
    # application of the cell.
    z_seg = optx.fixed_point(
        _apply, PICARD, jnp.zeros(N), (cell, x, None), max_steps=20, throw=False
    ).value
    z_seg = lax.stop_gradient(z_seg)
    assert _err(states[0] - cell(z_seg, x)) < 1e-14
    by_hand = eqx.filter_grad(lambda c: jnp.sum(w * c(z_seg, x)))(cell)
    _grad_close(got, by_hand, 1e-12)
    # ...which is not the implicit gradient, which the last state gets.
    implicit = dense_ift_gradient(
        _apply, jnp.zeros(N), (cell, x, None), lambda z: jnp.sum(w * z)
    )[0]
    assert _err(implicit.weight - got.weight) > 1e-2
    last = eqx.filter_grad(lambda c: loss(c, -1)[0])(cell)
    _grad_close(last, implicit, 1e-8)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(indexing=[5, 3]),
        dict(indexing=[0, 5]),
        dict(indexing=[5, 5]),
        dict(indexing=[30]),
        dict(indexing=[40]),
        dict(indexing=[-1]),
        dict(n_states=0),
        dict(n_states=31),
    ],
)
def test_trajectory_bad_indexing(kwargs, getkey):
    cell, x = make_cell(getkey()), _input(getkey())
    deq = DEQ(cell, (N,), PICARD, max_steps=30)
    name = "indexing" if "indexing" in kwargs else "n_states"
    with pytest.raises(ValueError, match=name):
        deq.trajectory(x, **kwargs)


#
# 9. Bad constructor arguments.
#


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(solver=optx.Newton(1e-6, 1e-6)), "solver"),
        (dict(solver=optx.BFGS(1e-6, 1e-6)), "solver"),
        (dict(solver="anderson"), "solver"),
        (dict(inference_solver=optx.Newton(1e-6, 1e-6)), "inference_solver"),
        (dict(adjoint=eqxdeq.Neumann(3)), "adjoint"),
        (dict(adjoint="implicit"), "adjoint"),
        (dict(init=jnp.zeros(N)), "init"),
        (dict(init=zeros_like), "init"),
        (dict(max_steps=0), "max_steps"),
        (dict(max_steps=-1), "max_steps"),
        (dict(max_steps=2.5), "max_steps"),
        (dict(max_steps=True), "max_steps"),
        (dict(inference_max_steps=0), "inference_max_steps"),
        (dict(inference_max_steps=False), "inference_max_steps"),
        (dict(latent=(N, 2.0)), "latent"),
        (dict(latent=(N, -1)), "latent"),
        (dict(latent=[N]), "latent"),
        (dict(latent="N"), "latent"),
        (dict(latent=jax.ShapeDtypeStruct((N,), jnp.int32)), "latent"),
        (dict(latent={}), "latent"),
        (dict(spectral_radius_iters=-1), "spectral_radius_iters"),
        (dict(spectral_radius_iters=1.5), "spectral_radius_iters"),
        (dict(spectral_radius_iters=True), "spectral_radius_iters"),
        (dict(cell=3), "cell"),
    ],
)
def test_bad_constructor_arguments(kwargs, name, getkey):
    arguments = dict(cell=make_cell(getkey()), latent=(N,), solver=TIGHT) | kwargs
    # A `ValueError` from `__check_init__`. Under the test-suite's jaxtyping hook an
    # argument of the wrong type can be a `TypeError` from its annotation first;
    # both name the argument. Values of the right type (ints out of range, bools
    # for ints, bad tuples) are always `ValueError`s.
    right_type = name != "cell" and isinstance(kwargs[name], int | tuple)
    with pytest.raises(
        ValueError if right_type else (ValueError, TypeError), match=name
    ):
        DEQ(**arguments)


def test_good_constructor_arguments(getkey):
    cell = make_cell(getkey())
    DEQ(cell, (N,), TIGHT, max_steps=1, spectral_radius_iters=0)
    DEQ(cell, (), TIGHT)
    DEQ(
        cell, (N,), optx.FixedPointIteration(1e-6, 1e-6), adjoint=optx.ImplicitAdjoint()
    )
    DEQ(cell, jax.ShapeDtypeStruct((N,), jnp.float32), TIGHT, inference_max_steps=1)


#
# 10. Pytree (multi-resolution) states.
#


def _two_scale_cell(key):
    keys = jr.split(key, 5)
    return TwoScaleCell(
        _matrix(keys[0], 4, 4, 0.4),
        _matrix(keys[1], 4, 6, 0.3),
        _matrix(keys[2], 6, 4, 0.3),
        _matrix(keys[3], 6, 6, 0.4),
        _matrix(keys[4], 6, M, 1.0),
    )


@eqx.filter_jit
def _pytree_ift_gradient(cell, x, z_star, loss):
    """d loss(z*) / d cell by a dense IFT solve on the flattened state."""
    flat, unravel = jax.flatten_util.ravel_pytree(z_star)

    def f(v, cell):
        return jax.flatten_util.ravel_pytree(cell(unravel(v), x))[0]

    jac = jax.jacfwd(f)(flat, cell)
    y_bar = jax.flatten_util.ravel_pytree(jax.grad(loss)(z_star))[0]
    w = jnp.linalg.solve((jnp.eye(flat.size) - jac).T, y_bar)
    return jax.vjp(lambda c: f(flat, c), cell)[1](w)[0]


def test_multiresolution_state_and_gradient(getkey):
    cell, x = _two_scale_cell(getkey()), _input(getkey())
    latent = (
        jax.ShapeDtypeStruct((4,), jnp.float64),
        jax.ShapeDtypeStruct((2, 3), jnp.float64),
    )
    deq = _deq(cell, latent=latent)
    (z1, z2), stats = deq(x)
    assert z1.shape == (4,) and z2.shape == (2, 3) and bool(stats.successful)
    reference = dense_fixed_point(_apply, zeros_like(latent), (cell, x, None))
    assert _err(z1 - reference[0]) < 1e-10
    assert _err(z2 - reference[1]) < 1e-10
    assert _err(z2) > 0.1

    def loss(z):
        return jnp.sum(z[0] ** 2) + jnp.sum(jnp.sin(z[1]))

    got = eqx.filter_grad(lambda c: loss(_with_cell(deq, c)(x)[0]))(cell)
    _grad_close(got, _pytree_ift_gradient(cell, x, reference, loss), 1e-8)


#
# Slow: every solver; Anderson's trajectories.
#


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIXED_POINT_SOLVERS))
def test_every_solver_fixed_point_and_gradient(name, getkey):
    cell, x, loss = (
        make_cell(getkey()),
        _input(getkey()),
        _loss(_loss_weights(getkey())),
    )
    deq = DEQ(cell, (N,), FIXED_POINT_SOLVERS[name](1e-11), max_steps=300)
    z, stats = deq(x)
    assert bool(stats.successful)
    assert _err(z - _reference(cell, x)) < 1e-9
    got = eqx.filter_grad(lambda c: loss(_with_cell(deq, c)(x)[0]))(cell)
    reference = dense_ift_gradient(_apply, jnp.zeros(N), (cell, x, None), loss)[0]
    _grad_close(got, reference, 1e-7)


@pytest.mark.slow
def test_trajectory_anderson(getkey):
    cell, x, w = _slow_cell(getkey()), _input(getkey()), _loss_weights(getkey())
    deq = _deq(cell, TIGHT)

    def loss(cell, i):
        states, _ = _with_cell(deq, cell).trajectory(x, indexing=[2, 5])
        return jnp.sum(w * states[i]), states

    (_, states), first = eqx.filter_value_and_grad(loss, has_aux=True)(cell, 0)
    assert len(states) == 3
    assert _err(states[-1] - _reference(cell, x)) < 1e-10
    # Anderson restarts its history at every segment: the first state is one cell
    # application after the iterate that a 2-step solve returns.
    z_seg = optx.fixed_point(
        _apply, TIGHT, jnp.zeros(N), (cell, x, None), max_steps=2, throw=False
    ).value
    assert _err(states[0] - cell(z_seg, x)) < 1e-14
    by_hand = eqx.filter_grad(lambda c: jnp.sum(w * c(z_seg, x)))(cell)
    _grad_close(first, by_hand, 1e-12)
    last = eqx.filter_grad(lambda c: loss(c, -1)[0])(cell)
    implicit = dense_ift_gradient(
        _apply, jnp.zeros(N), (cell, x, None), lambda z: jnp.sum(w * z)
    )[0]
    _grad_close(last, implicit, 1e-8)
