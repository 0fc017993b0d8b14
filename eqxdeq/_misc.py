"""Small pytree helpers shared by the solvers and adjoints.

This is the only module that imports `equinox.internal` (which has no stability
promise); everything else imports `ω` from here.
"""

import functools as ft

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox.internal import ω as ω
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, Bool, PyTree, Scalar


while_loop = eqxi.while_loop


def is_complex(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.complexfloating)


def real_dtype(dtype) -> jnp.dtype:
    """The real dtype of the same precision: `float64` for `complex128`; a real
    dtype is returned as it is."""
    return jnp.finfo(dtype).dtype


def complex_dtype(dtype) -> jnp.dtype:
    """The complex dtype with (at least) the precision of the real `dtype`:
    `complex64` for 16- and 32-bit floats, `complex128` for `float64`."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(dtype, jnp.complex64)


def stats_dtype(tree: PyTree) -> jnp.dtype:
    """The real floating dtype that statistics of `tree` (norms, residuals, step
    sizes) are accumulated in: the precision of its widest floating leaf, and at
    least float32, so that bfloat16 iterates do not get bfloat16 residuals. Always
    real: the statistics of a `complex128` state are `float64`.
    """
    dtypes = [jnp.result_type(x) for x in jtu.tree_leaves(tree)]
    with jax.numpy_dtype_promotion("standard"):
        return real_dtype(jnp.result_type(jnp.float32, *dtypes))


def field_dtype(tree: PyTree, dtype) -> jnp.dtype:
    """The dtype of the scalars (inner products, mixing coefficients, linear solves)
    of the vector space that `tree` lives in, with the precision of the real
    `dtype`: complex when every floating leaf of `tree` is complex (the space is
    ℂⁿ), else `dtype`. A pytree that mixes real and complex leaves is only a real
    vector space (ℂⁿ ≅ ℝ²ⁿ): its inner product is Re⟨x, y⟩ and its linear solves run on
    the real and imaginary parts (`to_view`)."""
    leaves = [jnp.result_type(x) for x in jtu.tree_leaves(tree)]
    leaves = [d for d in leaves if jnp.issubdtype(d, jnp.inexact)]
    if leaves and all(is_complex(d) for d in leaves):
        return complex_dtype(dtype)
    return dtype


def _leaf_inner(a: Array, b: Array, dtype) -> Scalar:
    if is_complex(dtype) or not (is_complex(a.dtype) or is_complex(b.dtype)):
        # (`vdot` conjugates its first argument.)
        return jnp.vdot(a.astype(dtype).reshape(-1), b.astype(dtype).reshape(-1))
    # A real `dtype` with complex leaves: the real inner product Re<a, b>.
    c = complex_dtype(dtype)
    dot = jnp.vdot(a.astype(c).reshape(-1), b.astype(c).reshape(-1))
    return jnp.real(dot).astype(dtype)


def tree_inner(x: PyTree[Array], y: PyTree[Array], dtype) -> Scalar:
    """`Σ_leaves <x, y>`, accumulated in `dtype` (leaves may have mixed dtypes).

    The inner product conjugates its first argument, ⟨x, y⟩ = Σ conj(x_i) y_i.
    With a real `dtype` and complex leaves it is the real inner product Re⟨x, y⟩
    (so `tree_inner(x, x, real dtype)` is ‖x‖₂² for any `x`).
    """
    dots = [
        _leaf_inner(a, b, dtype)
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y), strict=True)
    ]
    return ft.reduce(jnp.add, dots, jnp.zeros((), dtype))


def two_norm(x: PyTree[Array], dtype) -> Scalar:
    """Euclidean norm of a pytree (of $|x_i|$ for complex leaves), accumulated in
    the real dtype of `dtype`.

    Its derivative at `x = 0` is 0, not the NaN of `sqrt`'s (∞ · 0): jax < 0.7
    differentiates loop carries that the output does not depend on, so an unused
    ‖g‖ of an exact fixed point (e.g. `y0` already one) turned the whole gradient
    into NaN under backpropagation through the iterations."""
    squared = tree_inner(x, x, real_dtype(dtype))
    zero = squared == 0  # (not `squared > 0`: a NaN norm stays NaN)
    return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, squared)))


def max_norm(x: PyTree[Array], dtype) -> Scalar:
    """`max_leaves max |x|`, in the real dtype of `dtype` (leaves may have mixed
    dtypes)."""
    dtype = real_dtype(dtype)
    maxima = [jnp.max(jnp.abs(a)).astype(dtype) for a in jtu.tree_leaves(x)]
    return ft.reduce(jnp.maximum, maxima, jnp.zeros((), dtype))


def batched_inner(xs: PyTree[Array], y: PyTree[Array], dtype) -> Array:
    """For `xs` with a leading axis of length `m` on every leaf, returns the vector
    `[<xs[i], y> for i in range(m)]`, accumulated in `dtype`: conjugating `xs[i]`,
    and the real part Re⟨xs[i], y⟩ when `dtype` is real
    and the leaves complex (as `tree_inner`)."""

    def leaf(a, b):
        if is_complex(dtype):
            a, b = jnp.conj(a.astype(dtype)), b.astype(dtype)
            return jnp.einsum("i...,...->i", a, b)
        if is_complex(a.dtype) or is_complex(b.dtype):
            c = complex_dtype(dtype)
            a, b = jnp.conj(a.astype(c)), b.astype(c)
            return jnp.real(jnp.einsum("i...,...->i", a, b)).astype(dtype)
        out = jnp.einsum("i...,...->i", a, b, preferred_element_type=dtype)
        return out.astype(dtype)

    leaves = zip(jtu.tree_leaves(xs), jtu.tree_leaves(y), strict=True)
    out = [leaf(a, b) for a, b in leaves]
    return ft.reduce(jnp.add, out)


def batched_combine(coeffs: Array, xs: PyTree[Array]) -> PyTree[Array]:
    """`Σ_i coeffs[i] * xs[i]` for `xs` with a leading axis on every leaf."""

    # In the coefficients' precision (at least float32), so that bfloat16 buffers
    # are mixed accurately; complex leaves in the complex dtype of that precision.
    # (Complex coefficients arise only when every leaf is complex, see
    # `field_dtype`; for a real leaf their real part is taken.)
    def leaf(a):
        c = coeffs
        if is_complex(a.dtype) and not is_complex(c.dtype):
            c = c.astype(complex_dtype(c.dtype))
        out = jnp.tensordot(c, a.astype(c.dtype), axes=1)
        if is_complex(out.dtype) and not is_complex(a.dtype):
            out = jnp.real(out)
        return out.astype(a.dtype)

    return jtu.tree_map(leaf, xs)


def tree_where(pred: Bool[Array, ""], true: PyTree, false: PyTree) -> PyTree:
    return jtu.tree_map(lambda t, f: jnp.where(pred, t, f), true, false)


def tree_scale(scale: Scalar, x: PyTree[Array]) -> PyTree[Array]:
    """`scale * x`, with `scale` cast to each leaf's dtype (no dtype promotion). A
    complex `scale` arises only for all-complex `x` (`field_dtype`); for a real leaf
    its real part is taken."""

    def leaf(a):
        s = scale
        if is_complex(s.dtype) and not is_complex(a.dtype):
            s = jnp.real(s)
        return s.astype(a.dtype) * a

    return jtu.tree_map(leaf, x)


def tree_cast(x: PyTree[Array], dtype) -> PyTree[Array]:
    """Every leaf cast to `dtype`."""
    return jtu.tree_map(lambda a: a.astype(dtype), x)


def tree_cast_like(x: PyTree[Array], like: PyTree) -> PyTree[Array]:
    """Every leaf cast to the dtype of the matching leaf of `like` (arrays or
    `jax.ShapeDtypeStruct`s)."""
    return jtu.tree_map(lambda a, b: a.astype(b.dtype), x, like)


def split_complex(x: PyTree[Array]) -> PyTree[Array]:
    """Every complex leaf replaced by the pair `(real, imag)` of real arrays (the
    identity on a real pytree)."""
    return jtu.tree_map(
        lambda a: (jnp.real(a), jnp.imag(a)) if is_complex(a.dtype) else a, x
    )


def to_view(x: PyTree[Array], dtype) -> PyTree[Array]:
    """`x` as a pytree of one dtype, for a linear solve or an ODE (lineax and diffrax
    need one dtype across a pytree). A complex `dtype` casts every leaf; a real one
    first splits every complex leaf into its real and imaginary parts
    (`split_complex`), so that a pytree that mixes real and complex leaves is solved
    as the real vector space it is. For a real pytree this is `tree_cast`."""
    if not is_complex(dtype):
        x = split_complex(x)
    return tree_cast(x, dtype)


def merge_complex(v: PyTree, like: PyTree) -> PyTree[Array]:
    """The inverse of `split_complex`: each `(real, imag)` pair of `v` at a complex
    leaf of `like` becomes one complex array (in the precision of the pair); other
    leaves are left as they are (the identity on a real pytree)."""

    def leaf(l, a):
        del l
        return lax.complex(*a) if isinstance(a, tuple) else a

    return jtu.tree_map(leaf, like, v)


def from_view(v: PyTree[Array], like: PyTree) -> PyTree[Array]:
    """The inverse of `to_view`: leaves in the dtypes of `like` (arrays or
    `jax.ShapeDtypeStruct`s), complex leaves reassembled from `(real, imag)`
    pairs. For a real pytree this is `tree_cast_like`."""

    def leaf(a, l):
        if is_complex(a.dtype) and not is_complex(l.dtype):
            a = jnp.real(a)  # (only for a complex view of a real leaf)
        return a.astype(l.dtype)

    return jtu.tree_map(leaf, merge_complex(v, like), like)


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
