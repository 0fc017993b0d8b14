"""`eqxdeq.nn.MultiscaleCell` inside `eqxdeq.nn.DEQ`: convergence, the fixed point,
its structure, the implicit gradient against a dense float64 reference and finite
differences, and jit + vmap over a batch. Two scales, 8×8 inputs, 4 and 8 channels.
"""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import eqxdeq


HEIGHT = WIDTH = 8
CHANNELS = (4, 8)
IN_CHANNELS = 3


@eqx.filter_jit  # one compilation instead of many eager initialisations
def _make_cell(key, dtype, dropout):
    return eqxdeq.nn.MultiscaleCell(
        IN_CHANNELS, CHANNELS, groups=2, dropout=dropout, dtype=dtype, key=key
    )


def _cell(dtype=jnp.float64, seed=0, dropout=0.0):
    return _make_cell(jr.PRNGKey(seed), dtype, dropout)


def _input(dtype=jnp.float64, seed=1, batch=()):
    return jr.normal(jr.PRNGKey(seed), batch + (IN_CHANNELS, HEIGHT, WIDTH), dtype)


def _deq(cell, tol=1e-12, dtype=None):
    return eqxdeq.nn.DEQ(
        cell,
        cell.latent(HEIGHT, WIDTH, dtype),
        eqxdeq.Anderson(tol, tol),
        adjoint=eqxdeq.ImplicitAdjoint(),
        max_steps=100,
    )


def _loss_of_z(z):
    z0, z1 = z
    return jnp.sum(jnp.sin(z0)) + 2 * jnp.sum(jnp.cos(z1) * z1)


@eqx.filter_jit
def _solve(deq, x, key=None):
    return deq(x, key=key)


def _loss(cell, x):
    z = _deq(cell)(x)[0]
    return _loss_of_z(z)


_value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss))


@eqx.filter_jit
def _dense_ift_grad(cell, x, z_star):
    """`(∂f/∂θ)ᵀ (I - ∂f/∂z)⁻ᵀ ∂L/∂z` at `z_star`, with the dense Jacobian."""
    flat, unravel = jax.flatten_util.ravel_pytree(z_star)
    jac = jax.jacfwd(lambda v: jax.flatten_util.ravel_pytree(cell(unravel(v), x))[0])(
        flat
    )
    z_bar = jax.flatten_util.ravel_pytree(jax.grad(_loss_of_z)(z_star))[0]
    w = jnp.linalg.solve((jnp.eye(flat.size) - jac).T, z_bar)
    _, vjp = eqx.filter_vjp(lambda c: c(z_star, x), cell)
    return vjp(unravel(w))[0], jnp.max(jnp.abs(jnp.linalg.eigvals(jac)))


def _flat_params(tree):
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.concatenate([jnp.ravel(a) for a in leaves])


def test_latent_structure():
    cell = _cell()
    latent = cell.latent(HEIGHT, WIDTH)
    assert latent == (
        jax.ShapeDtypeStruct((4, 8, 8), jnp.float64),
        jax.ShapeDtypeStruct((8, 4, 4), jnp.float64),
    )
    assert cell.latent(4, 2, jnp.float32)[1] == jax.ShapeDtypeStruct(
        (8, 2, 1), jnp.float32
    )
    with pytest.raises(ValueError, match="multiples of 2"):
        cell.latent(8, 7)
    with pytest.raises(ValueError, match="groups"):
        eqxdeq.nn.MultiscaleCell(3, (4, 6), groups=4, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="tuple of 2"):
        cell(eqxdeq.nn.zeros_like(cell.latent(HEIGHT, WIDTH)[:1]), _input())


def test_converges_to_fixed_point():
    cell, x = _cell(), _input()
    z_star, stats = _solve(_deq(cell), x)
    assert bool(stats.successful)
    assert int(stats.num_steps) <= 40  # 24 measured
    # The structure of z* is the latent's.
    assert eqx.tree_equal(jax.eval_shape(lambda: z_star), cell.latent(HEIGHT, WIDTH))
    # A fixed point of the cell, and not a trivial one.
    residual = jtu.tree_map(
        lambda a, b: jnp.max(jnp.abs(a - b)), cell(z_star, x), z_star
    )
    assert max(map(float, jtu.tree_leaves(residual))) < 1e-10
    assert all(float(jnp.std(zi)) > 0.1 for zi in z_star)


def test_implicit_gradient_against_dense_reference():
    cell, x = _cell(), _input()
    _, grad = _value_and_grad(cell, x)
    z_star, stats = _solve(_deq(cell), x)
    assert bool(stats.successful)
    ref, radius = _dense_ift_grad(cell, x, z_star)
    # At initialisation the cell is contractive at its fixed point (0.49 measured).
    assert float(radius) < 0.7
    grad, ref = _flat_params(grad), _flat_params(ref)
    assert grad.size == ref.size == _flat_params(cell).size
    error = float(jnp.linalg.norm(grad - ref) / jnp.linalg.norm(ref))
    assert error < 1e-10  # 4e-16 measured


# One scalar parameter each of: the injection at the coarse scale, a branch's group
# norm, the upsampling fusion (scale 1 → 0) and the downsampling fusion (0 → 1).
_PARAMETERS = {
    "injection": (lambda c: c.injections[1].conv.weight, (2, 1, 1, 0)),
    "branch_norm": (lambda c: c.branches[1].norm2.weight, (3,)),
    "upsample": (lambda c: c.fuse[0][1].conv.weight, (1, 5, 0, 0)),
    "downsample": (lambda c: c.fuse[1][0].convs[0].weight, (6, 2, 2, 1)),
}


@pytest.mark.parametrize("name", sorted(_PARAMETERS))
def test_implicit_gradient_against_finite_differences(name):
    where, index = _PARAMETERS[name]
    cell, x = _cell(), _input()
    _, grad = _value_and_grad(cell, x)
    expected = float(where(grad)[index])
    eps = 1e-5
    value = where(cell)[index]

    def loss_at(theta):
        perturbed = eqx.tree_at(where, cell, where(cell).at[index].set(theta))
        z, stats = _solve(_deq(perturbed), x)
        assert bool(stats.successful)
        return float(_loss_of_z(z))

    fd = (loss_at(value + eps) - loss_at(value - eps)) / (2 * eps)
    assert abs(expected) > 1e-3
    np.testing.assert_allclose(expected, fd, rtol=1e-7)  # about 1e-9 measured


@eqx.filter_jit
def _batch_solve(deq, xs):
    return jax.vmap(deq)(xs)


def test_jit_vmap_batch():
    cell, xs = _cell(), _input(batch=(2,))
    deq = _deq(cell)
    zs, stats = _batch_solve(deq, xs)
    assert stats.successful.shape == (2,)
    assert bool(jnp.all(stats.successful))
    assert [zi.shape for zi in zs] == [(2, 4, 8, 8), (2, 8, 4, 4)]
    for b in range(2):
        z, _ = _solve(deq, xs[b])
        for zi, zbi in zip(z, zs):
            np.testing.assert_allclose(zbi[b], zi, rtol=0, atol=1e-10)


def test_float32_with_variational_dropout():
    """One dropout mask per solve (per key), in float32."""
    cell, x = _cell(jnp.float32, dropout=0.3), _input(jnp.float32)
    deq = _deq(cell, tol=1e-5)
    z1, stats = _solve(deq, x, jr.PRNGKey(5))
    assert bool(stats.successful)
    assert float(stats.abs_residual) < 1e-4
    assert all(zi.dtype == jnp.float32 for zi in z1)
    z2, _ = _solve(deq, x, jr.PRNGKey(5))
    z3, stats3 = _solve(deq, x, jr.PRNGKey(6))
    assert bool(stats3.successful)
    assert eqx.tree_equal(z1, z2)
    assert float(jnp.max(jnp.abs(z1[0] - z3[0]))) > 1e-2
