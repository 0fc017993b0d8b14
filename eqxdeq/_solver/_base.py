"""The one fixed-point loop that every eqxdeq solver is an instance of: a descent
(the direction) plus a search (the step length and whether to accept a trial)."""

from collections.abc import Callable
from typing import Any, Generic

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from equinox import AbstractVar
from jaxtyping import Array, Bool, PyTree, Scalar

from .._custom_types import Aux, Fn, Y
from .._descent import AbstractJacobianDescent
from .._misc import (
    is_python_number,
    stats_dtype,
    tree_where,
    tree_zeros_like_struct,
    ω,
)
from .._termination import (
    AbstractProgressSolver,
    check_options,
    Progress,
    SOLVER_OPTIONS,
    Termination,
)


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
    first_step: Bool[Array, ""]
    # The next trial point is `y + descent.step(step_size, descent_state)`: it is
    # recomputed at the start of the next step instead of carried, so that no
    # iterate-sized buffer changes place in the loop (XLA would copy it).
    step_size: Scalar
    # The residual g(y) = f(y) - y and the aux at the last accepted iterate y: only
    # for a search that can reject a trial (else `None`: the descent and the loop
    # already hold them, and a second copy would be copied every step).
    f_info: _Residual | None
    aux: Aux | None
    descent_state: Any
    search_state: Any
    progress: Progress[Y, Aux]


class AbstractDescentSearchSolver(AbstractProgressSolver[Y, Aux, Any]):
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
        a curriculum over the depth of a DEQ. A Python int must be at least 1
        (and compiles once per value; pass `jnp.asarray(budget)` to avoid that).
    - `y0_evaluation`: `(f(y0), aux(y0))`, when already known: the first trial is
        proposed without evaluating $f$ at `y0` again (except by a descent that needs
        the Jacobian at `y0`). [`eqxdeq.Fallback`][] hands over this way.
    - `reference_residual`: $\|f(y)-y\|_2$ at the start of a larger solve that this
        one continues: the reference for divergence detection (instead of the first
        residual seen) and for a Jacobian descent's own continuation (e.g.
        Newton–Krylov's pseudo-time step).

    Any other key is an error.

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

    def init(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _DescentSearchState[Y, Aux]:
        del fn, args, tags
        check_options(type(self).__name__, options, SOLVER_OPTIONS)
        check_solver_fields(self, type(self).__name__, y=y)
        f_info_struct = _Residual(jax.eval_shape(lambda: y))
        reference = options.get("reference_residual", None)
        descent_state = self.descent.init(y, f_info_struct)
        if reference is not None and isinstance(self.descent, AbstractJacobianDescent):
            descent_state = self.descent.with_reference_residual(
                descent_state, reference
            )
        keep_accepted = not _always_accepts(self.search)
        state = _DescentSearchState(
            first_step=jnp.array(True),
            step_size=jnp.array(0.0, stats_dtype(y)),  # the first trial is `y` itself
            f_info=_Residual(tree_zeros_like_struct(f_struct))
            if keep_accepted
            else None,
            aux=tree_zeros_like_struct(aux_struct) if keep_accepted else None,
            descent_state=descent_state,
            search_state=self.search.init(y, f_info_struct),
            progress=Progress.start(
                y,
                aux_struct,
                keep_best=self.return_best,
                history_length=self.history_length,
                reference_residual=reference,
            ),
        )
        evaluation = options.get("y0_evaluation", None)
        if evaluation is None or _needs_jacobian(self.descent):
            # (A descent that needs the Jacobian at `y0` evaluates `f` there anyway.)
            return state
        # `f(y0)` is known: propose the first trial without evaluating it again.
        f, aux = evaluation
        g = (f**ω - y**ω).ω
        f_info = _Residual(g)
        step_size, _, _, search_state = self.search.step(
            jnp.array(True), y, y, f_info, f_info, state.search_state
        )
        descent_state = self.descent.query(
            y,
            f_info,  # pyright: ignore[reportArgumentType]  (not a Jacobian descent)
            descent_state,
        )
        return _DescentSearchState(
            first_step=jnp.array(False),
            step_size=jnp.asarray(step_size, state.step_size.dtype),
            f_info=f_info if keep_accepted else None,
            aux=aux if keep_accepted else None,
            descent_state=descent_state,
            search_state=search_state,
            progress=state.progress.observe(self, y, f, g, aux, num_evals=0),
        )

    def step(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _DescentSearchState[Y, Aux],
        tags: frozenset[object],
    ) -> tuple[Y, _DescentSearchState[Y, Aux], Aux]:
        del options, tags
        y_diff, _ = self.descent.step(state.step_size, state.descent_state)
        y_eval = (y**ω + y_diff**ω).ω
        f_eval, aux_eval, jac_eval = _evaluate(
            fn, y_eval, args, _needs_jacobian(self.descent)
        )
        g_eval = (f_eval**ω - y_eval**ω).ω
        f_eval_info = _Residual(g_eval)
        if jac_eval is None:
            query_info = f_eval_info
        else:
            query_info = optx.FunctionInfo.ResidualJac(g_eval, jac_eval)

        # (A search that always accepts does not read the last accepted residual.)
        f_info = f_eval_info if state.f_info is None else state.f_info
        step_size, accept, search_result, search_state = self.search.step(
            state.first_step, y, y_eval, f_info, f_eval_info, state.search_state
        )
        step_size = jnp.asarray(step_size, state.step_size.dtype)

        # Accept: the trial becomes the iterate, and the descent gets a new direction.
        if _always_accepts(self.search):
            # No branch and no selects: lets XLA fuse the step (Picard's hot path).
            accept = jnp.array(True)
            descent_state = self.descent.query(y_eval, query_info, state.descent_state)
            new_y, aux = y_eval, aux_eval
            f_info = kept_aux = None  # (not kept: see `_DescentSearchState`)
        else:
            descent_state = lax.cond(
                accept,
                lambda s: self.descent.query(y_eval, query_info, s),
                lambda s: s,
                state.descent_state,
            )
            new_y = tree_where(accept, y_eval, y)
            f_info = tree_where(accept, f_eval_info, state.f_info)
            aux = kept_aux = tree_where(accept, aux_eval, state.aux)
        # (Only the result is used here: the step itself is taken, from the same
        # state, at the start of the next step.)
        _, descent_result = self.descent.step(step_size, descent_state)
        result = optx.RESULTS.where(
            search_result == optx.RESULTS.successful, descent_result, search_result
        )
        progress = state.progress.observe(
            self, y_eval, f_eval, g_eval, aux_eval, accept=accept
        )
        progress = progress.end_step(
            self, accept, failed=result != optx.RESULTS.successful
        )
        new_state = _DescentSearchState(
            first_step=jnp.array(False),
            step_size=step_size,
            f_info=f_info,
            aux=kept_aux,
            descent_state=descent_state,
            search_state=search_state,
            progress=progress,
        )
        return new_y, new_state, aux

    def extra_stats(self, state: _DescentSearchState[Y, Aux]) -> dict[str, Any]:
        if isinstance(self.descent, AbstractJacobianDescent):
            return self.descent.stats(state.descent_state)
        return {}


def check_solver_fields(solver, name: str, *, y: PyTree | None = None):
    """Validation shared by every named solver's `__check_init__`: the tolerances,
    the norm, `history_length`, `return_best` (where the solver has one) and the
    termination. Traced values pass.

    Called at trace time with the initial iterate `y` (from `init`), it instead
    compares concrete tolerances with the precision of `y`'s dtype, warning with an
    `eqxdeq.ToleranceWarning` if they cannot be reached.
    """
    # (Imported here: this function is the only part of this module that uses it.)
    from .._validation import (
        check_bool,
        check_int,
        check_norm,
        check_real,
        check_termination_fields,
        check_tolerances,
    )

    if y is not None:
        if is_python_number(solver.rtol) and is_python_number(solver.atol):
            check_tolerances(name, solver.rtol, solver.atol, y)
        return
    for field in ("rtol", "atol"):
        check_real(name, field, getattr(solver, field), lower=0)
    check_norm(name, solver.norm, type(solver), rtol=solver.rtol, atol=solver.atol)
    check_int(name, "history_length", solver.history_length, minimum=0)
    if hasattr(solver, "return_best"):
        check_bool(name, "return_best", solver.return_best)
    if not isinstance(solver.termination, Termination):
        raise ValueError(
            f"`{name}(termination=...)` must be an `eqxdeq.Termination`, got "
            f"{type(solver.termination).__name__}."
        )
    check_termination_fields(solver.termination)
