"""`eqxdeq.nn.MultiscaleCell`: the multiscale cell of MDEQ (Bai et al. 2020)."""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._dropout import VariationalDropout2d


def _relu(x):
    return jax.nn.relu(x)


def _avg_pool(x, factor):
    """Average pooling of a `(C, H, W)` array over `factor × factor` blocks."""
    if factor == 1:
        return x
    c, h, w = x.shape
    return x.reshape(c, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


class _Injection(eqx.Module):
    """The input injection of one scale: `norm(conv(avg_pool(x)))`, the group norm's
    scale starting at `injection_scale`."""

    conv: eqx.nn.Conv2d
    norm: eqx.nn.GroupNorm
    factor: int = eqx.field(static=True)

    def __init__(self, c_in, c_out, factor, groups, scale, dtype, *, key):
        self.conv = eqx.nn.Conv2d(
            c_in, c_out, 3, padding=1, use_bias=False, dtype=dtype, key=key
        )
        norm = eqx.nn.GroupNorm(groups, c_out, dtype=dtype)
        self.norm = eqx.tree_at(lambda n: n.weight, norm, scale * norm.weight)
        self.factor = factor

    def __call__(self, x):
        return self.norm(self.conv(_avg_pool(x, self.factor)))


class _Branch(eqx.Module):
    """The residual block of one scale: `relu(norm2(z + conv2(drop(relu(norm1(
    conv1(z))))) + injection))`."""

    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    dropout: VariationalDropout2d

    def __init__(self, channels, groups, dropout, dtype, *, key):
        key1, key2 = jr.split(key)
        self.conv1 = eqx.nn.Conv2d(
            channels, channels, 3, padding=1, use_bias=False, dtype=dtype, key=key1
        )
        self.norm1 = eqx.nn.GroupNorm(groups, channels, dtype=dtype)
        self.conv2 = eqx.nn.Conv2d(
            channels, channels, 3, padding=1, use_bias=False, dtype=dtype, key=key2
        )
        self.norm2 = eqx.nn.GroupNorm(groups, channels, dtype=dtype)
        self.dropout = VariationalDropout2d(dropout)

    def __call__(self, z, injection, key):
        h = _relu(self.norm1(self.conv1(z)))
        h = self.conv2(self.dropout(h, key=key))
        return _relu(self.norm2(z + h + injection))


class _Downsample(eqx.Module):
    """From scale j to a coarser scale i > j: i - j strided 3×3 convolutions, each
    followed by a group norm (and a ReLU between them), the last one changing the
    channels."""

    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[eqx.nn.GroupNorm, ...]

    def __init__(self, c_in, c_out, steps, groups, dtype, *, key):
        keys = jr.split(key, steps)
        widths = [c_in] * steps + [c_out]
        self.convs = tuple(
            eqx.nn.Conv2d(
                widths[k],
                widths[k + 1],
                3,
                stride=2,
                padding=1,
                use_bias=False,
                dtype=dtype,
                key=keys[k],
            )
            for k in range(steps)
        )
        self.norms = tuple(
            eqx.nn.GroupNorm(groups, widths[k + 1], dtype=dtype) for k in range(steps)
        )

    def __call__(self, x):
        for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x))
            if k < len(self.convs) - 1:
                x = _relu(x)
        return x


class _Upsample(eqx.Module):
    """From scale j to a finer scale i < j: a 1×1 convolution changing the channels,
    a group norm, then nearest-neighbour upsampling by 2^(j - i)."""

    conv: eqx.nn.Conv2d
    norm: eqx.nn.GroupNorm
    factor: int = eqx.field(static=True)

    def __init__(self, c_in, c_out, factor, groups, dtype, *, key):
        self.conv = eqx.nn.Conv2d(c_in, c_out, 1, use_bias=False, dtype=dtype, key=key)
        self.norm = eqx.nn.GroupNorm(groups, c_out, dtype=dtype)
        self.factor = factor

    def __call__(self, x):
        x = self.norm(self.conv(x))
        return jnp.repeat(jnp.repeat(x, self.factor, axis=1), self.factor, axis=2)


class MultiscaleCell(eqx.Module):
    r"""The multiscale cell of **MDEQ** (Bai et al. 2020): a DEQ whose state is a
    tuple of feature maps at several resolutions, all driven to equilibrium at once.

    The state is $z = (z_0, \ldots, z_{n-1})$ with $z_i$ of shape
    $(C_i, H/2^i, W/2^i)$ (channels first, one sample, as for
    [`equinox.nn.Conv2d`][]); the input $x$ has shape $(C_\mathrm{in}, H, W)$. One
    evaluation of the cell is

    1. **injection** at every scale,
        $u_i = \operatorname{GN}(\operatorname{conv}(\operatorname{pool}_{2^i} x))$,
        with $\operatorname{pool}_{2^i}$ the average over $2^i \times 2^i$ blocks;
    2. **branches**, a residual block per scale,
        $b_i = \operatorname{relu}\bigl(\operatorname{GN}(z_i + \operatorname{conv}
        (\operatorname{relu}(\operatorname{GN}(\operatorname{conv}(z_i)))) + u_i)
        \bigr)$;
    3. **fusion**, every output scale summing all branches,
        $f_i(z) = \operatorname{GN}\bigl(\operatorname{relu}(\sum_j T_{ij} b_j)\bigr)$,
        with $T_{ii} = \mathrm{id}$; for $j < i$, $T_{ij}$ is $i - j$ strided
        $3\times3$ convolutions, each followed by a group norm (ReLU between them);
        for $j > i$, a $1\times1$ convolution and a group norm, then
        nearest-neighbour upsampling by $2^{j-i}$.

    Convolutions are $3\times3$ with padding 1 unless stated; those followed by a
    group norm have no bias. GN is [`equinox.nn.GroupNorm`][] with `groups` groups.

    **Contractivity.** Every group norm makes its output independent of the scale
    of its input, so scaling weights down barely changes the cell's contraction
    (scaling the second convolution of each branch by 0.25 to 1 did not); what
    does is the share of the injection $u_i$ in each branch. MDEQ injects $x$ at the
    finest scale only; this cell injects a pooled copy at every scale, and starts
    the scale of the injections' group norms at `injection_scale`. Measured on
    freshly initialised cells (2 and 3 scales, 4–16 channels, 8×8 and 16×16 inputs of
    standard deviation 0.1 to 10), the spectral radius of the Jacobian at the fixed
    point is 0.39–0.55 with the default `injection_scale=4` (0.70–0.85 with 2, and
    0.81–1.02 with 1), and [`eqxdeq.Anderson`][] reaches a residual of $10^{-8}$ in
    16–21 steps. With injection at scale 0 only, the coarser branches are normalised
    functions of the state alone, and the spectral radius measured 0.95–1.2 over
    the variants tried (Anderson mostly did not converge in 200 steps). Training
    can make the cell less contractive: monitor `stats`, and consider a Jacobian
    penalty such as [`eqxdeq.regularization.jacobian_frobenius`][].

    Use it with [`eqxdeq.nn.DEQ`][], whose `latent` is `cell.latent(H, W)`:

    ```python
    cell = eqxdeq.nn.MultiscaleCell(3, channels=(16, 32), key=key)
    deq = eqxdeq.nn.DEQ(cell, cell.latent(32, 32), eqxdeq.Anderson(1e-4, 1e-4))
    (z0, z1), stats = deq(image, key=key)  # image: (3, 32, 32)
    ```

    The injections are recomputed at every evaluation of the cell (a few
    convolutions of the input). For a wide input, map it to fewer channels once,
    outside the DEQ (MDEQ's stem).

    A nonzero `dropout` applies [`eqxdeq.nn.VariationalDropout2d`][] inside every
    branch, one mask per key (the DEQ passes one key per solve): pass `key=` to the
    DEQ when training, and disable it with [`equinox.nn.inference_mode`][].

    ??? cite "References"

        ```bibtex
        @inproceedings{bai2020multiscale,
            title={Multiscale Deep Equilibrium Models},
            author={Bai, Shaojie and Koltun, Vladlen and Kolter, J. Zico},
            booktitle={Advances in Neural Information Processing Systems},
            year={2020}
        }
        ```
    """

    injections: tuple[_Injection, ...]
    branches: tuple[_Branch, ...]
    fuse: tuple[tuple[_Downsample | _Upsample | None, ...], ...]
    norms: tuple[eqx.nn.GroupNorm, ...]
    in_channels: int = eqx.field(static=True)
    channels: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (16, 32),
        *,
        groups: int = 4,
        dropout: float = 0.0,
        injection_scale: float = 4.0,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`: the channels $C_\\mathrm{in}$ of the input `x`.
        - `channels`: the channels $(C_0, \\ldots, C_{n-1})$ of the state at each
            scale, finest first; its length is the number of scales $n$.
        - `groups`: the number of groups of every [`equinox.nn.GroupNorm`][]; must
            divide every entry of `channels`.
        - `dropout`: the drop probability of the variational dropout in each branch
            (0 disables it).
        - `injection_scale`: the initial scale (affine weight) of the injections'
            group norms: larger is more contractive at initialisation.
        - `dtype`: the parameters' dtype (default: JAX's default float).
        - `key`: a `jax.random.PRNGKey` for the initial parameters. (Keyword only.)
        """
        channels = tuple(channels)
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(
                "`MultiscaleCell(in_channels=...)` must be a positive int."
            )
        if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(
                "`MultiscaleCell(channels=...)` must be a non-empty sequence of "
                f"positive ints, got {channels!r}."
            )
        if (
            not isinstance(groups, int)
            or groups < 1
            or any(c % groups for c in channels)
        ):
            raise ValueError(
                f"`MultiscaleCell(groups={groups!r})` must be a positive int dividing "
                f"every entry of `channels={channels}`."
            )
        n = len(channels)
        ikey, bkey, fkey = jr.split(key, 3)
        self.injections = tuple(
            _Injection(in_channels, c, 2**i, groups, injection_scale, dtype, key=k)
            for i, (c, k) in enumerate(zip(channels, jr.split(ikey, n)))
        )
        self.branches = tuple(
            _Branch(c, groups, dropout, dtype, key=k)
            for c, k in zip(channels, jr.split(bkey, n))
        )
        fkeys = jr.split(fkey, n * n)
        fuse = []
        for i in range(n):
            row = []
            for j in range(n):
                if j < i:
                    layer = _Downsample(
                        channels[j],
                        channels[i],
                        i - j,
                        groups,
                        dtype,
                        key=fkeys[i * n + j],
                    )
                elif j > i:
                    layer = _Upsample(
                        channels[j],
                        channels[i],
                        2 ** (j - i),
                        groups,
                        dtype,
                        key=fkeys[i * n + j],
                    )
                else:
                    layer = None
                row.append(layer)
            fuse.append(tuple(row))
        self.fuse = tuple(fuse)
        self.norms = tuple(eqx.nn.GroupNorm(groups, c, dtype=dtype) for c in channels)
        self.in_channels = in_channels
        self.channels = channels

    @property
    def num_scales(self) -> int:
        """The number of resolutions $n$ of the state."""
        return len(self.channels)

    def latent(
        self, height: int, width: int, dtype=None
    ) -> tuple[jax.ShapeDtypeStruct, ...]:
        """The state's structure for an input of spatial size `(height, width)`: pass
        it as `eqxdeq.nn.DEQ(cell, cell.latent(height, width), ...)`.

        **Arguments:**

        - `height`, `width`: the input's spatial size; both must be multiples of
            $2^{n-1}$.
        - `dtype`: the state's dtype; default the dtype of the cell's parameters.

        **Returns:**

        A tuple of $n$ `jax.ShapeDtypeStruct`s, the $i$-th of shape
        $(C_i, H/2^i, W/2^i)$.
        """
        self._check_size(height, width, "MultiscaleCell.latent")
        if dtype is None:
            dtype = self.injections[0].conv.weight.dtype
        return tuple(
            jax.ShapeDtypeStruct((c, height // 2**i, width // 2**i), dtype)
            for i, c in enumerate(self.channels)
        )

    def _check_size(self, height, width, where):
        factor = 2 ** (self.num_scales - 1)
        if height < 1 or width < 1 or height % factor or width % factor:
            raise ValueError(
                f"`{where}`: with {self.num_scales} scales the spatial size must be "
                f"positive multiples of {factor}, got {(height, width)}."
            )

    def __call__(
        self,
        z: tuple[Float[Array, "_ _ _"], ...],
        x: Float[Array, "_ _ _"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "_ _ _"], ...]:
        """**Arguments:**

        - `z`: the state, a tuple of $n$ arrays of shapes $(C_i, H/2^i, W/2^i)$
            (see `latent`).
        - `x`: the input, of shape $(C_\\mathrm{in}, H, W)$.
        - `key`: the key of the variational dropout (the same at every iteration of a
            solve); unused without dropout. (Keyword only.)

        **Returns:**

        The new state, of the structure of `z`.
        """
        if not isinstance(z, tuple) or len(z) != self.num_scales:
            raise ValueError(
                f"`MultiscaleCell`: the state must be a tuple of {self.num_scales} "
                "feature maps (see `MultiscaleCell.latent`)."
            )
        if x.ndim != 3 or x.shape[0] != self.in_channels:
            raise ValueError(
                "`MultiscaleCell`: the input must have shape "
                f"({self.in_channels}, height, width), got {x.shape}."
            )
        self._check_size(x.shape[1], x.shape[2], "MultiscaleCell")
        n = self.num_scales
        keys = [None] * n if key is None else list(jr.split(key, n))
        branches = [
            branch(zi, injection(x), k)
            for branch, injection, zi, k in zip(self.branches, self.injections, z, keys)
        ]
        out = []
        for row, norm in zip(self.fuse, self.norms):
            terms = [
                b if layer is None else layer(b) for layer, b in zip(row, branches)
            ]
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            out.append(norm(_relu(total)))
        return tuple(out)
