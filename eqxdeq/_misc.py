"""Small pytree helpers shared by the solvers and adjoints.

This is the only module that imports `equinox.internal` (which has no stability
promise); everything else imports `ω` from here.
"""

import functools as ft

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox.internal import ω as ω
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, Bool, PyTree, Scalar


while_loop = eqxi.while_loop


def stats_dtype(tree: PyTree) -> jnp.dtype:
    """The floating dtype that statistics of `tree` (norms, inner products) are
    accumulated in: the widest floating dtype of its leaves, and at least float32, so
    that bfloat16 iterates do not get bfloat16 residuals.
    """
    dtypes = [jnp.result_type(x) for x in jtu.tree_leaves(tree)]
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(jnp.float32, *dtypes)


def tree_inner(x: PyTree[Array], y: PyTree[Array], dtype) -> Scalar:
    """`Σ_leaves <x, y>`, accumulated in `dtype` (leaves may have mixed dtypes)."""
    dots = [
        jnp.vdot(a.astype(dtype).reshape(-1), b.astype(dtype).reshape(-1))
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y), strict=True)
    ]
    return ft.reduce(jnp.add, dots, jnp.zeros((), dtype))


def two_norm(x: PyTree[Array], dtype) -> Scalar:
    """Euclidean norm of a pytree, accumulated in `dtype`."""
    return jnp.sqrt(tree_inner(x, x, dtype))


def max_norm(x: PyTree[Array], dtype) -> Scalar:
    """`max_leaves max |x|`, in `dtype` (leaves may have mixed dtypes)."""
    maxima = [jnp.max(jnp.abs(a)).astype(dtype) for a in jtu.tree_leaves(x)]
    return ft.reduce(jnp.maximum, maxima, jnp.zeros((), dtype))


def batched_inner(xs: PyTree[Array], y: PyTree[Array], dtype) -> Array:
    """For `xs` with a leading axis of length `m` on every leaf, returns the vector
    `[<xs[i], y> for i in range(m)]`, accumulated in `dtype`."""
    out = [
        jnp.einsum("i...,...->i", a, b, preferred_element_type=dtype).astype(dtype)
        for a, b in zip(jtu.tree_leaves(xs), jtu.tree_leaves(y), strict=True)
    ]
    return ft.reduce(jnp.add, out)


def batched_combine(coeffs: Array, xs: PyTree[Array]) -> PyTree[Array]:
    """`Σ_i coeffs[i] * xs[i]` for `xs` with a leading axis on every leaf."""
    # In the coefficients' dtype (at least float32), so that bfloat16 buffers are
    # mixed accurately.
    return jtu.tree_map(
        lambda a: jnp.tensordot(coeffs, a.astype(coeffs.dtype), axes=1).astype(a.dtype),
        xs,
    )


def tree_where(pred: Bool[Array, ""], true: PyTree, false: PyTree) -> PyTree:
    return jtu.tree_map(lambda t, f: jnp.where(pred, t, f), true, false)


def tree_scale(scale: Scalar, x: PyTree[Array]) -> PyTree[Array]:
    """`scale * x`, with `scale` cast to each leaf's dtype (no dtype promotion)."""
    return jtu.tree_map(lambda a: scale.astype(a.dtype) * a, x)


def tree_cast(x: PyTree[Array], dtype) -> PyTree[Array]:
    """Every leaf cast to `dtype`."""
    return jtu.tree_map(lambda a: a.astype(dtype), x)


def tree_cast_like(x: PyTree[Array], like: PyTree) -> PyTree[Array]:
    """Every leaf cast to the dtype of the matching leaf of `like` (arrays or
    `jax.ShapeDtypeStruct`s)."""
    return jtu.tree_map(lambda a, b: a.astype(b.dtype), x, like)


def tree_allfinite(x: PyTree[Array]) -> Bool[Array, ""]:
    leaves = [jnp.all(jnp.isfinite(a)) for a in jtu.tree_leaves(x)]
    return ft.reduce(jnp.logical_and, leaves, jnp.array(True))


def tree_zeros_like_struct(struct: PyTree) -> PyTree[Array]:
    return jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), struct)


def history_buffer(y: PyTree[Array], size: int) -> PyTree[Array]:
    """Zeros of shape `(size, *leaf.shape)` for every leaf of `y`."""
    return jtu.tree_map(lambda a: jnp.zeros((size,) + a.shape, a.dtype), y)


def buffer_set(
    buffer: PyTree[Array],
    index: ArrayLike,
    value: PyTree[Array],
    pred: ArrayLike = True,
) -> PyTree[Array]:
    """Write `value` into row `index` of every leaf of `buffer` if `pred`. Only that
    row is touched, so inside a loop XLA updates the buffer in place."""
    return jtu.tree_map(
        lambda b, v: b.at[index].set(jnp.where(pred, v, b[index])), buffer, value
    )


def is_python_number(x) -> bool:
    """True for a concrete (non-traced) scalar, so `__check_init__` can validate
    Python values and let traced ones through."""
    if isinstance(x, (bool, int, float, np.generic)):
        return True
    if isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, Tracer):
        return x.shape == ()
    return False
