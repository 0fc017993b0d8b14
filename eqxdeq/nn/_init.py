"""Initial states of a DEQ solve: PyTree helpers and the policies `DEQ` takes."""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from .._validation import check_real, describe


def _leaf_like(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    return jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf))


def zeros_like(tree: PyTree) -> PyTree[Array]:
    """A pytree of zeros with the structure, shapes and dtypes of `tree`.

    **Arguments:**

    - `tree`: a pytree of arrays or `jax.ShapeDtypeStruct`s.

    **Returns:**

    The same pytree with every leaf replaced by zeros.
    """
    return jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), _struct(tree))


def half_normal_like(key: PRNGKeyArray, tree: PyTree, scale: float = 1.0):
    r"""A random pytree with about half its entries zero and the rest i.i.d.
    $\mathcal{N}(0, \texttt{scale}^2)$, with the structure of `tree`: torchdeq's
    `mixed_init` (Anil et al. 2022, for path independence) and banax's
    `half_normal_like`.

    **Arguments:**

    - `key`: a JAX PRNG key; each leaf gets its own sub-key.
    - `tree`: a pytree of inexact arrays or `jax.ShapeDtypeStruct`s.
    - `scale`: the standard deviation of the nonzero entries.

    **Returns:**

    The same pytree with every leaf replaced by such samples, in its dtype.
    """
    structs, treedef = jtu.tree_flatten(_struct(tree))
    keys = jr.split(key, max(len(structs), 1))

    def sample(k, s):
        mask_key, normal_key = jr.split(k)
        keep = jr.bernoulli(mask_key, 0.5, s.shape)
        value = scale * jr.normal(normal_key, s.shape, jnp.float32)
        return jnp.where(keep, value, 0.0).astype(s.dtype)

    return jtu.tree_unflatten(treedef, [sample(k, s) for k, s in zip(keys, structs)])


def _struct(tree):
    return jtu.tree_map(_leaf_like, tree)


def _matches(tree, struct) -> bool:
    """Whether `tree` has the structure, shapes and dtypes of `struct` (ignoring weak
    types: `jnp.full(shape, 0.5)` is a valid float64 state)."""
    strip = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype)
    got = jtu.tree_map(strip, jax.eval_shape(lambda: tree))
    return eqx.tree_equal(got, jtu.tree_map(strip, struct)) is True


def _cast_like(tree, struct):
    """`tree` with the (strong) dtypes of `struct`, as `optx.fixed_point` needs."""
    return jtu.tree_map(lambda a, s: jnp.asarray(a).astype(s.dtype), tree, struct)


class AbstractInit(eqx.Module):
    """How a [`eqxdeq.nn.DEQ`][] picks its initial state $z_0$ from the input.

    Subclasses implement `__call__(x, struct, *, key) -> z0` where `struct` is the
    state's structure (a pytree of `jax.ShapeDtypeStruct`s).
    """

    @abc.abstractmethod
    def __call__(self, x, struct, *, key: PRNGKeyArray | None) -> PyTree[Array]:
        """The initial state for input `x`."""


class Zeros(AbstractInit):
    """$z_0 = 0$: the default, and what optimistix's examples use."""

    def __call__(self, x, struct, *, key=None):
        del x, key
        return zeros_like(struct)


class HalfNormal(AbstractInit):
    r"""A random $z_0$ with about half its entries zero and the rest
    $\mathcal{N}(0, \texttt{scale}^2)$ ([`eqxdeq.nn.half_normal_like`][]; torchdeq's
    `mixed_init`); needs a key at every call."""

    scale: float = 1.0

    def __check_init__(self):
        check_real("HalfNormal", "scale", self.scale, lower=0)

    def __call__(self, x, struct, *, key=None):
        del x
        if key is None:
            raise ValueError(
                "`eqxdeq.nn.HalfNormal()` draws a random initial state, so the DEQ "
                "must be called with `key=...`."
            )
        return half_normal_like(key, struct, self.scale)


HalfNormal.__init__.__doc__ = """**Arguments:**

- `scale`: the standard deviation of the underlying normal distribution.
"""


class Predictor(AbstractInit):
    r"""A learned explicit initial state $z_0 = g(x)$ (**SkipDEQ**, Pal et al. 2022,
    from DeepEquilibriumNetworks.jl): a cheap network predicts the fixed point and the
    solver only refines it.

    Trained with the DEQ: the solve's implicit gradient does not reach $g$ (the fixed
    point does not depend on where the solve starts), so train $g$ with the
    regularising loss $\lVert g(x) - \operatorname{sg}(z^\star)\rVert^2 / n$ that
    [`eqxdeq.nn.DEQStats`][]`.init_loss` carries (add `stats.init_loss` times a weight
    to the training loss).
    """

    predictor: Callable

    def __check_init__(self):
        if not callable(self.predictor):
            raise ValueError(
                "`Predictor(predictor=...)` must be callable as `predictor(x)` (e.g. "
                f"an equinox module), got {describe(self.predictor)}."
            )

    def __call__(self, x, struct, *, key=None):
        del key
        z0 = self.predictor(x)
        if not _matches(z0, struct):
            raise ValueError(
                "`eqxdeq.nn.Predictor(predictor)`: `predictor(x)` must return the "
                f"DEQ's state structure {struct}, but returned "
                f"{jax.eval_shape(lambda: z0)}."
            )
        return _cast_like(z0, struct)


Predictor.__init__.__doc__ = """**Arguments:**

- `predictor`: a callable (usually an equinox module) mapping the DEQ's input `x` to a
    state of the DEQ's state structure.
"""
