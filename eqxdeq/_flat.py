"""Pytrees as flat vectors, for the dense algebra of eqxdeq's history-based
descents (Anderson, Broyden) and of its GMRES.

A pytree is ravelled into one vector once per step (free for a single array), so
that the algebra is a handful of matrix-vector products with `(rows, size)`
buffers, updated one row at a time, in place.
"""

import math

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree, Scalar

from ._misc import complex_dtype, is_complex, real_dtype, stats_dtype


# Flat vectors. A pytree state is one vector of a single dtype: complex if every
# floating leaf is complex (the space is ℂⁿ, inner products conjugate their first
# argument), else real, with each complex leaf stored as its real and imaginary
# parts (a pytree mixing real and complex leaves is the real vector space ℝ²ⁿ ⊕ …).
# The small algebra (Gram matrices, mixing coefficients, inner products) runs in
# `small_dtype`: the vector's field at the precision of `stats_dtype` (at least
# float32, also for bfloat16 states).


def vector_dtype(tree: PyTree) -> jnp.dtype:
    dtypes = [jnp.result_type(x) for x in jtu.tree_leaves(tree)]
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*dtypes)
    inexact = [d for d in dtypes if jnp.issubdtype(d, jnp.inexact)]
    if is_complex(dtype) and not all(is_complex(d) for d in inexact):
        dtype = real_dtype(dtype)
    return dtype


def small_dtype(tree: PyTree) -> jnp.dtype:
    dtype = stats_dtype(tree)
    return complex_dtype(dtype) if is_complex(vector_dtype(tree)) else dtype


def vector_size(tree: PyTree) -> int:
    complex_as_pairs = not is_complex(vector_dtype(tree))
    size = 0
    for leaf in jtu.tree_leaves(tree):
        pairs = complex_as_pairs and is_complex(jnp.result_type(leaf))
        size += math.prod(jnp.shape(leaf)) * (2 if pairs else 1)
    return size


def ravel(tree: PyTree, dtype) -> Array:
    """The leaves of `tree` as one vector of `dtype` (a reshape for one leaf)."""
    parts = []
    for leaf in jtu.tree_leaves(tree):
        if is_complex(leaf.dtype) and not is_complex(dtype):
            parts += [jnp.real(leaf).reshape(-1), jnp.imag(leaf).reshape(-1)]
        else:
            parts.append(leaf.reshape(-1))
    parts = [part.astype(dtype) for part in parts]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def unravel(vector: Array, like: PyTree) -> PyTree:
    """The inverse of `ravel`: `vector` as a pytree shaped like `like` (arrays or
    `jax.ShapeDtypeStruct`s), in its dtypes."""
    leaves, treedef = jtu.tree_flatten(like)
    out, offset = [], 0
    for leaf in leaves:
        size = math.prod(leaf.shape)
        if is_complex(leaf.dtype) and not is_complex(vector.dtype):
            re = lax.slice(vector, (offset,), (offset + size,))
            im = lax.slice(vector, (offset + size,), (offset + 2 * size,))
            value = lax.complex(re, im)
            offset += 2 * size
        else:
            value = lax.slice(vector, (offset,), (offset + size,))
            offset += size
        out.append(value.reshape(leaf.shape).astype(leaf.dtype))
    return jtu.tree_unflatten(treedef, out)


def sq_norm(x: Array, dtype) -> Scalar:
    """`‖x‖₂²`, accumulated in the real `dtype`. (A dot product: XLA's CPU reductions
    are several times slower.)"""
    if is_complex(x.dtype):
        x = x.astype(complex_dtype(dtype))
        return jnp.real(jnp.vdot(x, x))
    x = x.astype(dtype)
    return jnp.vdot(x, x)


def all_finite(x: Array, dtype) -> Bool[Array, ""]:
    """Whether every element of `x` is finite (or, conservatively, False if `‖x‖₂²`
    overflows)."""
    return jnp.isfinite(sq_norm(x, dtype))


def inner(x: Array, y: Array, dtype) -> Scalar:
    """`⟨x, y⟩ = Σ conj(x_i) y_i`, accumulated in `dtype`."""
    return jnp.vdot(x.astype(dtype), y.astype(dtype))


def inner_rows(buffer: Array, x: Array, dtype) -> Array:
    """`[⟨buffer[i], x⟩ for i in range(m)]`, one matrix-vector product accumulated in
    `dtype` (the conjugation is moved onto the vectors, not the buffer)."""
    buffer, x = buffer.astype(dtype), x.astype(dtype)
    if is_complex(dtype):
        return jnp.conj(jnp.matmul(buffer, jnp.conj(x)))
    return jnp.matmul(buffer, x)


def combine_rows(coeffs: Array, buffer: Array) -> Array:
    """`Σ_i coeffs[i] buffer[i]`, in the dtype of `coeffs` (at least float32)."""
    return jnp.matmul(coeffs, buffer.astype(coeffs.dtype))


def set_row(buffer: Array, index, row: Array) -> Array:
    """Row `index` of `buffer` set to `row`: an in-place update inside a loop."""
    return lax.dynamic_update_index_in_dim(buffer, row.astype(buffer.dtype), index, 0)
