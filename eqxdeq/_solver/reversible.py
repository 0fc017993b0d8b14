from collections.abc import Callable
from typing import Any, Generic

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Int, PyTree, Scalar

from .._custom_types import Aux, Fn, Y
from .._misc import buffer_set, history_buffer, is_python_number, ω
from .._termination import (
    AbstractProgressSolver,
    BASIC_OPTIONS,
    check_options,
    Progress,
    Termination,
)
from .._validation import check_tolerances
from ._base import check_solver_fields


def weights(beta, like: Array):
    """`(1 - β, β)` in the dtype of `like` (a Python float stays weakly typed), so
    that no dtype promotion happens."""
    if not isinstance(beta, (int, float)):
        beta = jnp.asarray(beta, like.dtype)
    return 1 - beta, beta


def relax(beta, old: PyTree[Array], new: PyTree[Array]) -> PyTree[Array]:
    """`(1 - β) old + β new`, leaf by leaf."""

    def _relax(a, b):
        keep, take = weights(beta, a)
        return keep * a + take * b

    return jtu.tree_map(_relax, old, new)


def unrelax(beta, relaxed: PyTree[Array], new: PyTree[Array]) -> PyTree[Array]:
    """The inverse of `relax` in `old`: `(relaxed - β new) / (1 - β)`."""

    def _unrelax(a, b):
        keep, take = weights(beta, a)
        return (a - take * b) / keep

    return jtu.tree_map(_unrelax, relaxed, new)


def scale(beta, tree: PyTree[Array], *, keep: bool) -> PyTree[Array]:
    """`(1 - β) tree` if `keep`, else `β tree`: the two weights of `relax`, as the
    backward pass of [`eqxdeq.ReversibleAdjoint`][] applies them to cotangents."""
    return jtu.tree_map(lambda a: weights(beta, a)[0 if keep else 1] * a, tree)


def reversible_step(fn, beta, y: Y, z: Y, args: PyTree):
    """One forward step of [`eqxdeq.Reversible`][]:

        y' = (1 - β) y + β f(z),    z' = (1 - β) z + β f(y').

    Returns `(y', z', f(z), f(y'), aux(y'))`. [`eqxdeq.ReversibleAdjoint`][] runs
    it backwards with `unrelax` (the inverse of `relax`) and `scale`.
    """
    f_z, _ = fn(z, args)
    new_y = relax(beta, y, f_z)
    f_y, aux = fn(new_y, args)
    new_z = relax(beta, z, f_y)
    return new_y, new_z, f_z, f_y, aux


def _compact(buffer: PyTree[Array]) -> PyTree[Array]:
    """Rows `0, 2, 4, ...` of every leaf moved to the front (the back half is
    left as it was: it is overwritten before it is read)."""

    def _compact_leaf(b):
        half = b.shape[0] // 2
        return jnp.concatenate([b[::2], b[half:]])

    return jtu.tree_map(_compact_leaf, buffer)


class Checkpoints(eqx.Module, Generic[Y]):
    r"""Exact copies of $(y_n, z_n)$ at the steps $n = 0, s, 2s, \ldots$ (slot $i$
    holds step $i s$), in a buffer of a fixed number of slots. When the buffer is
    full, every other checkpoint is dropped and the stride $s$ doubles, so the
    checkpoints always cover the whole solve with at most $2N/\text{slots}$ steps
    between them."""

    y: Y  # leaves of shape (slots, *leaf.shape)
    z: Y
    stride: Int[Array, ""]

    @classmethod
    def start(cls, y0: Y, slots: int) -> "Checkpoints[Y]":
        buffer = buffer_set(history_buffer(y0, slots), 0, y0)
        return cls(y=buffer, z=buffer, stride=jnp.array(1))

    def record(self, step: Int[Array, ""], y: Y, z: Y) -> "Checkpoints[Y]":
        r"""Record $(y_n, z_n)$ at `step` $= n \ge 1$ if it falls on the stride."""
        slots = jtu.tree_leaves(self.y)[0].shape[0]
        full = (step % self.stride == 0) & (step // self.stride == slots)
        buffer_y, buffer_z = lax.cond(
            full, _compact, lambda buffers: buffers, (self.y, self.z)
        )
        stride = jnp.where(full, 2 * self.stride, self.stride)
        write = step % stride == 0
        slot = jnp.minimum(step // stride, slots - 1)
        return Checkpoints(
            y=buffer_set(buffer_y, slot, y, write),
            z=buffer_set(buffer_z, slot, z, write),
            stride=stride,
        )

    def restore(self, step: Int[Array, ""], y: Y, z: Y) -> tuple[Y, Y]:
        """$(y_n, z_n)$ at `step` $= n$: the recorded copy if there is one, else
        `(y, z)` (the reconstruction)."""
        hit = step % self.stride == 0
        slot = step // self.stride
        pick = lambda buffer, value: jtu.tree_map(
            lambda b, v: jnp.where(hit, b[slot], v), buffer, value
        )
        return pick(self.y, y), pick(self.z, z)


def check_checkpoints(checkpoints, name: str):
    if not isinstance(checkpoints, int) or checkpoints < 0 or checkpoints % 2:
        raise ValueError(
            f"`{name}(checkpoints=...)` must be a non-negative even int, got "
            f"{checkpoints!r}."
        )


class _ReversibleState(eqx.Module, Generic[Y, Aux]):
    z: Y  # the second sequence; the first, y, is optimistix's iterate
    checkpoints: Checkpoints[Y] | None
    progress: Progress[Y, Aux]


_OPTIONS = BASIC_OPTIONS + ("reference_residual",)


class Reversible(AbstractProgressSolver[Y, Aux, _ReversibleState]):
    r"""The reversible fixed-point iteration of Reversible Deep Equilibrium Models.

    Two coupled sequences, started from $y_0 = z_0 = $ `y0`, with relaxation
    $\beta \in (0, 1)$:

    $$y_{n+1} = (1 - \beta)\,y_n + \beta f(z_n), \qquad
    z_{n+1} = (1 - \beta)\,z_n + \beta f(y_{n+1}).$$

    Each step evaluates $f$ twice, at $z_n$ and at $y_{n+1}$, and is algebraically
    invertible:

    $$z_n = \frac{z_{n+1} - \beta f(y_{n+1})}{1 - \beta}, \qquad
    y_n = \frac{y_{n+1} - \beta f(z_n)}{1 - \beta}.$$

    For a contractive $f$ both sequences converge to the fixed point. The returned
    value is $y_N$, the iterate whose residual $f(y_N) - y_N$ was checked (it comes
    for free from the evaluation that updates $z$); `sol.state.z` holds $z_N$.

    Its purpose is [`eqxdeq.ReversibleAdjoint`][]: the exact gradient of the $N$
    iterations, computed by running them backwards in memory independent of $N$.
    It also works with every other adjoint. As a plain solver it is slower than
    damped [`eqxdeq.Picard`][] iteration: it takes two evaluations of $f$ per step,
    and its rate depends on the eigenvalues of $\partial f/\partial y$ only through
    their squares, so negative eigenvalues slow it as much as positive ones.

    The solver has no `return_best`: a solve that fails to converge returns its last
    iterate, the one whose exact gradient [`eqxdeq.ReversibleAdjoint`][] computes.

    Supports the `options` of [`eqxdeq.AbstractDescentSearchSolver`][]
    (`step_budget`, counted in steps of two evaluations each), and produces the same
    `sol.stats`, with `num_fn_evals = 2 * num_steps`. `best_abs_residual` and
    `residual_history` include the residuals at the $z_n$ (there, entry $2n$ is the
    residual at $z_n$ and entry $2n+1$ the residual at $y_{n+1}$); `abs_residual`
    and `rel_residual` are those at the returned $y_N$. Divergence is checked at
    both sequences; the residual at $y_0$ is the reference for
    `Termination(divergence_factor=...)`.

    ??? cite "References"

        ```bibtex
        @article{mccallum2025reversible,
            author = {McCallum, Sam and Arora, Kamran and Foster, James},
            title = {Reversible Deep Equilibrium Models},
            journal = {arXiv:2509.12917},
            year = {2025},
        }
        ```
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    relaxation: float = 0.8
    termination: Termination = eqx.field(default=Termination(), kw_only=True)
    history_length: int = eqx.field(default=0, kw_only=True)
    checkpoints: int = eqx.field(default=8, kw_only=True)

    def __check_init__(self):
        check_solver_fields(self, "Reversible")
        check_checkpoints(self.checkpoints, "Reversible")
        if is_python_number(self.relaxation) and not 0 < self.relaxation < 1:
            raise ValueError(
                "`Reversible(relaxation=...)` must be in (0, 1) (the backward step "
                f"divides by 1 - relaxation), got {self.relaxation!r}."
            )

    def init(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _ReversibleState[Y, Aux]:
        del fn, args, f_struct, tags
        check_options("Reversible", options, _OPTIONS)
        check_tolerances("Reversible", self.rtol, self.atol, y)
        checkpoints = None
        if self.checkpoints > 0:
            checkpoints = Checkpoints.start(y, self.checkpoints)
        progress = Progress.start(
            y,
            aux_struct,
            keep_best=False,
            history_length=self.history_length,
            reference_residual=options.get("reference_residual", None),
        )
        return _ReversibleState(z=y, checkpoints=checkpoints, progress=progress)

    def step(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _ReversibleState[Y, Aux],
        tags: frozenset[object],
    ) -> tuple[Y, _ReversibleState[Y, Aux], Aux]:
        del options, tags
        z = state.z
        new_y, new_z, f_z, f_y, aux = reversible_step(fn, self.relaxation, y, z, args)
        # Both residuals come for free; termination is decided at `new_y`. At the
        # first step z = y0, so the residual at y0 is the divergence reference.
        g_z = (f_z**ω - z**ω).ω
        g_y = (f_y**ω - new_y**ω).ω
        progress = state.progress.observe(self, z, f_z, g_z, aux, is_iterate=False)
        progress = progress.observe(self, new_y, f_y, g_y, aux).end_step(self)
        checkpoints = state.checkpoints
        if checkpoints is not None:
            checkpoints = checkpoints.record(progress.num_steps, new_y, new_z)
        new_state = _ReversibleState(
            z=new_z, checkpoints=checkpoints, progress=progress
        )
        return new_y, new_state, aux

    def extra_stats(self, state: _ReversibleState[Y, Aux]) -> dict[str, Any]:
        del state
        return {}


Reversible.__init__.__doc__ = """**Arguments:**

- `rtol`: relative tolerance for terminating the solve.
- `atol`: absolute tolerance for terminating the solve.
- `norm`: the norm used in the termination criterion; any `PyTree -> Scalar`, e.g.
    [`optimistix.max_norm`][] (default), [`optimistix.rms_norm`][],
    [`optimistix.two_norm`][].
- `relaxation`: the weight $\\beta \\in (0, 1)$ on $f$ in both updates (the paper's
    relaxation parameter $\\beta$; the `relaxation` of [`eqxdeq.Picard`][]).
    Default 0.8, as in the paper and its reference implementation. Larger values
    converge faster; the backward reconstruction of [`eqxdeq.ReversibleAdjoint`][]
    amplifies rounding errors by at least $1/(1-\\beta)$ per step, so smaller
    values give more accurate gradients in float32. (The paper also allows
    over-relaxation, $\\beta \\in (1, 2)$; eqxdeq does not.)
- `termination`: an [`eqxdeq.Termination`][]: the stopping criterion
    (`"elementwise"`, optimistix's, or `"norm"`, the DEQ convention) and the
    divergence and stall detection.
- `history_length`: if positive, `sol.stats["residual_history"]` records
    $\\|f(\\cdot)-\\cdot\\|_2$ at the first `history_length` evaluations (two per
    step). Default 0 (no cost).
- `checkpoints`: the number of exact copies of $(y_n, z_n)$ the forward solve
    keeps for [`eqxdeq.ReversibleAdjoint`][], which restarts its backward
    reconstruction from each (an even number; default 8; 0 for the paper's pure
    reconstruction). This is the one place to set it: the adjoint reads it. They
    cost $2 \times$ `checkpoints` copies of $y$ and one buffer write per step;
    with another adjoint, `checkpoints=0` saves both. Keyword only.
"""
