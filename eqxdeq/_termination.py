"""When a fixed-point solve stops, and the bookkeeping behind it: one home for
termination and statistics, shared by every eqxdeq solver."""

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from equinox import AbstractVar
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree, Scalar

from ._custom_types import Aux, Fn, Y
from ._misc import (
    stats_dtype,
    tree_where,
    tree_zeros_like_struct,
    two_norm,
    ω,
)
from ._results import RESULTS
from ._validation import check_termination_fields


class Termination(eqx.Module):
    r"""When a fixed-point solve stops, besides running out of steps.

    With $g(y) = f(y) - y$ the residual at an accepted iterate $y$, and `rtol`, `atol`,
    `norm` taken from the solver:

    - `criterion="elementwise"` (optimistix's convention, the default) stops when
        `norm(g / (atol + rtol * |f(y)|)) < 1`, elementwise scaling as in
        [`optimistix.FixedPointIteration`][].
    - `criterion="norm"` (the DEQ convention) stops when
        `norm(g) <= atol + rtol * norm(f(y))`. With `norm=optimistix.two_norm`,
        `atol=0` gives torchdeq's `stop_mode="rel"` and `rtol=0` its `"abs"`.

    "Safe" termination (as NonlinearSolve.jl's) also stops a solve that cannot succeed:

    - divergence: the residual becomes non-finite, or exceeds `divergence_factor`
        times the residual at `y0` → [`eqxdeq.RESULTS.diverged`][eqxdeq.RESULTS];
    - stall: the best residual seen fails to drop by a factor `1 - stall_tol` within
        `stall_patience` consecutive steps → [`eqxdeq.RESULTS.stalled`][eqxdeq.RESULTS].

    Both return the best iterate seen so far when the solver has `return_best=True`.
    """

    criterion: Literal["elementwise", "norm"] = eqx.field(
        default="elementwise", static=True
    )
    divergence_factor: float | None = 1e4
    stall_patience: int | None = None
    stall_tol: float = 1e-3

    def __check_init__(self):
        if self.criterion not in ("elementwise", "norm"):
            raise ValueError(
                "`Termination(criterion=...)` must be 'elementwise' or 'norm', got "
                f"{self.criterion!r}."
            )
        check_termination_fields(self)

    def converged(
        self, rtol, atol, norm, residual: PyTree[Array], fy: PyTree[Array]
    ) -> Bool[Array, ""]:
        """Whether the residual `residual = f(y) - y` at `f(y) = fy` is small enough."""
        if self.criterion == "elementwise":
            scale = (atol + rtol * ω(fy).call(jnp.abs)).ω
            return norm((residual**ω / scale**ω).ω) < 1
        else:
            return norm(residual) <= atol + rtol * norm(fy)

    def diverged(self, residual: Scalar, initial_residual: Scalar) -> Bool[Array, ""]:
        bad = jnp.invert(jnp.isfinite(residual))
        if self.divergence_factor is not None:
            bad = bad | (residual > self.divergence_factor * initial_residual)
        return bad

    def stall(
        self,
        best_residual: Scalar,
        stall_reference: Scalar,
        steps_since_progress: Int[Array, ""],
    ) -> tuple[Scalar, Int[Array, ""], Bool[Array, ""]]:
        """One step of stall detection given the best residual so far: the new
        `(stall_reference, steps_since_progress, stalled)`."""
        progress = best_residual < (1 - self.stall_tol) * stall_reference
        stall_reference = jnp.where(progress, best_residual, stall_reference)
        steps_since_progress = jnp.where(progress, 0, steps_since_progress + 1)
        if self.stall_patience is None:
            stalled = jnp.array(False)
        else:
            stalled = steps_since_progress >= self.stall_patience
        return stall_reference, steps_since_progress, stalled


class Progress(eqx.Module, Generic[Y, Aux]):
    r"""The bookkeeping that every eqxdeq solver shares: termination flags,
    counts, residuals, the best iterate and the residual history.

    A solver keeps one `Progress` in its state and drives it with four calls:
    [`eqxdeq.Progress.start`][] in `init`, [`eqxdeq.Progress.observe`][] for each
    evaluation of $f$ (a point $y$, $f(y)$ and the residual $g = f(y) - y$),
    [`eqxdeq.Progress.end_step`][] once per step, and
    [`eqxdeq.Progress.terminate`][] / [`eqxdeq.Progress.finish`][] for optimistix's
    `terminate` and `postprocess`. So a new solver gets safe termination
    ([`eqxdeq.Termination`][]), the best iterate, `options["step_budget"]`, the
    residual history and the same `sol.stats` keys by composition.

    Residual norms are $\|g\|_2$, accumulated in at least float32 (real for
    complex states). [`eqxdeq.Fallback`][] reads its stages' `Progress` (in their
    states' `progress` field) to decide when and from where to hand over.
    """

    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]
    stalled: Bool[Array, ""]
    initial_residual: Scalar  # the first residual seen: the divergence reference
    stall_reference: Scalar
    steps_since_progress: Int[Array, ""]
    num_steps: Int[Array, ""]
    num_fn_evals: Int[Array, ""]
    num_accepted_steps: Int[Array, ""]
    abs_residual: Scalar  # at the current iterate
    rel_residual: Scalar
    best_abs_residual: Scalar  # the smallest seen at any evaluated point
    best_rel_residual: Scalar  # the relative residual there
    best: tuple[Y, Y, Aux] | None  # (y, f(y) - y, aux) there, if kept
    residual_history: Array | None

    @classmethod
    def start(
        cls,
        y: Y,
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        *,
        keep_best: bool,
        history_length: int,
        reference_residual: ArrayLike | None = None,
    ) -> "Progress[Y, Aux]":
        """No evaluation yet. `keep_best` keeps a copy of the best iterate (with
        its residual and aux); `history_length` entries of history are recorded.
        `reference_residual`, if given, is the residual at the start of a larger
        solve that this one continues (the divergence reference)."""
        dtype = stats_dtype(y)
        inf = jnp.array(jnp.inf, dtype)
        zero = jnp.array(0)
        if reference_residual is None:
            initial = inf
        else:
            initial = jnp.asarray(reference_residual, dtype)
        best = None
        if keep_best:
            aux = tree_zeros_like_struct(aux_struct)
            best = (y, tree_zeros_like_struct(jax.eval_shape(lambda: y)), aux)
        history = None
        if history_length > 0:
            history = jnp.full((history_length,), jnp.nan, dtype)
        false = jnp.array(False)
        return cls(
            converged=false,
            diverged=false,
            stalled=false,
            initial_residual=initial,
            stall_reference=inf,
            steps_since_progress=zero,
            num_steps=zero,
            num_fn_evals=zero,
            num_accepted_steps=zero,
            abs_residual=inf,
            rel_residual=inf,
            best_abs_residual=inf,
            best_rel_residual=inf,
            best=best,
            residual_history=history,
        )

    def observe(
        self,
        solver: Any,  # has `rtol`, `atol`, `norm` and `termination`
        y: Y,
        f: Y,
        g: Y,
        aux: Aux,
        *,
        accept: Bool[ArrayLike, ""] = True,
        is_iterate: bool = True,
        num_evals: ArrayLike = 1,
        history_index: ArrayLike | None = None,
    ) -> "Progress[Y, Aux]":
        """Record an evaluation of $f$ at `y`: `f` $= f(y)$, `g` $= f(y) - y$,
        `aux` its auxiliary output, costing `num_evals` evaluations.

        - The first residual seen becomes the reference for divergence.
        - `accept`: whether `y` becomes the solver's current iterate (a rejected
            trial still counts for the best point and the history). Convergence is
            decided, and divergence detected, at accepted iterates.
        - `is_iterate=False`: `y` is evaluated but is never the returned iterate
            (the second sequence of [`eqxdeq.Reversible`][]): it counts for
            divergence, the best residual and the history only.
        - `history_index`: the history entry to write (default: the number of
            evaluations so far).
        """
        dtype = stats_dtype(y)
        accept = jnp.asarray(accept)
        abs_eval = two_norm(g, dtype)
        rel_eval = abs_eval / two_norm(f, dtype)
        initial = jnp.where(
            jnp.isinf(self.initial_residual), abs_eval, self.initial_residual
        )
        diverged = self.diverged | (
            accept & solver.termination.diverged(abs_eval, initial)
        )
        converged, abs_residual, rel_residual = (
            self.converged,
            self.abs_residual,
            self.rel_residual,
        )
        if is_iterate:
            with jax.numpy_dtype_promotion("standard"):
                converged_eval = solver.termination.converged(
                    solver.rtol, solver.atol, solver.norm, g, f
                )
            converged = jnp.where(accept, converged_eval, converged)
            abs_residual = jnp.where(accept, abs_eval, abs_residual)
            rel_residual = jnp.where(accept, rel_eval, rel_residual)
        # (`<` ignores NaNs, unlike `jnp.minimum`.)
        improved = abs_eval < self.best_abs_residual
        best = self.best
        if best is not None and is_iterate:
            best = tree_where(improved, (y, g, aux), best)
        history = self.residual_history
        if history is not None:
            index = self.num_fn_evals if history_index is None else history_index
            history = history.at[index].set(abs_eval, mode="drop")
        return dataclasses.replace(
            self,
            converged=converged,
            diverged=diverged,
            initial_residual=initial,
            num_fn_evals=self.num_fn_evals + num_evals,
            abs_residual=abs_residual,
            rel_residual=rel_residual,
            best_abs_residual=jnp.where(improved, abs_eval, self.best_abs_residual),
            best_rel_residual=jnp.where(improved, rel_eval, self.best_rel_residual),
            best=best,
            residual_history=history,
        )

    def end_step(
        self,
        solver: Any,  # has `rtol`, `atol`, `norm` and `termination`
        accepted: Bool[ArrayLike, ""] = True,
        failed: Bool[ArrayLike, ""] = False,
    ) -> "Progress[Y, Aux]":
        """Close a step: count it (and whether the search `accepted` its trial),
        update the stall detection, and mark the solve as diverged if the step
        `failed` (e.g. a descent or an ODE step reported an error)."""
        stall_reference, steps_since_progress, stalled = solver.termination.stall(
            self.best_abs_residual, self.stall_reference, self.steps_since_progress
        )
        return dataclasses.replace(
            self,
            diverged=self.diverged | failed,
            stalled=stalled,
            stall_reference=stall_reference,
            steps_since_progress=steps_since_progress,
            num_steps=self.num_steps + 1,
            num_accepted_steps=self.num_accepted_steps
            + jnp.asarray(accepted).astype(int),
        )

    @property
    def failed(self) -> Bool[Array, ""]:
        """Diverged or stalled, and not converged: the solve cannot succeed."""
        return (self.diverged | self.stalled) & jnp.invert(self.converged)

    def terminate(
        self, options: dict[str, Any]
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        """optimistix's `terminate`: stop when converged, diverged, stalled or past
        `options["step_budget"]` steps."""
        out_of_budget = jnp.array(False)
        budget = options.get("step_budget", None)
        if budget is not None:
            out_of_budget = self.num_steps >= budget
        failed = self.diverged | self.stalled
        result = optx.RESULTS.where(
            self.converged,
            optx.RESULTS.successful,
            optx.RESULTS.where(
                failed,
                optx.RESULTS.nonlinear_divergence,
                optx.RESULTS.where(
                    out_of_budget,
                    optx.RESULTS.nonlinear_max_steps_reached,
                    optx.RESULTS.successful,
                ),
            ),
        )
        return self.converged | failed | out_of_budget, result

    def finish(
        self, y: Y, aux: Aux, result: optx.RESULTS
    ) -> tuple[Y, Aux, dict[str, Any]]:
        """optimistix's `postprocess`: the returned `(y, aux)` — the best iterate
        seen if one is kept and the solve did not converge (a converged solve
        returns its last iterate, the one that met the tolerance: the iterate of
        smallest 2-norm residual need not, under an elementwise or relative
        criterion) — and the common `sol.stats`."""
        abs_residual, rel_residual = self.abs_residual, self.rel_residual
        if self.best is not None:
            use_best = jnp.invert(self.converged)
            y, aux = tree_where(use_best, (self.best[0], self.best[2]), (y, aux))
            abs_residual = jnp.where(use_best, self.best_abs_residual, abs_residual)
            rel_residual = jnp.where(use_best, self.best_rel_residual, rel_residual)
        stats = {
            "num_fn_evals": self.num_fn_evals,
            "num_accepted_steps": self.num_accepted_steps,
            "abs_residual": abs_residual,
            "rel_residual": rel_residual,
            "best_abs_residual": self.best_abs_residual,
            "best_rel_residual": self.best_rel_residual,
            "result": RESULTS.where(
                result == optx.RESULTS.nonlinear_divergence,
                RESULTS.where(self.stalled, RESULTS.stalled, RESULTS.diverged),
                RESULTS.promote(result),
            ),
        }
        if self.residual_history is not None:
            stats["residual_history"] = self.residual_history
        return y, aux, stats


_State = TypeVar("_State")


class AbstractProgressSolver(optx.AbstractFixedPointSolver[Y, Aux, _State]):
    """A fixed-point solver whose state keeps an [`eqxdeq.Progress`][] in a field
    named `progress`: `terminate` and `postprocess` come from it, so a subclass
    implements `init` and `step` (and `extra_stats`) only. Every eqxdeq solver but
    [`eqxdeq.Fallback`][] is one, and [`eqxdeq.Fallback`][] relies on it: it reads
    a stage's `progress` to hand over from its best iterate.
    """

    rtol: AbstractVar[float]
    atol: AbstractVar[float]
    norm: AbstractVar[Callable[[PyTree], Scalar]]
    termination: AbstractVar[Termination]

    @abc.abstractmethod
    def extra_stats(self, state: _State) -> dict[str, Any]:
        """Solver-specific `sol.stats` keys besides the common ones (e.g.
        Newton–Krylov's Jacobian-vector products); `{}` for none."""

    def terminate(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _State,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        del fn, y, args, tags
        return _progress_of(state).terminate(options)

    def postprocess(
        self,
        fn: Fn,
        y: Y,
        aux: Aux,
        args: PyTree,
        options: dict[str, Any],
        state: _State,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Aux, dict[str, Any]]:
        del fn, args, options, tags
        y, aux, stats = _progress_of(state).finish(y, aux, result)
        return y, aux, {**stats, **self.extra_stats(state)}


def _progress_of(state: Any) -> Progress:
    progress = getattr(state, "progress", None)
    if not isinstance(progress, Progress):
        raise TypeError(
            "An `eqxdeq.AbstractProgressSolver`'s state must have a field "
            f"`progress: eqxdeq.Progress`, got {type(state).__name__}."
        )
    return progress


# The `options` of every eqxdeq solver, and those of the descent+search solvers,
# which can also continue from a point whose residual is known (see `Fallback`).
BASIC_OPTIONS = ("step_budget",)
SOLVER_OPTIONS = ("step_budget", "y0_evaluation", "reference_residual")


def check_options(
    name: str, options: dict[str, Any], allowed: tuple[str, ...] = BASIC_OPTIONS
) -> None:
    """A clear error at trace time for unknown `options` keys (a typo would be
    silently ignored) and for a Python `step_budget` that is not a positive int."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"`{name}` got unknown `options` key(s) {unknown}; it accepts "
            f"{sorted(allowed)}."
        )
    budget = options.get("step_budget", None)
    if budget is None or isinstance(budget, Tracer):
        return
    if isinstance(budget, (jax.Array, np.ndarray)):
        if budget.shape != () or not jnp.issubdtype(budget.dtype, jnp.integer):
            raise ValueError(
                f"`{name}`: `options['step_budget']` must be an integer scalar, got "
                f"an array of shape {budget.shape} and dtype {budget.dtype}."
            )
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(
            f"`{name}`: `options['step_budget']` must be an int (or an integer "
            f"array, to change it without recompiling), got {budget!r}."
        )
    if budget < 1:
        raise ValueError(
            f"`{name}`: `options['step_budget']` must be at least 1, got {budget}."
        )


Termination.__init__.__doc__ = """**Arguments:**

- `criterion`: `"elementwise"` (default) or `"norm"`; see above.
- `divergence_factor`: declare divergence once the residual exceeds this multiple of
    its value at `y0`. `None` only catches non-finite residuals.
- `stall_patience`: declare a stall after this many consecutive steps without
    sufficient improvement of the best residual. `None` (default) disables it.
- `stall_tol`: the relative decrease of the best residual that counts as progress.
"""
