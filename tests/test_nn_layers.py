"""Variational dropout and weight/spectral normalisation (`eqxdeq.nn`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
import optimistix as optx
import pytest

from eqxdeq.nn._dropout import (
    VariationalDropout,
    VariationalDropout1d,
    VariationalDropout2d,
    VariationalDropout3d,
    VariationalDropToken1d,
    VariationalDropToken2d,
    VariationalDropToken3d,
)
from eqxdeq.nn._norm import apply_norm, remove_norm, reset_norm

from .helpers import tree_allclose


# (layer, input shape, expected mask shape)
DROPOUTS = [
    (VariationalDropout(0.4), (3, 5), (3, 5)),
    (VariationalDropout(0.4, shared_axes=1), (3, 5), (3, 1)),
    (VariationalDropout(0.4, shared_axes=(0, -1)), (3, 4, 5), (1, 4, 1)),
    (VariationalDropout1d(0.4), (6, 7), (6, 1)),
    (VariationalDropout1d(0.4, channel_axis=-1), (7, 6), (1, 6)),
    (VariationalDropout2d(0.4), (6, 4, 5), (6, 1, 1)),
    (VariationalDropout3d(0.4), (6, 2, 3, 4), (6, 1, 1, 1)),
    (VariationalDropToken1d(0.4), (6, 7), (1, 7)),
    (VariationalDropToken1d(0.4, channel_axis=-1), (7, 6), (7, 1)),
    (VariationalDropToken2d(0.4), (6, 4, 5), (1, 4, 5)),
    (VariationalDropToken2d(0.4, channel_axis=-1), (4, 5, 6), (4, 5, 1)),
    (VariationalDropToken3d(0.4), (6, 2, 3, 4), (1, 2, 3, 4)),
]
DROPOUT_IDS = [f"{type(d).__name__}-{s}" for d, s, _ in DROPOUTS]


def _positive(key, shape, dtype=jnp.float64):
    return jr.uniform(key, shape, dtype, minval=0.5, maxval=1.5)


@pytest.mark.parametrize("dropout, shape, mask_shape", DROPOUTS, ids=DROPOUT_IDS)
def test_dropout_mask_shape_and_sharing(dropout, shape, mask_shape, getkey):
    assert dropout.mask_shape(shape) == mask_shape
    x = _positive(getkey(), shape)
    key = getkey()
    out = dropout(x, key=key)
    assert out.shape == x.shape and out.dtype == x.dtype
    kept = out != 0
    # Entries are either dropped or scaled by exactly 1/(1 - p).
    assert jnp.allclose(jnp.where(kept, out, x / 0.6), x / 0.6, rtol=1e-12)
    # The mask is constant along the shared axes...
    reduced = tuple(i for i, n in enumerate(mask_shape) if n == 1)
    first = jnp.all(kept, axis=reduced, keepdims=True)
    assert jnp.array_equal(jnp.broadcast_to(first, shape), kept)
    # ...and varies along the others (over a few keys, some entries are kept and
    # some dropped).
    masks = jnp.stack([dropout(x, key=k) != 0 for k in jr.split(key, 8)])
    assert jnp.any(masks) and not jnp.all(masks)


@pytest.mark.parametrize("dropout, shape, mask_shape", DROPOUTS, ids=DROPOUT_IDS)
def test_dropout_same_key_same_mask(dropout, shape, mask_shape, getkey):
    del mask_shape
    key = getkey()
    x, y = _positive(getkey(), shape), _positive(getkey(), shape)
    # The mask depends on the key and the shape only, not on the input values.
    assert jnp.array_equal(dropout(x, key=key) != 0, dropout(y, key=key) != 0)
    assert jnp.array_equal(dropout(x, key=key), dropout(x, key=key))
    jitted = eqx.filter_jit(lambda d, x, k: d(x, key=k))
    assert jnp.array_equal(jitted(dropout, x, key), dropout(x, key=key))
    # Different keys give different masks (checked over a few keys).
    masks = [dropout(x, key=k) != 0 for k in jr.split(getkey(), 8)]
    assert any(not jnp.array_equal(masks[0], m) for m in masks[1:])


@pytest.mark.parametrize("dropout, shape, mask_shape", DROPOUTS, ids=DROPOUT_IDS)
def test_dropout_preserves_expectation(dropout, shape, mask_shape, getkey):
    del mask_shape
    x = jr.normal(getkey(), shape, jnp.float64)
    keys = jr.split(getkey(), 4000)
    outs = jax.vmap(lambda k: dropout(x, key=k))(keys)
    # Per entry: variance x² p/(1-p) / N, so the standard error is ≈ 0.013 |x|.
    assert jnp.allclose(jnp.mean(outs, axis=0), x, rtol=0, atol=0.07 * jnp.abs(x))
    dropped = jnp.mean(outs == 0)
    assert abs(float(dropped) - 0.4) < 0.03


def test_dropout_inference_is_identity(getkey):
    x = jr.normal(getkey(), (4, 5), jnp.float64)
    key = getkey()
    assert VariationalDropout1d(0.5, inference=True)(x) is x
    assert VariationalDropout1d(0.5)(x, inference=True) is x
    assert VariationalDropout1d(0.0)(x) is x
    assert eqx.nn.inference_mode(VariationalDropToken1d(0.5))(x) is x
    # The call-time flag takes priority over the field.
    out = VariationalDropout1d(0.5, inference=True)(x, key=key, inference=False)
    assert not jnp.array_equal(out, x)
    # inference_mode reaches layers nested in a model.
    model = eqx.nn.inference_mode([VariationalDropout(0.5), VariationalDropout2d(0.1)])
    assert all(layer.inference for layer in model)


def test_dropout_vmap(getkey):
    dropout = VariationalDropout1d(0.5)
    x = _positive(getkey(), (16, 6, 5))
    key = getkey()
    # One key for the whole batch: the same mask for every sample.
    same = jax.vmap(lambda x: dropout(x, key=key))(x)
    assert jnp.array_equal(same != 0, jnp.broadcast_to(same[:1] != 0, same.shape))
    # One key per sample: per-sample masks.
    keys = jr.split(key, 16)
    per_sample = jax.vmap(lambda x, k: dropout(x, key=k))(x, keys)
    assert not jnp.array_equal(
        per_sample != 0, jnp.broadcast_to(per_sample[:1] != 0, same.shape)
    )
    assert jnp.array_equal(per_sample[3], dropout(x[3], key=keys[3]))


def test_dropout_gradient_and_dtype(getkey):
    dropout = VariationalDropToken2d(0.25)
    x = jr.normal(getkey(), (3, 4, 4), jnp.float32)
    key = getkey()
    out = dropout(x, key=key)
    assert out.dtype == jnp.float32
    grad = jax.grad(lambda x: jnp.sum(dropout(x, key=key)))(x)
    expected = jnp.where(out != 0, jnp.float32(1 / 0.75), jnp.float32(0))
    assert grad.dtype == jnp.float32
    assert jnp.allclose(grad, expected)


def test_dropout_fixed_point_converges(getkey):
    # The use case: a cell evaluated many times per solve with one key converges to
    # the fixed point of one masked function.
    n = 16
    weight = jr.normal(getkey(), (n, n), jnp.float64)
    weight = 0.5 * weight / jnp.linalg.norm(weight, 2)
    bias = jr.normal(getkey(), (n, 3), jnp.float64)
    dropout = VariationalDropout1d(0.3)
    key = getkey()

    def cell(z, args):
        weight, bias = args
        return jnp.tanh(weight @ dropout(z, key=key) + bias)

    solver = optx.FixedPointIteration(rtol=1e-10, atol=1e-10)
    sol = optx.fixed_point(cell, solver, jnp.zeros((n, 3)), (weight, bias))
    assert sol.result == optx.RESULTS.successful
    assert jnp.allclose(cell(sol.value, (weight, bias)), sol.value, atol=1e-8)


def test_dropout_errors(getkey):
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="p="):
            VariationalDropout1d(p)
    with pytest.raises(ValueError, match="p="):
        VariationalDropout(1.0, shared_axes=0)
    with pytest.raises(ValueError, match="channel_axis"):
        VariationalDropout2d(0.5, channel_axis=3)
    with pytest.raises(RuntimeError, match="key="):
        VariationalDropout1d(0.5)(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="channels, height, width"):
        VariationalDropout2d(0.5)(jnp.ones((2, 3)), key=getkey())
    with pytest.raises(ValueError, match="channels, length"):
        VariationalDropToken1d(0.5)(jnp.ones((2, 3, 4)), key=getkey())
    with pytest.raises(ValueError, match="out of range"):
        VariationalDropout(0.5, shared_axes=2)(jnp.ones((2, 3)), key=getkey())
    with pytest.raises(ValueError, match="more than once"):
        VariationalDropout(0.5, shared_axes=(1, -1))(jnp.ones((2, 3)), key=getkey())


# --- normalisation --------------------------------------------------------------


class _Cell(eqx.Module):
    seq: eqx.nn.Sequential
    layers: list
    conv: eqx.nn.Conv2d
    deconv: eqx.nn.ConvTranspose1d
    embedding: eqx.nn.Embedding
    norm: eqx.nn.LayerNorm
    scale: jax.Array

    def __init__(self, key):
        keys = jr.split(key, 6)
        self.seq = eqx.nn.Sequential(
            [
                eqx.nn.Linear(4, 5, key=keys[0]),
                eqx.nn.Lambda(jnp.tanh),
                eqx.nn.Conv1d(5, 3, 1, key=keys[1]),
            ]
        )
        self.layers = [
            eqx.nn.Linear(3, 3, key=keys[2]),
            {"inner": eqx.nn.Linear(3, 2, use_bias=False, key=keys[3])},
        ]
        self.conv = eqx.nn.Conv2d(2, 4, 3, key=keys[4])
        self.deconv = eqx.nn.ConvTranspose1d(2, 3, 2, key=keys[5])
        self.embedding = eqx.nn.Embedding(10, 4, key=keys[0])
        self.norm = eqx.nn.LayerNorm(3)
        self.scale = jnp.ones(3)


def _wrapped(module, cls):
    is_leaf = lambda x: isinstance(x, eqx.nn.WeightNorm | eqx.nn.SpectralNorm)
    return [x for x in jtu.tree_leaves(module, is_leaf=is_leaf) if isinstance(x, cls)]


@pytest.mark.parametrize("kind", ["weight", "spectral"])
def test_apply_norm_wraps_every_linear_and_conv(kind, getkey):
    cell = _Cell(getkey())
    normed = apply_norm(cell, kind, key=getkey())
    cls = eqx.nn.WeightNorm if kind == "weight" else eqx.nn.SpectralNorm
    wrapped = _wrapped(normed, cls)
    assert len(wrapped) == 6
    assert isinstance(normed.seq.layers[0], cls)
    assert isinstance(normed.seq.layers[0].layer, eqx.nn.Linear)
    assert isinstance(normed.seq.layers[1], eqx.nn.Lambda)
    assert isinstance(normed.seq.layers[2].layer, eqx.nn.Conv1d)
    assert isinstance(normed.layers[0], cls)
    assert isinstance(normed.layers[1]["inner"], cls)
    assert isinstance(normed.conv.layer, eqx.nn.Conv2d)
    assert isinstance(normed.deconv.layer, eqx.nn.ConvTranspose1d)
    # Everything else is untouched.
    assert tree_allclose(normed.embedding, cell.embedding, rtol=0, atol=0)
    assert tree_allclose(normed.norm, cell.norm, rtol=0, atol=0)
    assert tree_allclose(normed.scale, cell.scale, rtol=0, atol=0)
    # Already-normalised layers are neither re-wrapped nor searched inside.
    again = apply_norm(normed, "weight", key=getkey())
    assert len(_wrapped(again, eqx.nn.WeightNorm | eqx.nn.SpectralNorm)) == 6
    assert not any(isinstance(x.layer, eqx.nn.WeightNorm) for x in _wrapped(again, cls))


def test_apply_norm_filter(getkey):
    cell = _Cell(getkey())
    only_linear = apply_norm(cell, filter=eqx.nn.Linear)
    assert len(_wrapped(only_linear, eqx.nn.WeightNorm)) == 3
    assert isinstance(only_linear.conv, eqx.nn.Conv2d)
    convs = apply_norm(cell, filter=(eqx.nn.Conv, eqx.nn.ConvTranspose))
    assert len(_wrapped(convs, eqx.nn.WeightNorm)) == 3
    narrow = apply_norm(
        cell, filter=lambda l: isinstance(l, eqx.nn.Linear) and l.out_features == 3
    )
    assert [type(x.layer) for x in _wrapped(narrow, eqx.nn.WeightNorm)] == [
        eqx.nn.Linear
    ]
    assert tree_allclose(narrow.layers[0].layer, cell.layers[0], rtol=0, atol=0)
    embedded = apply_norm(cell, filter=eqx.nn.Embedding)
    assert isinstance(embedded.embedding, eqx.nn.WeightNorm)
    # A bare layer is wrapped too.
    assert isinstance(apply_norm(cell.conv), eqx.nn.WeightNorm)


LAYERS = [
    ("linear", lambda k: eqx.nn.Linear(6, 4, key=k), (6,)),
    ("conv2d", lambda k: eqx.nn.Conv2d(3, 5, 3, padding=1, key=k), (3, 6, 6)),
    ("convT1d", lambda k: eqx.nn.ConvTranspose1d(3, 2, 3, key=k), (3, 7)),
]


@pytest.mark.parametrize("axis", [0, None])
@pytest.mark.parametrize("name, make, shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_weight_norm_is_the_same_function(name, make, shape, axis, getkey):
    del name
    layer = make(getkey())
    x = jr.normal(getkey(), shape, jnp.float64)
    normed = apply_norm(layer, "weight", axis=axis)
    assert isinstance(normed, eqx.nn.WeightNorm) and normed.axis == axis
    assert jnp.allclose(normed(x), layer(x), rtol=1e-12, atol=1e-12)
    jitted = eqx.filter_jit(lambda m, x: m(x))(normed, x)
    assert jnp.allclose(jitted, layer(x), rtol=1e-12, atol=1e-12)
    # Round trip.
    plain = remove_norm(normed)
    assert jtu.tree_structure(plain) == jtu.tree_structure(layer)
    assert tree_allclose(plain, layer, rtol=1e-12, atol=1e-12)
    # After changing g, remove_norm folds g v / ‖v‖ into the weight.
    normed = eqx.tree_at(lambda m: m.g, normed, 2 * normed.g)
    assert jnp.allclose(remove_norm(normed)(x), normed(x), rtol=1e-12)


@pytest.mark.parametrize("name, make, shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_spectral_norm_divides_by_largest_singular_value(name, make, shape, getkey):
    del name
    layer = make(getkey())
    x = jr.normal(getkey(), shape, jnp.float64)
    matrix = jnp.reshape(layer.weight, (layer.weight.shape[0], -1))
    sigma = jnp.linalg.norm(matrix, 2)
    normed, state = eqx.nn.make_with_state(apply_norm)(
        layer, "spectral", key=getkey(), num_power_iterations=200
    )
    assert isinstance(normed, eqx.nn.SpectralNorm)
    assert normed.num_power_iterations == 200
    out, state = normed(x, state)
    u, v = state.get(normed.uv_index)
    assert jnp.allclose(u @ matrix @ v, sigma, rtol=1e-3)
    reference = eqx.tree_at(lambda l: l.weight, layer, layer.weight / sigma)
    assert jnp.allclose(out, reference(x), rtol=1e-3, atol=1e-6)
    # remove_norm gives the layer that inference mode computes, with ‖W‖₂ ≈ 1.
    plain = remove_norm(normed, state)
    assert type(plain) is type(layer)
    out_inference, state = normed(x, state, inference=True)
    assert jnp.allclose(plain(x), out_inference, rtol=1e-12, atol=1e-12)
    plain_matrix = jnp.reshape(plain.weight, matrix.shape)
    assert jnp.allclose(jnp.linalg.norm(plain_matrix, 2), 1, rtol=1e-3)


def test_spectral_norm_state_routes(getkey):
    cell = _Cell(getkey())
    key = getkey()
    # `apply_norm` then `eqx.nn.State(model)`, or `make_with_state(apply_norm)`.
    model = apply_norm(cell, "spectral", key=key)
    state = eqx.nn.State(model)
    model2, state2 = eqx.nn.make_with_state(apply_norm)(cell, "spectral", key=key)
    for layer, layer2 in zip(
        _wrapped(model, eqx.nn.SpectralNorm), _wrapped(model2, eqx.nn.SpectralNorm)
    ):
        assert tree_allclose(state.get(layer.uv_index), state2.get(layer2.uv_index))
    # Weight norm is stateless: reset_norm leaves the (empty) state alone.
    weight_normed = apply_norm(cell, "weight")
    empty = eqx.nn.State(weight_normed)
    assert jtu.tree_leaves(reset_norm(weight_normed, empty)) == []


def _mlp(key):
    k1, k2 = jr.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(5, 8, key=k1),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(8, 5, key=k2),
        ]
    )


def test_spectral_norm_training_step(getkey):
    model, state = eqx.nn.make_with_state(apply_norm)(
        _mlp(getkey()), "spectral", key=getkey()
    )
    x = jr.normal(getkey(), (16, 5), jnp.float64)
    y = jr.normal(getkey(), (16, 5), jnp.float64)
    optim = optax.adam(1e-2)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    def loss(model, state, x, y):
        # Training mode: each call advances the power iteration. The batch shares one
        # state, so map over the batch with the state broadcast and keep one copy.
        out, states = jax.vmap(lambda x: model(x, state), out_axes=(0, None))(x)
        return jnp.mean((out - y) ** 2), states

    @eqx.filter_jit
    def step(model, state, opt_state):
        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            model, state, x, y
        )
        # optax's bias correction mixes an int32 count with floats.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optim.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), state, opt_state, value

    layers = _wrapped(model, eqx.nn.SpectralNorm)
    values, uvs = [], [[state.get(layer.uv_index) for layer in layers]]
    new_model = model
    for _ in range(3):
        new_model, state, opt_state, value = step(new_model, state, opt_state)
        values.append(value)
        uvs.append([state.get(layer.uv_index) for layer in layers])
    assert values[-1] < values[0]
    # The parameters moved, and the state advanced at every step.
    assert not jnp.allclose(
        new_model.layers[0].layer.weight, model.layers[0].layer.weight
    )
    for before, after in zip(uvs[:-1], uvs[1:]):
        assert not tree_allclose(before, after, rtol=1e-12, atol=1e-12)


def _loss_through(cell, x):
    return jnp.sum(jnp.sin(jax.vmap(cell)(x)))


def test_reset_then_remove_matches_normalised_layers(getkey):
    # The DEQ pattern: one power iteration per step, then a plain cell. Gradients
    # agree with calling the spectrally (and weight-) normalised layers directly.
    model, state = eqx.nn.make_with_state(apply_norm)(
        _mlp(getkey()), "spectral", key=getkey(), num_power_iterations=2
    )
    leaves = _wrapped(model, eqx.nn.SpectralNorm)
    before = [state.get(layer.uv_index) for layer in leaves]
    x = jr.normal(getkey(), (4, 5), jnp.float64)

    # Compare with one call in training mode, which also takes two power iterations.
    leaves_, treedef = jtu.tree_flatten(state)
    state_copy = jtu.tree_unflatten(treedef, leaves_)
    _, trained = model(x[0], state_copy)
    state = reset_norm(model, state)
    after = [state.get(layer.uv_index) for layer in leaves]
    assert tree_allclose(after, [trained.get(layer.uv_index) for layer in leaves])
    assert not tree_allclose(before, after, rtol=1e-12, atol=1e-12)

    def via_remove(model):
        return _loss_through(remove_norm(model, state), x)

    # `Sequential` does not forward `inference=`, so toggle the layers instead.
    def via_layers(model):
        model = eqx.nn.inference_mode(model)
        return _loss_through(lambda x: model(x, state)[0], x)

    value1, grad1 = eqx.filter_value_and_grad(via_remove)(model)
    value2, grad2 = eqx.filter_value_and_grad(via_layers)(model)
    assert jnp.allclose(value1, value2, rtol=1e-12)
    assert tree_allclose(grad1, grad2, rtol=1e-10, atol=1e-12)
    plain = remove_norm(model, state)
    assert not _wrapped(plain, eqx.nn.SpectralNorm | eqx.nn.WeightNorm)
    # jit through both.
    assert jnp.allclose(eqx.filter_jit(via_remove)(model), value1, rtol=1e-12)
    state_copy = jtu.tree_unflatten(treedef, jtu.tree_leaves(state))
    jitted = eqx.filter_jit(reset_norm)(model, state)
    assert isinstance(jitted, eqx.nn.State)
    assert tree_allclose(jitted, reset_norm(model, state_copy))


def test_norm_errors(getkey):
    layer = eqx.nn.Linear(3, 3, key=getkey())
    with pytest.raises(Exception, match="kind"):
        apply_norm(layer, "batch")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="key="):
        apply_norm(layer, "spectral")
    with pytest.raises(ValueError, match="no array `weight`"):
        apply_norm(eqx.nn.LayerNorm(3, use_weight=False), filter=eqx.nn.LayerNorm)
    with pytest.raises(ValueError, match="at least two axes"):
        apply_norm(
            eqx.nn.LayerNorm(3), "spectral", key=getkey(), filter=eqx.nn.LayerNorm
        )
    normed = apply_norm(layer, "spectral", key=getkey())
    with pytest.raises(ValueError, match="State"):
        remove_norm(normed)
