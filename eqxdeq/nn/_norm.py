"""Weight and spectral normalisation of a whole cell, with equinox's own layers.

`apply_norm` wraps layers in [`equinox.nn.WeightNorm`][] or
[`equinox.nn.SpectralNorm`][] by tree surgery; `reset_norm` advances the spectral
norms' power iterations; `remove_norm` folds the normalisation back into plain layers.
"""

import functools as ft
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree


_LayerFilter = type | tuple[type, ...] | Callable[[Any], bool]

_DEFAULT_LAYERS = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)


def _is_norm(x: Any) -> bool:
    return isinstance(x, eqx.nn.WeightNorm | eqx.nn.SpectralNorm)


def _selector(filter: _LayerFilter) -> Callable[[Any], bool]:
    if isinstance(filter, type):
        filter = (filter,)
    if isinstance(filter, tuple):
        if not all(isinstance(t, type) for t in filter):
            raise ValueError(
                "`apply_norm(filter=...)` must be a type, a tuple of types, or a "
                f"predicate on layers; got {filter!r}."
            )
        types = filter
        return lambda x: isinstance(x, types)
    if callable(filter):
        predicate = filter
        return lambda x: isinstance(x, eqx.Module) and bool(predicate(x))
    raise ValueError(
        "`apply_norm(filter=...)` must be a type, a tuple of types, or a predicate on "
        f"layers; got {filter!r}."
    )


def apply_norm(
    module: PyTree,
    kind: Literal["weight", "spectral"] = "weight",
    *,
    key: PRNGKeyArray | None = None,
    filter: _LayerFilter = _DEFAULT_LAYERS,
    weight_name: str = "weight",
    axis: int | None = 0,
    num_power_iterations: int = 1,
    eps: float = 1e-12,
    inference: bool = False,
) -> PyTree:
    r"""Wraps every selected layer of `module` in [`equinox.nn.WeightNorm`][]
    (`kind="weight"`) or [`equinox.nn.SpectralNorm`][] (`kind="spectral"`).

    By default the selected layers are every [`equinox.nn.Linear`][],
    [`equinox.nn.Conv`][] (`Conv1d`, `Conv2d`, ...) and [`equinox.nn.ConvTranspose`][]
    anywhere in `module`: inside other modules, [`equinox.nn.Sequential`][], lists,
    tuples and dicts. Layers that are already normalised are left alone (neither
    re-wrapped nor searched inside). To leave part of a model unnormalised (torchdeq's
    `filter_out`), either pass a predicate as `filter`, or apply this function to a
    sub-module only:
    `eqx.tree_at(lambda m: m.cell, model, apply_norm(model.cell))`.

    - Weight normalisation reparameterises the weight $W$ as
        $g \, v / \lVert v \rVert$, with the norm over every axis except `axis`
        (the output axis, by default). It is initialised at $v = W$,
        $g = \lVert W \rVert$, so the wrapped layer computes the same function as the
        original one. It is stateless.
    - Spectral normalisation replaces $W$ by $W / \sigma(W)$, where
        $\sigma(W) = u^\top W v$ estimates the largest singular value of $W$ (reshaped
        to a matrix `(out, -1)`; for convolutions this is the usual proxy, not the
        operator norm of the convolution). The singular-vector estimates $u, v$ are
        *state*, advanced by `num_power_iterations` power iterations each time the
        layer is called with `inference=False`, or by [`eqxdeq.nn.reset_norm`][].

    !!! info "State for spectral normalisation"

        [`equinox.nn.SpectralNorm`][] is a stateful layer: a spectrally normalised
        model is called as `out, state = model(x, state)`. This function returns only
        the model, carrying its initial state inside, exactly like a freshly
        constructed stateful equinox layer. So build the state with equinox's usual
        tools, either

        ```python
        model, state = eqx.nn.make_with_state(eqxdeq.nn.apply_norm)(
            cell, "spectral", key=key
        )
        ```

        or `model = apply_norm(...)` followed by `state = eqx.nn.State(model)` (and
        optionally `model = eqx.nn.delete_init_state(model)`). Normalise a freshly
        built cell: `eqx.nn.State` cannot rebuild the state of other stateful layers
        (e.g. `BatchNorm`) whose initial state was already deleted by an earlier
        `make_with_state`.

    !!! tip "Inside a DEQ"

        The cell is evaluated many times per solve, and a fixed point only exists if
        it is the same function at every evaluation. So advance the power iteration
        once per training step, and solve with fixed normalised weights:

        ```python
        state = eqxdeq.nn.reset_norm(cell, state)   # power iteration(s), once
        plain_cell = eqxdeq.nn.remove_norm(cell, state)  # W/σ(W), g v/‖v‖, once
        # ... solve the fixed point of plain_cell; return `state` as an aux output.
        ```

        `remove_norm` is differentiable, and gives the same gradients as calling the
        normalised layers. (This is what torchdeq's `reset_norm` does.)

    **Arguments:**

    - `module`: any PyTree, typically an equinox module (the DEQ cell).
    - `kind`: `"weight"` or `"spectral"`.
    - `key`: a `jax.random.PRNGKey` to initialise the spectral norms' power
        iterations. Required for `kind="spectral"`, ignored otherwise. (Keyword only
        argument.)
    - `filter`: which layers to normalise: a type or tuple of types (matched with
        `isinstance`), or a predicate called on every equinox module in the tree
        that returns `True` for those to wrap. Default
        `(eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)`.
    - `weight_name`: the name of the selected layers' array to normalise.
    - `axis`: weight normalisation only: the norm is taken over every axis except
        this one (`None`: over all axes).
    - `num_power_iterations`: spectral normalisation only: power iterations per
        call in training mode (and per `reset_norm`).
    - `eps`: spectral normalisation only: guards the division by the norms of the
        power-iteration vectors.
    - `inference`: spectral normalisation only: the initial `inference` flag of the
        `SpectralNorm` layers (if `True` no power iterations happen when they are
        called). Toggle it later with [`equinox.nn.inference_mode`][].

    **Returns:**

    A copy of `module` in which each selected layer is wrapped. For
    `kind="spectral"` the new layers hold their initial state; see above.
    """
    if kind not in ("weight", "spectral"):
        raise ValueError(
            f'`apply_norm(kind=...)` must be "weight" or "spectral"; got {kind!r}.'
        )
    if axis is not None and not isinstance(axis, int):
        raise ValueError(
            f"`apply_norm(axis=...)` must be an int or None; got {axis!r}."
        )
    if kind == "spectral":
        if key is None:
            raise ValueError(
                '`apply_norm(..., "spectral")` needs a `key=` to initialise the '
                "power iterations of `equinox.nn.SpectralNorm`."
            )
        if not isinstance(num_power_iterations, int) or num_power_iterations < 0:
            raise ValueError(
                "`apply_norm(num_power_iterations=...)` must be a non-negative "
                f"integer; got {num_power_iterations!r}."
            )
    select = _selector(filter)
    leaves, treedef = jtu.tree_flatten(
        module, is_leaf=lambda x: _is_norm(x) or select(x)
    )
    targets = [i for i, x in enumerate(leaves) if not _is_norm(x) and select(x)]
    keys = jr.split(key, max(len(targets), 1)) if key is not None else None
    for j, i in enumerate(targets):
        layer = leaves[i]
        weight = getattr(layer, weight_name, None)
        if weight is None or not eqx.is_array(weight):
            raise ValueError(
                f"`apply_norm(filter=...)` selected a `{type(layer).__name__}`, which "
                f"has no array `{weight_name}` to normalise (see `weight_name=...`)."
            )
        if kind == "weight":
            leaves[i] = eqx.nn.WeightNorm(layer, weight_name, axis)
        else:
            assert keys is not None
            if jnp.ndim(weight) < 2:
                raise ValueError(
                    "Spectral normalisation needs a weight with at least two axes; "
                    f"`{type(layer).__name__}.{weight_name}` has shape "
                    f"{jnp.shape(weight)}."
                )
            leaves[i] = eqx.nn.SpectralNorm(
                layer,
                weight_name,
                num_power_iterations,
                eps,
                inference,
                key=keys[j],
            )
    return jtu.tree_unflatten(treedef, leaves)


def _norm_except_axis(v: Array, axis: int | None) -> Array:
    norm = ft.partial(jnp.linalg.norm, keepdims=True)
    if axis is None:
        return norm(v)
    return jax.vmap(norm, in_axes=axis, out_axes=axis)(v)


def _power_iteration(weight: Array, u: Array, v: Array, eps: float):
    # As in `equinox.nn.SpectralNorm`.
    u = weight @ v
    u = u / jnp.maximum(eps, jnp.sqrt(jnp.sum(u**2)))
    v = weight.T @ u
    v = v / jnp.maximum(eps, jnp.sqrt(jnp.sum(v**2)))
    return u, v


def _spectral_state_error(name: str) -> ValueError:
    return ValueError(
        f"`{name}(module, state)` needs the `equinox.nn.State` of the model's "
        "`equinox.nn.SpectralNorm` layers (see `eqxdeq.nn.apply_norm`)."
    )


def reset_norm(module: PyTree, state: eqx.nn.State) -> eqx.nn.State:
    r"""Advances the power iterations of every [`equinox.nn.SpectralNorm`][] in
    `module`, as calling each of them once in training mode would, but without
    evaluating the model.

    Each layer's singular-vector estimates $(u, v)$ take `num_power_iterations` steps
    $u \leftarrow W v / \lVert W v \rVert$, $v \leftarrow W^\top u / \lVert W^\top u
    \rVert$ (on `stop_gradient(W)`), whatever the layer's `inference` flag. Weight
    normalisation has no state and is unaffected.

    Call it once per training step (before the fixed-point solve) and solve with
    the spectral norms in inference mode, or with `remove_norm(module, state)`; see
    [`eqxdeq.nn.apply_norm`][].

    **Arguments:**

    - `module`: any PyTree, e.g. a cell returned by [`eqxdeq.nn.apply_norm`][].
    - `state`: its [`equinox.nn.State`][].

    **Returns:**

    The updated state. As for every `equinox.nn.State` update, the old `state`
    object must not be used again.
    """
    if not isinstance(state, eqx.nn.State):
        raise _spectral_state_error("reset_norm")
    for layer in jtu.tree_leaves(module, is_leaf=_is_norm):
        if isinstance(layer, eqx.nn.SpectralNorm):
            u, v = state.get(layer.uv_index)
            weight = getattr(layer.layer, layer.weight_name)
            weight = lax.stop_gradient(jnp.reshape(weight, (weight.shape[0], -1)))
            for _ in range(layer.num_power_iterations):
                u, v = _power_iteration(weight, u, v, layer.eps)
            state = state.set(layer.uv_index, (u, v))
    return state


def remove_norm(module: PyTree, state: eqx.nn.State | None = None) -> PyTree:
    r"""Folds weight and spectral normalisation back into plain layers.

    Every [`equinox.nn.WeightNorm`][] is replaced by its layer with weight
    $g \, v / \lVert v \rVert$, and every [`equinox.nn.SpectralNorm`][] by its layer
    with weight $W / \sigma(W)$, $\sigma(W) = u^\top W v$ from the current power
    iteration estimates in `state`. The result computes exactly what the normalised
    model computes in inference mode (no power iteration), with no state.

    This is differentiable in the parameters (gradients flow through $g$, $v$, $W$
    and $\sigma(W)$, not through $u, v$), so besides removing normalisation for good
    it can be used once per training step to get a plain, stateless cell whose
    normalised weights are computed once rather than at every fixed-point iteration;
    see [`eqxdeq.nn.apply_norm`][].

    **Arguments:**

    - `module`: any PyTree.
    - `state`: the [`equinox.nn.State`][] of `module`. Required if `module` contains
        spectral normalisation, unused otherwise.

    **Returns:**

    A copy of `module` without `WeightNorm` or `SpectralNorm` layers.
    """

    def fold(x):
        if isinstance(x, eqx.nn.WeightNorm):
            layer = remove_norm(x.layer, state)
            v = getattr(layer, x.weight_name)
            weight = v * x.g / _norm_except_axis(v, x.axis)
        elif isinstance(x, eqx.nn.SpectralNorm):
            spectral_state = state
            if not isinstance(spectral_state, eqx.nn.State):
                raise _spectral_state_error("remove_norm")
            layer = remove_norm(x.layer, spectral_state)
            u, v = spectral_state.get(x.uv_index)
            weight = getattr(layer, x.weight_name)
            matrix = jnp.reshape(weight, (weight.shape[0], -1))
            sigma = jnp.einsum("i,ij,j->", u, matrix, v)
            weight = weight / sigma
        else:
            return x
        return eqx.tree_at(lambda l: getattr(l, x.weight_name), layer, weight)

    return jtu.tree_map(fold, module, is_leaf=_is_norm)
