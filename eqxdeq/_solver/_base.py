"""The one fixed-point loop that every eqxdeq solver is an instance of: a descent
(the direction) plus a search (the step length and whether to accept a trial)."""

import dataclasses
from collections.abc import Callable
from typing import Any, Generic

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from equinox import AbstractVar
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from .._custom_types import Aux, Y
from .._descent import AbstractJacobianDescent
from .._misc import (
    is_python_number,
    stats_dtype,
    tree_where,
    tree_zeros_like_struct,
    two_norm,
    ω,
)
from .._termination import detailed_result, terminate_result, Termination


_Residual = optx.FunctionInfo.Residual


def _always_accepts(search: optx.AbstractSearch) -> bool:
    """Searches that accept every trial (fixed step lengths)."""
    return isinstance(search, optx.LearningRate)


def _needs_jacobian(descent: optx.AbstractDescent) -> bool:
    """Descents fed `FunctionInfo.ResidualJac` rather than `FunctionInfo.Residual`."""
    return isinstance(descent, (AbstractJacobianDescent, optx.NewtonDescent))


def _evaluate(fn, y, args, jacobian: bool):
    """`f(y)`, its aux and, if `jacobian`, the matrix-free operator `∂g/∂y` of
    `g(y) = f(y) - y`. Either way `f` is evaluated once: `jax.linearize` returns the
    primal output and a tangent map that re-evaluates nothing."""
    if not jacobian:
        f, aux = fn(y, args)
        return f, aux, None
    f, f_jvp, aux = jax.linearize(lambda z: fn(z, args), y, has_aux=True)
    jac = lx.FunctionLinearOperator(
        lambda v: (f_jvp(v) ** ω - v**ω).ω, jax.eval_shape(lambda: y)
    )
    return f, aux, jac


class _DescentSearchState(eqx.Module, Generic[Y, Aux]):
    # The loop.
    first_step: Bool[Array, ""]
    y_eval: Y
    f_info: _Residual  # residual g(y) = f(y) - y at the last accepted iterate y
    aux: Aux  # aux at the last accepted iterate
    descent_state: Any
    search_state: Any
    # Termination.
    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]
    stalled: Bool[Array, ""]
    initial_residual: Scalar
    stall_reference: Scalar
    steps_since_progress: Int[Array, ""]
    # Statistics.
    num_fn_evals: Int[Array, ""]
    num_accepted_steps: Int[Array, ""]
    abs_residual: Scalar  # |f(y) - y|_2 at the last accepted iterate
    rel_residual: Scalar  # |f(y) - y|_2 / |f(y)|_2 at the last accepted iterate
    best_y: Y | None
    best_aux: Aux | None
    best_residual: Y | None
    best_abs_residual: Scalar
    best_rel_residual: Scalar
    residual_history: Array | None


class AbstractDescentSearchSolver(optx.AbstractFixedPointSolver[Y, Aux, Any]):
    r"""The generic fixed-point solver: every eqxdeq solver is one of these, with a
    particular descent and search.

    Each step evaluates $f$ exactly once, at a trial point `y_eval`, and forms the
    residual $g = f(y_\text{eval}) - y_\text{eval}$, passed to the search and descent
    as [`optimistix.FunctionInfo.Residual`][]. The search decides whether to accept
    the trial; if so the descent is queried at the new iterate for a direction. The
    search then picks a step length $\alpha$ and the next trial is
    $y + \alpha\,d$. A rejected trial still counts as a step (and an evaluation).

    Subclasses provide the fields `rtol`, `atol`, `norm`, `descent`, `search`,
    `termination`, `return_best` and `history_length`.

    Supports the following `options`:

    - `step_budget`: a (possibly traced) integer; the solve stops after this many
        steps with `optimistix.RESULTS.nonlinear_max_steps_reached` unless converged.
        Unlike `max_steps` it can change between calls without recompiling, e.g. for
        a curriculum over the depth of a DEQ.

    `sol.stats` holds, for every eqxdeq solver:

    | key | meaning |
    | --- | --- |
    | `num_steps`, `max_steps` | from optimistix |
    | `num_fn_evals` | evaluations of `f` (one per step) |
    | `num_accepted_steps` | steps the search accepted |
    | `abs_residual`, `rel_residual` | $\|f(y)-y\|_2$ and $\|f(y)-y\|_2/\|f(y)\|_2$ at the returned $y$ |
    | `best_abs_residual` | the smallest $\|f(y)-y\|_2$ seen at any evaluated point |
    | `best_rel_residual` | $\|f(y)-y\|_2/\|f(y)\|_2$ at that point |
    | `residual_history` | $\|f(y)-y\|_2$ at each evaluation, NaN-padded (only if `history_length > 0`) |
    | `result` | the precise [`eqxdeq.RESULTS`][] (distinguishes divergence from a stall) |
    """  # noqa: E501

    rtol: AbstractVar[float]
    atol: AbstractVar[float]
    norm: AbstractVar[Callable[[PyTree], Scalar]]
    descent: AbstractVar[optx.AbstractDescent]
    search: AbstractVar[optx.AbstractSearch]
    termination: AbstractVar[Termination]
    return_best: AbstractVar[bool]
    history_length: AbstractVar[int]

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, tags
        dtype = stats_dtype(y)
        f_info_struct = _Residual(jax.eval_shape(lambda: y))
        inf = jnp.array(jnp.inf, dtype)
        zero = jnp.array(0)
        aux = tree_zeros_like_struct(aux_struct)
        if self.history_length > 0:
            history = jnp.full((self.history_length,), jnp.nan, dtype)
        else:
            history = None
        return _DescentSearchState(
            first_step=jnp.array(True),
            y_eval=y,
            f_info=_Residual(tree_zeros_like_struct(f_struct)),
            aux=aux,
            descent_state=self.descent.init(y, f_info_struct),
            search_state=self.search.init(y, f_info_struct),
            converged=jnp.array(False),
            diverged=jnp.array(False),
            stalled=jnp.array(False),
            initial_residual=inf,
            stall_reference=inf,
            steps_since_progress=zero,
            num_fn_evals=zero,
            num_accepted_steps=zero,
            abs_residual=inf,
            rel_residual=inf,
            best_y=y if self.return_best else None,
            best_aux=aux if self.return_best else None,
            best_residual=(
                tree_zeros_like_struct(f_struct) if self.return_best else None
            ),
            best_abs_residual=inf,
            best_rel_residual=inf,
            residual_history=history,
        )

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        dtype = stats_dtype(y)
        y_eval = state.y_eval
        f_eval, aux_eval, jac_eval = _evaluate(
            fn, y_eval, args, _needs_jacobian(self.descent)
        )
        g_eval = (f_eval**ω - y_eval**ω).ω
        f_eval_info = _Residual(g_eval)
        if jac_eval is None:
            query_info = f_eval_info
        else:
            query_info = optx.FunctionInfo.ResidualJac(g_eval, jac_eval)
        abs_eval = two_norm(g_eval, dtype)
        rel_eval = abs_eval / two_norm(f_eval, dtype)

        step_size, accept, search_result, search_state = self.search.step(
            state.first_step, y, y_eval, state.f_info, f_eval_info, state.search_state
        )
        step_size = jnp.asarray(step_size)

        # Accept: the trial becomes the iterate, and the descent gets a new direction.
        if _always_accepts(self.search):
            # No branch and no selects: lets XLA fuse the step (Picard's hot path).
            accept = jnp.array(True)
            descent_state = self.descent.query(y_eval, query_info, state.descent_state)
            new_y, f_info, aux = y_eval, f_eval_info, aux_eval
        else:
            descent_state = lax.cond(
                accept,
                lambda s: self.descent.query(y_eval, query_info, s),
                lambda s: s,
                state.descent_state,
            )
            new_y = tree_where(accept, y_eval, y)
            f_info = tree_where(accept, f_eval_info, state.f_info)
            aux = tree_where(accept, aux_eval, state.aux)
        y_diff, descent_result = self.descent.step(step_size, descent_state)
        abs_residual = jnp.where(accept, abs_eval, state.abs_residual)
        rel_residual = jnp.where(accept, rel_eval, state.rel_residual)
        with jax.numpy_dtype_promotion("standard"):
            converged = self.termination.converged(
                self.rtol, self.atol, self.norm, g_eval, f_eval
            )
        converged = jnp.where(accept, converged, state.converged)

        # Safe termination.
        # (A solve resumed from another solver's point keeps the original one.)
        initial_residual = jnp.where(
            jnp.isinf(state.initial_residual), abs_eval, state.initial_residual
        )
        diverged = accept & self.termination.diverged(abs_eval, initial_residual)
        improved = abs_eval < state.best_abs_residual
        best_abs_residual = jnp.where(improved, abs_eval, state.best_abs_residual)
        best_rel_residual = jnp.where(improved, rel_eval, state.best_rel_residual)
        stall_reference, steps_since_progress, stalled = self.termination.stall(
            best_abs_residual, state.stall_reference, state.steps_since_progress
        )

        if self.return_best:
            best_y = tree_where(improved, y_eval, state.best_y)
            best_aux = tree_where(improved, aux_eval, state.best_aux)
            best_residual = tree_where(improved, g_eval, state.best_residual)
        else:
            best_y = best_aux = best_residual = None
        if state.residual_history is None:
            history = None
        else:
            history = state.residual_history.at[state.num_fn_evals].set(
                abs_eval, mode="drop"
            )

        result = optx.RESULTS.where(
            search_result == optx.RESULTS.successful, descent_result, search_result
        )
        new_state = _DescentSearchState(
            first_step=jnp.array(False),
            y_eval=(new_y**ω + y_diff**ω).ω,
            f_info=f_info,
            aux=aux,
            descent_state=descent_state,
            search_state=search_state,
            converged=converged,
            diverged=diverged | (result != optx.RESULTS.successful),
            stalled=stalled,
            initial_residual=initial_residual,
            stall_reference=stall_reference,
            steps_since_progress=steps_since_progress,
            num_fn_evals=state.num_fn_evals + 1,
            num_accepted_steps=state.num_accepted_steps + accept.astype(int),
            abs_residual=abs_residual,
            rel_residual=rel_residual,
            best_y=best_y,
            best_aux=best_aux,
            best_residual=best_residual,
            best_abs_residual=best_abs_residual,
            best_rel_residual=best_rel_residual,
            residual_history=history,
        )
        return new_y, new_state, aux

    def handover_point(self, y, state):
        """`(y, g, aux)`: the point another solver should continue from when this
        one fails — the best iterate seen (or, with `return_best=False`, the last
        accepted one) with its residual $g = f(y) - y$ and aux."""
        if self.return_best:
            return state.best_y, state.best_residual, state.best_aux
        return y, state.f_info.residual, state.aux

    def resume(self, y, g, aux, state, initial_residual):
        """A fresh state (`state`, from `init`) advanced to continue from `y`, where
        the residual `g` and `aux` are already known: the first trial is proposed
        without evaluating $f$ at `y` again. A descent that needs the Jacobian at
        `y` cannot do that, so it starts by (re-)evaluating $f$ there.
        `initial_residual`, $\\|g\\|_2$ at the start of the whole solve, stays the
        reference for divergence detection (and for a Jacobian descent's own
        continuation, e.g. Newton–Krylov's pseudo-time step)."""
        dtype = stats_dtype(y)
        initial_residual = jnp.asarray(initial_residual, dtype)
        if _needs_jacobian(self.descent):
            descent_state = state.descent_state
            if isinstance(self.descent, AbstractJacobianDescent):
                descent_state = self.descent.with_reference_residual(
                    descent_state, initial_residual
                )
            return dataclasses.replace(
                state,
                y_eval=y,
                descent_state=descent_state,
                initial_residual=initial_residual,
            )
        f_info = _Residual(g)
        step_size, _, _, search_state = self.search.step(
            jnp.array(True), y, y, f_info, f_info, state.search_state
        )
        descent_state = self.descent.query(y, f_info, state.descent_state)
        y_diff, _ = self.descent.step(jnp.asarray(step_size), descent_state)
        abs_residual = two_norm(g, dtype)
        f = (y**ω + g**ω).ω
        rel_residual = abs_residual / two_norm(f, dtype)
        best = {}
        if self.return_best:
            best = dict(best_y=y, best_aux=aux, best_residual=g)
        return dataclasses.replace(
            state,
            first_step=jnp.array(False),
            y_eval=(y**ω + y_diff**ω).ω,
            f_info=f_info,
            aux=aux,
            descent_state=descent_state,
            search_state=search_state,
            initial_residual=initial_residual,
            stall_reference=abs_residual,
            abs_residual=abs_residual,
            rel_residual=rel_residual,
            best_abs_residual=abs_residual,
            best_rel_residual=rel_residual,
            **best,
        )

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, tags
        return terminate_result(
            state.converged, state.diverged, state.stalled, state.num_fn_evals, options
        )

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, args, options, tags
        detailed = detailed_result(result, state.stalled)
        if self.return_best:
            # A converged solve returns its last iterate, which meets the tolerance
            # (the iterate of smallest 2-norm residual need not, under an elementwise
            # or relative criterion). Otherwise the best iterate seen is returned.
            use_best = jnp.logical_not(state.converged)
            y = tree_where(use_best, state.best_y, y)
            aux = tree_where(use_best, state.best_aux, aux)
            abs_residual = jnp.where(
                use_best, state.best_abs_residual, state.abs_residual
            )
            rel_residual = jnp.where(
                use_best, state.best_rel_residual, state.rel_residual
            )
        else:
            abs_residual = state.abs_residual
            rel_residual = state.rel_residual
        stats = {
            "num_fn_evals": state.num_fn_evals,
            "num_accepted_steps": state.num_accepted_steps,
            "abs_residual": abs_residual,
            "rel_residual": rel_residual,
            "best_abs_residual": state.best_abs_residual,
            "best_rel_residual": state.best_rel_residual,
            "result": detailed,
        }
        if state.residual_history is not None:
            stats["residual_history"] = state.residual_history
        if isinstance(self.descent, AbstractJacobianDescent):
            stats.update(self.descent.stats(state.descent_state))
        return y, aux, stats


def check_solver_fields(solver, name: str):
    """Validation shared by every named solver's `__check_init__`."""
    for field in ("rtol", "atol"):
        value = getattr(solver, field)
        if is_python_number(value) and not value >= 0:
            raise ValueError(f"`{name}({field}=...)` must be non-negative.")
    if not isinstance(solver.history_length, int) or solver.history_length < 0:
        raise ValueError(f"`{name}(history_length=...)` must be a non-negative int.")
    if not isinstance(solver.termination, Termination):
        raise ValueError(f"`{name}(termination=...)` must be an `eqxdeq.Termination`.")
