"""Descents for fixed-point problems: given the residual $g(y) = f(y) - y$ at an
accepted iterate, each proposes a direction $d$ so that the next trial is
$y + \\alpha d$ for the step length $\\alpha$ chosen by the search.

They are [`optimistix.AbstractDescent`][]s fed
[`optimistix.FunctionInfo.Residual`][], so they compose with any
[`optimistix.AbstractSearch`][] that accepts that (e.g. [`optimistix.LearningRate`][]
or [`eqxdeq.DerivativeFreeBacktracking`][]).
"""

from typing import Generic

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Inexact, Int, Scalar

from .._custom_types import Y
from .._misc import (
    batched_combine,
    batched_inner,
    buffer_set,
    field_dtype,
    history_buffer,
    is_complex,
    is_python_number,
    real_dtype,
    stats_dtype,
    tree_allfinite,
    tree_inner,
    tree_scale,
    tree_where,
    two_norm,
    ω,
)


_Residual = optx.FunctionInfo.Residual


def _zeros_like(struct):
    return jnp.zeros(struct.shape, struct.dtype)


class _PicardDescentState(eqx.Module, Generic[Y]):
    residual: Y


class PicardDescent(optx.AbstractDescent[Y, _Residual, _PicardDescentState]):
    r"""The fixed-point residual as direction: $d = f(y) - y$.

    With a step length $\beta$ (e.g. `optimistix.LearningRate(β)`) the update is
    $y \leftarrow (1-\beta) y + \beta f(y)$: plain fixed-point (Picard) iteration for
    $\beta = 1$, damped (relaxed) iteration for $\beta < 1$.
    """

    def init(self, y: Y, f_info_struct: _Residual) -> _PicardDescentState:
        return _PicardDescentState(jtu.tree_map(_zeros_like, f_info_struct.residual))

    def query(
        self, y: Y, f_info: _Residual, state: _PicardDescentState
    ) -> _PicardDescentState:
        del y, state
        return _PicardDescentState(f_info.residual)

    def step(
        self, step_size: Scalar, state: _PicardDescentState
    ) -> tuple[Y, optx.RESULTS]:
        return tree_scale(step_size, state.residual), optx.RESULTS.successful


class _AndersonDescentState(eqx.Module, Generic[Y]):
    first: Bool[Array, ""]
    y_prev: Y
    g_prev: Y
    g_norm_prev: Scalar
    dy: Y  # (memory, ...) differences of iterates
    dg: Y  # (memory, ...) differences of residuals
    gram: Inexact[Array, "memory memory"]  # dgᴴ dg, maintained one row per step
    count: Int[Array, ""]  # number of valid history slots: slots [0, count)
    index: Int[Array, ""]  # the slot written next
    direction: Y
    num_restarts: Int[Array, ""]


class AndersonDescent(optx.AbstractDescent[Y, _Residual, _AndersonDescentState]):
    r"""Anderson mixing (type II, in difference form) as a direction.

    With the last $m$ differences of iterates $\Delta Y$ and of residuals
    $\Delta G$ (residual $g = f(y) - y$), solve the small regularised least-squares
    problem

    $$\gamma = \operatorname{argmin}_\gamma \|g - \Delta G\,\gamma\|_2^2
      + \lambda \|\gamma\|_2^2, \qquad
      \lambda = \texttt{regularisation} \cdot \operatorname{tr}(\Delta G^\top
      \Delta G) / m,$$

    and propose $d = \beta g - (\Delta Y + \beta \Delta G)\gamma$, so that a unit step
    gives the usual mixed update $\bar y + \beta \bar g$. The ridge $\lambda$ is
    relative to the Gram matrix, so it behaves the same at any residual scale and in
    float32. The Gram matrix is updated by one row per step and is accumulated in at
    least float32 (also for bfloat16 iterates).

    Safeguard: the history is cleared (a restart, i.e. one damped Picard step) when the
    residual grows by more than `restart_factor` over one step, or when the mixing
    coefficients are not finite.

    For a complex state $\Delta G^\top$ is the conjugate transpose $\Delta G^H$:
    the Gram matrix is Hermitian and the coefficients $\gamma$ complex. (A pytree
    mixing real and complex leaves is a real vector space: there the Gram matrix is
    $\operatorname{Re}(\Delta G^H \Delta G)$ and $\gamma$ is real.)

    ??? cite "References"

        ```bibtex
        @article{walker2011anderson,
            author = {Walker, Homer F. and Ni, Peng},
            title = {Anderson Acceleration for Fixed-Point Iterations},
            journal = {SIAM Journal on Numerical Analysis},
            volume = {49},
            number = {4},
            pages = {1715--1735},
            year = {2011},
        }
        ```
    """

    memory: int = 5
    relaxation: float = 1.0
    regularisation: float = 1e-8
    restart_factor: float | None = 1e2

    def __check_init__(self):
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError("`AndersonDescent(memory=...)` must be an int >= 1.")
        if is_python_number(self.relaxation) and not 0 < self.relaxation <= 1:
            raise ValueError("`AndersonDescent(relaxation=...)` must be in (0, 1].")
        if is_python_number(self.regularisation) and not self.regularisation >= 0:
            raise ValueError(
                "`AndersonDescent(regularisation=...)` must be non-negative."
            )
        if self.restart_factor is not None and not self.restart_factor > 1:
            raise ValueError(
                "`AndersonDescent(restart_factor=...)` must be > 1 or `None`."
            )

    def init(self, y: Y, f_info_struct: _Residual) -> _AndersonDescentState:
        dtype = stats_dtype(y)
        zeros = (ω(y) * 0).ω
        return _AndersonDescentState(
            first=jnp.array(True),
            y_prev=zeros,
            g_prev=zeros,
            g_norm_prev=jnp.array(jnp.inf, dtype),
            dy=history_buffer(y, self.memory),
            dg=history_buffer(y, self.memory),
            gram=jnp.zeros((self.memory, self.memory), field_dtype(y, dtype)),
            count=jnp.array(0),
            index=jnp.array(0),
            direction=zeros,
            num_restarts=jnp.array(0),
        )

    def query(
        self, y: Y, f_info: _Residual, state: _AndersonDescentState
    ) -> _AndersonDescentState:
        m = self.memory
        g = f_info.residual
        dtype = stats_dtype(y)
        inner_dtype = field_dtype(y, dtype)
        g_norm = two_norm(g, dtype)
        has_prev = jnp.invert(state.first)

        # Push (Δy, Δg) into slot `index`, updating one row/column of the Gram matrix
        # G_ij = <Δg_i, Δg_j> (Hermitian for complex states: row = conj(column)).
        slot = state.index
        dy = buffer_set(state.dy, slot, (y**ω - state.y_prev**ω).ω, has_prev)
        dg_new = (g**ω - state.g_prev**ω).ω
        dg = buffer_set(state.dg, slot, dg_new, has_prev)
        column = batched_inner(dg, dg_new, inner_dtype)
        gram = state.gram.at[slot, :].set(jnp.conj(column)).at[:, slot].set(column)
        gram = jnp.where(has_prev, gram, state.gram)
        count = jnp.where(has_prev, jnp.minimum(state.count + 1, m), state.count)
        index = jnp.where(has_prev, (state.index + 1) % m, state.index)

        gamma = self._coefficients(gram, dg, count, g, inner_dtype)

        restart = jnp.invert(jnp.all(jnp.isfinite(gamma)))
        if self.restart_factor is not None:
            restart = restart | (
                has_prev & (g_norm > self.restart_factor * state.g_norm_prev)
            )
        gamma = jnp.where(restart, 0, gamma)
        # d = β g - ΔY γ - β ΔG γ
        beta = jnp.asarray(self.relaxation, dtype)
        mixed_g = (g**ω - batched_combine(gamma, dg) ** ω).ω
        direction = (tree_scale(beta, mixed_g) ** ω - batched_combine(gamma, dy) ** ω).ω
        return _AndersonDescentState(
            first=jnp.array(False),
            y_prev=y,
            g_prev=g,
            g_norm_prev=g_norm,
            dy=dy,
            dg=dg,
            gram=gram,
            count=jnp.where(restart, 0, count),
            index=jnp.where(restart, 0, index),
            direction=direction,
            num_restarts=state.num_restarts + restart.astype(int),
        )

    def _coefficients(self, gram, dg, count, x, dtype):
        """`γ = (ΔGᴴΔG + λI)⁻¹ ΔGᴴ x` over the valid history slots, in `dtype` (the
        `field_dtype`: complex for a complex state)."""
        real = real_dtype(dtype)
        mask = jnp.arange(self.memory) < count
        masked_gram = jnp.where(mask[:, None] & mask[None, :], gram, 0)
        rhs = jnp.where(mask, batched_inner(dg, x, dtype), 0)
        # (The diagonal of a Hermitian matrix is real.)
        trace = jnp.real(jnp.trace(masked_gram))
        scale = trace / jnp.maximum(count, 1).astype(real)
        ridge = self.regularisation * scale + jnp.finfo(real).tiny
        diagonal = jnp.diag(jnp.where(mask, ridge, 1))
        if is_complex(dtype):
            diagonal = diagonal.astype(dtype)
        return jnp.linalg.solve(masked_gram + diagonal, rhs)

    def inverse_jacobian_mv(self, state: _AndersonDescentState, x: Y) -> Y:
        r"""`H x` for the multisecant estimate $H \approx (\partial g/\partial y)^{-1}$
        that Anderson mixing implies: the step is $-H g$, i.e.
        $H = -\beta I + (\Delta Y + \beta \Delta G)
        (\Delta G^\top \Delta G + \lambda I)^{-1} \Delta G^\top$.
        """
        dtype = stats_dtype(x)
        gamma = self._coefficients(
            state.gram, state.dg, state.count, x, state.gram.dtype
        )
        beta = jnp.asarray(self.relaxation, dtype)
        mixed_x = (batched_combine(gamma, state.dg) ** ω - x**ω).ω
        return (
            batched_combine(gamma, state.dy) ** ω + tree_scale(beta, mixed_x) ** ω
        ).ω

    def step(
        self, step_size: Scalar, state: _AndersonDescentState
    ) -> tuple[Y, optx.RESULTS]:
        return tree_scale(step_size, state.direction), optx.RESULTS.successful


AndersonDescent.__init__.__doc__ = """**Arguments:**

- `memory`: the number $m$ of past differences mixed (history depth).
- `relaxation`: the weight $\\beta \\in (0, 1]$ on $f$ in the mixed update.
- `regularisation`: the ridge, relative to the mean diagonal of the Gram matrix.
- `restart_factor`: clear the history when the residual grows by more than this
    factor in one step; `None` disables the safeguard.
"""


class _BroydenDescentState(eqx.Module, Generic[Y]):
    first: Bool[Array, ""]
    y_prev: Y
    g_prev: Y
    u: Y  # (memory, ...)
    v: Y  # (memory, ...)
    count: Int[Array, ""]
    h_g: Y  # H g at the last accepted point, for the current H; the step is -H g.
    num_restarts: Int[Array, ""]


def _inv_jac_mv(u, v, count, x, dtype):
    """`H x` for `H = -I + Σ_{i < count} u_i v_iᴴ`, with the inner products
    `v_iᴴ x` in `dtype` (a `field_dtype`)."""
    mask = jnp.arange(jtu.tree_leaves(u)[0].shape[0]) < count
    coeffs = jnp.where(mask, batched_inner(v, x, dtype), 0)
    return (batched_combine(coeffs, u) ** ω - x**ω).ω


class BroydenDescent(optx.AbstractDescent[Y, _Residual, _BroydenDescentState]):
    r"""Limited-memory "good" Broyden direction on $g(y) = f(y) - y$.

    Keeps an estimate $H \approx (\partial g / \partial y)^{-1}$ as
    $H = -I + \sum_i u_i v_i^\top$ in fixed-size buffers, and proposes the quasi-Newton
    direction $d = -H g$ (for $H = -I$ this is the Picard direction). After each
    accepted step $\Delta y$, with $\Delta g$ the change in residual, the good Broyden
    (Sherman–Morrison) update is

    $$u = \frac{\Delta y - H \Delta g}{\Delta y^\top H \Delta g},
      \qquad v = H^\top \Delta y.$$

    Restart policy (so the estimate never blows up): when all `memory` slots are full
    the estimate is reset to $-I$ before the update; an update whose denominator is
    tiny relative to $\|\Delta y\|\|H\Delta g\|$ (ill-conditioned) or non-finite is
    skipped; a non-finite direction resets the estimate and falls back to Picard.

    For a complex state every transpose is the conjugate transpose: $H = -I + \sum_i
    u_i v_i^H$, $v = H^H \Delta y$ and the denominator is $\Delta y^H H \Delta g$.
    (For a pytree mixing real and complex leaves the inner product is the real one,
    $\operatorname{Re}\langle x, y\rangle$.)

    The factors $u_i, v_i$ in the final state are what
    [`eqxdeq.ShineAdjoint`][] reuses as an inverse-Jacobian estimate.

    ??? cite "References"

        ```bibtex
        @article{broyden1965class,
            author = {Broyden, C. G.},
            title = {A class of methods for solving nonlinear simultaneous equations},
            journal = {Mathematics of Computation},
            volume = {19},
            number = {92},
            pages = {577--593},
            year = {1965},
        }

        @inproceedings{bai2019deep,
            author = {Bai, Shaojie and Kolter, J. Zico and Koltun, Vladlen},
            title = {Deep Equilibrium Models},
            booktitle = {Advances in Neural Information Processing Systems},
            year = {2019},
        }
        ```
    """

    memory: int = 16
    conditioning: float = 1e-6

    def __check_init__(self):
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError("`BroydenDescent(memory=...)` must be an int >= 1.")
        if is_python_number(self.conditioning) and not 0 <= self.conditioning < 1:
            raise ValueError("`BroydenDescent(conditioning=...)` must be in [0, 1).")

    def init(self, y: Y, f_info_struct: _Residual) -> _BroydenDescentState:
        zeros = (ω(y) * 0).ω
        return _BroydenDescentState(
            first=jnp.array(True),
            y_prev=zeros,
            g_prev=zeros,
            u=history_buffer(y, self.memory),
            v=history_buffer(y, self.memory),
            count=jnp.array(0),
            h_g=zeros,
            num_restarts=jnp.array(0),
        )

    def inverse_jacobian_mv(self, state: _BroydenDescentState, x: Y) -> Y:
        """`H x`, for the current estimate `H` of the inverse Jacobian of `f(y) - y`."""
        dtype = field_dtype(x, stats_dtype(x))
        return _inv_jac_mv(state.u, state.v, state.count, x, dtype)

    def inverse_jacobian_rmv(self, state: _BroydenDescentState, x: Y) -> Y:
        """`Hᴴ x` (`Hᵀ x` for a real state), for the current estimate `H` of the
        inverse Jacobian."""
        dtype = field_dtype(x, stats_dtype(x))
        return _inv_jac_mv(state.v, state.u, state.count, x, dtype)

    def query(
        self, y: Y, f_info: _Residual, state: _BroydenDescentState
    ) -> _BroydenDescentState:
        # Two products with the low-rank factors per step (`H g` and `Hᵀ Δy`): the
        # third one, `H Δg`, is `H g - H g_prev`, and `H g_prev` is remembered.
        # For a complex state the inner products conjugate their first argument:
        # `denom = Δyᴴ H Δg`, `v = Hᴴ Δy` and the update adds `u vᴴ` to H.
        g = f_info.residual
        dtype = stats_dtype(y)
        inner_dtype = field_dtype(y, dtype)
        has_prev = jnp.invert(state.first)
        dy = (y**ω - state.y_prev**ω).ω

        full = state.count >= self.memory  # reset to H = -I before updating
        count = jnp.where(full, 0, state.count)
        h_g = _inv_jac_mv(state.u, state.v, count, g, inner_dtype)
        h_g_prev = tree_where(full, (-(state.g_prev**ω)).ω, state.h_g)
        h_dg = (h_g**ω - h_g_prev**ω).ω
        ht_dy = _inv_jac_mv(state.v, state.u, count, dy, inner_dtype)
        denom = tree_inner(dy, h_dg, inner_dtype)
        size = two_norm(dy, dtype) * two_norm(h_dg, dtype)
        ok = (
            has_prev
            & (jnp.abs(denom) > self.conditioning * size)
            & jnp.isfinite(denom)
            & (size > 0)
        )
        safe_denom = jnp.where(ok, denom, 1)
        u_new = tree_scale(1 / safe_denom, (dy**ω - h_dg**ω).ω)
        ok = ok & tree_allfinite(u_new) & tree_allfinite(ht_dy)
        u = buffer_set(state.u, count, u_new, ok)
        v = buffer_set(state.v, count, ht_dy, ok)
        count = jnp.where(has_prev, count + ok.astype(int), state.count)
        # H_new g = H g + u_new (v_newᴴ g)
        coeff = jnp.where(ok, tree_inner(ht_dy, g, inner_dtype), 0)
        h_g = (h_g**ω + tree_scale(coeff, u_new) ** ω).ω

        bad = jnp.invert(tree_allfinite(h_g))  # reset, and take a Picard step
        h_g = tree_where(bad, (-(g**ω)).ω, h_g)
        restarts = (has_prev & full) | bad
        return _BroydenDescentState(
            first=jnp.array(False),
            y_prev=y,
            g_prev=g,
            u=u,
            v=v,
            count=jnp.where(bad, 0, count),
            h_g=h_g,
            num_restarts=state.num_restarts + restarts.astype(int),
        )

    def step(
        self, step_size: Scalar, state: _BroydenDescentState
    ) -> tuple[Y, optx.RESULTS]:
        return tree_scale(-step_size, state.h_g), optx.RESULTS.successful


BroydenDescent.__init__.__doc__ = """**Arguments:**

- `memory`: the number of rank-one terms kept before the estimate is reset to $-I$.
- `conditioning`: skip an update whose denominator $|\\Delta y^\\top H \\Delta g|$ is
    below this fraction of $\\|\\Delta y\\|\\,\\|H \\Delta g\\|$.
"""
