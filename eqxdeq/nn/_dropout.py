"""Variational dropout: one mask per key, optionally shared along some axes.

In a DEQ the cell $f(z, x)$ is evaluated many times per solve. Ordinary dropout with a
fresh mask at every evaluation changes $f$ from one iteration to the next, so there is
no fixed point to converge to. These layers sample their mask from the key and the
input's shape alone; called with the same key (as `eqxdeq.nn.DEQ` does, one key
per solve) they apply the same mask at every iteration, and the solve converges to
the fixed point of one (masked) function.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from equinox import AbstractVar
from jaxtyping import Array, PRNGKeyArray

from .._validation import check_real, describe


def _normalise_axes(axes: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    if isinstance(axes, int):
        return (axes,)
    return tuple(axes)


class AbstractVariationalDropout(eqx.Module):
    r"""Abstract base class for variational dropout.

    Each entry of a mask $m$ is kept with probability $1 - p$ and the kept entries are
    rescaled ("inverted dropout"),

    $$y = \frac{m \odot x}{1 - p}, \qquad m \sim \mathrm{Bernoulli}(1 - p),$$

    so that $\mathbb{E}[y] = x$. The mask has the shape returned by
    [`eqxdeq.nn.AbstractVariationalDropout.mask_shape`][]: an axis of size 1 there
    means that one mask value is shared (broadcast) along that axis of $x$.

    The mask is a deterministic function of `key` and `x.shape`. Calling the layer
    again with the same key applies the same mask, which is what a fixed-point solve
    needs. Pass a new key for every solve (every training step and every sample).

    Subclasses must provide the fields `p` and `inference`, and implement
    `mask_shape`.
    """

    p: AbstractVar[float]
    inference: AbstractVar[bool]

    def __check_init__(self):
        # A traced `p` (e.g. under `eqx.tree_at`) is not checked.
        try:
            check_real(
                type(self).__name__, "p", self.p, lower=0, upper=1, upper_open=True
            )
        except ValueError:
            raise ValueError(
                f"`{type(self).__name__}(p=...)` must be a probability in [0, 1); "
                f"got {describe(self.p)}."
            ) from None

    @abc.abstractmethod
    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the mask for an input of shape `shape`: same rank, each axis
        either the input's size or 1 (shared).

        **Arguments:**

        - `shape`: the shape of the input `x`.

        **Returns:**

        The mask's shape. Raises `ValueError` for an input this layer does not accept.
        """

    def __call__(
        self,
        x: Array,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Array:
        """**Arguments:**

        - `x`: a JAX array, of a shape accepted by this layer.
        - `key`: a `jax.random.PRNGKey` from which the mask is sampled. The same key
            gives the same mask. Required unless in inference mode. (Keyword only
            argument.)
        - `inference`: if `True` or `False`, overrides `self.inference` for this call.
            If `None` then `self.inference` is used.

        **Returns:**

        An array of the same shape and dtype as `x`: `x` itself in inference mode,
        else `x` masked and rescaled by $1/(1 - p)$.
        """
        shape = self.mask_shape(x.shape)
        if inference is None:
            inference = self.inference
        if isinstance(self.p, int | float) and self.p == 0:
            inference = True
        if inference:
            return x
        if key is None:
            raise RuntimeError(
                f"`{type(self).__name__}` needs a `key=` when not in inference mode. "
                "Pass one key per fixed-point solve (the same key at every iteration), "
                "or disable dropout with `inference=True` or "
                "`equinox.nn.inference_mode`."
            )
        q = 1 - lax.stop_gradient(self.p)
        keep = jr.bernoulli(key, q, shape)
        scale = jnp.asarray(1 / q, dtype=x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class VariationalDropout(AbstractVariationalDropout):
    r"""Variational dropout on an input of any shape, with one mask value shared
    along each of `shared_axes`.

    With `shared_axes=()` every entry has its own mask value (like
    [`equinox.nn.Dropout`][] called with a fixed key). For example for an input of
    shape `(channels, length)`, `shared_axes=1` drops whole channels and
    `shared_axes=0` drops whole positions; see also the named variants below.

    The mask's shape is `x.shape` with each shared axis set to 1.

    ??? cite "References"

        ```bibtex
        @inproceedings{gal2016theoretically,
            author = {Gal, Yarin and Ghahramani, Zoubin},
            title = {A Theoretically Grounded Application of Dropout in Recurrent
                     Neural Networks},
            booktitle = {Advances in Neural Information Processing Systems},
            year = {2016},
        }

        @inproceedings{bai2019deep,
            author = {Bai, Shaojie and Kolter, J. Zico and Koltun, Vladlen},
            title = {Deep Equilibrium Models},
            booktitle = {Advances in Neural Information Processing Systems},
            year = {2019},
        }
        ```
    """

    p: float = 0.5
    inference: bool = False
    shared_axes: tuple[int, ...] = eqx.field(
        default=(), static=True, kw_only=True, converter=_normalise_axes
    )

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ndim = len(shape)
        axes = []
        for axis in self.shared_axes:
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"`VariationalDropout(shared_axes={self.shared_axes})` is out of "
                    f"range for an input of shape {shape}."
                )
            axes.append(axis % ndim)
        if len(set(axes)) != len(axes):
            raise ValueError(
                f"`VariationalDropout(shared_axes={self.shared_axes})` names an axis "
                f"more than once for an input of shape {shape}."
            )
        return tuple(1 if i in axes else n for i, n in enumerate(shape))


VariationalDropout.__init__.__doc__ = """**Arguments:**

- `p`: the probability of zeroing each mask entry, in $[0, 1)$.
- `inference`: if `True` the layer is the identity. Toggle with
    [`equinox.nn.inference_mode`][], or override in `__call__`.
- `shared_axes`: an axis or tuple of axes (negative values count from the end) along
    which one mask value is shared. Keyword only; default `()` (no sharing).
"""


class _AbstractChannelDropout(AbstractVariationalDropout):
    """Variational dropout of whole channels (`drop_tokens = False`) or whole
    positions (`drop_tokens = True`) of a `(channels, *spatial)` input with
    `spatial_dims` spatial axes, whatever the position of its channel axis."""

    channel_axis: AbstractVar[int]
    spatial_dims: ClassVar[int]
    drop_tokens: ClassVar[bool]

    def __check_init__(self):
        ndim = self.spatial_dims + 1
        if not isinstance(self.channel_axis, int) or not (
            -ndim <= self.channel_axis < ndim
        ):
            raise ValueError(
                f"`{type(self).__name__}(channel_axis=...)` must be an integer in "
                f"[{-ndim}, {ndim}); got {self.channel_axis!r}."
            )

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ndim = self.spatial_dims + 1
        if len(shape) != ndim:
            layout = {
                1: "(channels, length)",
                2: "(channels, height, width)",
                3: "(channels, depth, height, width)",
            }[self.spatial_dims]
            raise ValueError(
                f"`{type(self).__name__}` expects an input with {ndim} axes, {layout} "
                f"for `channel_axis=0` (no batch axis: use `jax.vmap`); got shape "
                f"{shape}."
            )
        channel_axis = self.channel_axis % ndim
        if self.drop_tokens:
            # One value per position, shared over channels.
            return tuple(1 if i == channel_axis else n for i, n in enumerate(shape))
        # One value per channel, shared over positions.
        return tuple(n if i == channel_axis else 1 for i, n in enumerate(shape))


_channel_doc = """**Arguments:**

- `p`: the probability of dropping each {what}, in $[0, 1)$.
- `inference`: if `True` the layer is the identity. Toggle with
    [`equinox.nn.inference_mode`][], or override in `__call__`.
- `channel_axis`: the channel axis of the input. Keyword only; default `0`
    (channels first, as for [`equinox.nn.Conv`][]). Use `-1` for channels-last
    inputs, e.g. `(length, channels)` token sequences.
"""


class VariationalDropout1d(_AbstractChannelDropout):
    """Variational dropout of whole channels of a 1d input `(channels, length)`: one
    mask value per channel, shared over the length axis (mask shape `(channels, 1)`).
    """

    p: float = 0.5
    inference: bool = False
    channel_axis: int = eqx.field(default=0, static=True, kw_only=True)
    spatial_dims: ClassVar[int] = 1
    drop_tokens: ClassVar[bool] = False


class VariationalDropout2d(_AbstractChannelDropout):
    """Variational dropout of whole channels of a 2d input `(channels, height,
    width)`: one mask value per channel, shared over both spatial axes (mask shape
    `(channels, 1, 1)`).
    """

    p: float = 0.5
    inference: bool = False
    channel_axis: int = eqx.field(default=0, static=True, kw_only=True)
    spatial_dims: ClassVar[int] = 2
    drop_tokens: ClassVar[bool] = False


class VariationalDropout3d(_AbstractChannelDropout):
    """Variational dropout of whole channels of a 3d input `(channels, depth, height,
    width)`: one mask value per channel, shared over the three spatial axes (mask
    shape `(channels, 1, 1, 1)`).
    """

    p: float = 0.5
    inference: bool = False
    channel_axis: int = eqx.field(default=0, static=True, kw_only=True)
    spatial_dims: ClassVar[int] = 3
    drop_tokens: ClassVar[bool] = False


class VariationalDropToken1d(_AbstractChannelDropout):
    """Variational dropout of whole tokens (positions) of a 1d input `(channels,
    length)`: one mask value per position, shared over the channels (mask shape
    `(1, length)`). For a `(length, channels)` token sequence pass `channel_axis=-1`.
    """

    p: float = 0.5
    inference: bool = False
    channel_axis: int = eqx.field(default=0, static=True, kw_only=True)
    spatial_dims: ClassVar[int] = 1
    drop_tokens: ClassVar[bool] = True


class VariationalDropToken2d(_AbstractChannelDropout):
    """Variational dropout of whole spatial positions of a 2d input `(channels,
    height, width)`: one mask value per pixel, shared over the channels (mask shape
    `(1, height, width)`).
    """

    p: float = 0.5
    inference: bool = False
    channel_axis: int = eqx.field(default=0, static=True, kw_only=True)
    spatial_dims: ClassVar[int] = 2
    drop_tokens: ClassVar[bool] = True


class VariationalDropToken3d(_AbstractChannelDropout):
    """Variational dropout of whole spatial positions of a 3d input `(channels,
    depth, height, width)`: one mask value per voxel, shared over the channels (mask
    shape `(1, depth, height, width)`).
    """

    p: float = 0.5
    inference: bool = False
    channel_axis: int = eqx.field(default=0, static=True, kw_only=True)
    spatial_dims: ClassVar[int] = 3
    drop_tokens: ClassVar[bool] = True


VariationalDropout1d.__init__.__doc__ = _channel_doc.format(what="channel")
VariationalDropout2d.__init__.__doc__ = _channel_doc.format(what="channel")
VariationalDropout3d.__init__.__doc__ = _channel_doc.format(what="channel")
VariationalDropToken1d.__init__.__doc__ = _channel_doc.format(what="position")
VariationalDropToken2d.__init__.__doc__ = _channel_doc.format(what="position")
VariationalDropToken3d.__init__.__doc__ = _channel_doc.format(what="position")
