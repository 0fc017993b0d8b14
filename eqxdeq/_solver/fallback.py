from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Int, PyTree, Scalar

from .._custom_types import Aux, Y
from .._misc import tree_where
from ._base import AbstractDescentSearchSolver


class _FallbackState(eqx.Module):
    stage: Int[Array, ""]
    num_steps: Int[Array, ""]
    states: tuple[Any, ...]


def _select(index, trees):
    """`trees[index]` for a traced `index`, for trees of one structure."""
    out = trees[-1]
    for i in range(len(trees) - 2, -1, -1):
        out = tree_where(index == i, trees[i], out)
    return out


class Fallback(optx.AbstractFixedPointSolver[Y, Aux, _FallbackState]):
    r"""A polyalgorithm: run a cheap solver and, when it fails, continue with a
    stronger one from the best point found so far.

    ```python
    solver = eqxdeq.Fallback(
        eqxdeq.Anderson(1e-5, 1e-5, termination=eqxdeq.Termination(stall_patience=20)),
        eqxdeq.NewtonKrylov(1e-5, 1e-5),
    )
    ```

    **Policy.** Stage $i$ runs until it converges (the solve ends successfully), or
    *fails*: its [`eqxdeq.Termination`][] detects divergence or a stall, or it has
    taken `stage_steps[i]` steps. On failure the next stage starts from the best
    iterate of the failed one (its smallest $\|f(y) - y\|_2$; the last accepted
    iterate if that stage has `return_best=False`), reusing the known residual
    there: no evaluation of $f$ is repeated, except that a stage whose descent
    needs the Jacobian (Newton–Krylov) linearises $f$ at that point, which counts
    as one evaluation. The last stage's failure ends the solve with its result.

    A Jacobian-descent stage also continues the *whole* solve's continuation:
    Newton–Krylov's pseudo-time step is referred to the residual at the start of the
    solve, not to the (smaller) residual at the handover.

    Each stage keeps its own tolerances and termination; `max_steps` of
    `optx.fixed_point` and `options["step_budget"]` bound the total. Every stage is
    compiled once: switching never recompiles, and under `jax.vmap` each sample
    switches on its own. (Under `jax.vmap` the stage is a batched index, so every
    step computes the step of every stage for all samples and selects: a step costs
    the sum of the stages' costs. Bound the cheap stage with `stage_steps`.)

    `sol.stats` holds the common statistics (summed over stages for the counts,
    and those of the final stage for the residuals), any stage-specific keys (e.g.
    `num_jvps`), `stage` (the index of the stage that ended the solve) and
    `stage_fn_evals` (evaluations per stage).
    """

    solvers: tuple[AbstractDescentSearchSolver[Y, Aux], ...]
    stage_steps: tuple[int | None, ...]
    # optimistix's interface; each stage uses its own.
    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]

    def __init__(
        self,
        # (Annotated loosely so that `__check_init__` can explain what is allowed.)
        *solvers: optx.AbstractFixedPointSolver,
        stage_steps: tuple[int | None, ...] | None = None,
    ):
        self.solvers = tuple(solvers)  # pyright: ignore[reportAttributeAccessIssue]
        if stage_steps is None:
            stage_steps = (None,) * len(self.solvers)
        self.stage_steps = tuple(stage_steps)
        self.rtol = self.solvers[-1].rtol if self.solvers else 0.0
        self.atol = self.solvers[-1].atol if self.solvers else 0.0
        self.norm = self.solvers[-1].norm if self.solvers else optx.max_norm

    def __check_init__(self):
        if len(self.solvers) < 2:
            raise ValueError("`Fallback(*solvers)` needs at least two solvers.")
        for solver in self.solvers:
            if not isinstance(solver, AbstractDescentSearchSolver):
                raise ValueError(
                    "`Fallback(*solvers)` takes eqxdeq descent+search solvers "
                    f"(Picard, Anderson, Broyden, NewtonKrylov, ...), not "
                    f"{type(solver).__name__}."
                )
        if len(self.stage_steps) != len(self.solvers):
            raise ValueError(
                "`Fallback(stage_steps=...)` must have one entry per solver."
            )
        for steps in self.stage_steps:
            if steps is not None and not (isinstance(steps, int) and steps >= 1):
                raise ValueError(
                    "`Fallback(stage_steps=...)` entries must be None or ints >= 1."
                )

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        states = tuple(
            s.init(fn, y, args, options, f_struct, aux_struct, tags)
            for s in self.solvers
        )
        zero = jnp.array(0)
        return _FallbackState(stage=zero, num_steps=zero, states=states)

    def _failed(self, index: int, state) -> Array:
        failed = (state.diverged | state.stalled) & jnp.logical_not(state.converged)
        limit = self.stage_steps[index]
        if limit is not None:
            failed = failed | (
                jnp.logical_not(state.converged) & (state.num_fn_evals >= limit)
            )
        return failed

    def step(self, fn, y, args, options, state: _FallbackState, tags):
        def run_stage(i):
            def branch(states):
                new_y, stage_state, aux = self.solvers[i].step(
                    fn, y, args, options, states[i], tags
                )
                states = states[:i] + (stage_state,) + states[i + 1 :]
                return new_y, states, aux

            return branch

        new_y, states, aux = lax.switch(
            state.stage, [run_stage(i) for i in range(len(self.solvers))], state.states
        )

        def handover(i):
            def branch(operand):
                new_y, states, aux = operand
                if i == len(self.solvers) - 1:
                    return jnp.array(i), new_y, states, aux
                current = self.solvers[i]
                failed = self._failed(i, states[i])
                point_y, point_g, point_aux = current.handover_point(new_y, states[i])
                resumed = self.solvers[i + 1].resume(
                    point_y,
                    point_g,
                    point_aux,
                    states[i + 1],
                    states[i].initial_residual,
                )
                next_states = states[: i + 1] + (resumed,) + states[i + 2 :]
                states = tree_where(failed, next_states, states)
                new_y = tree_where(failed, point_y, new_y)
                aux = tree_where(failed, point_aux, aux)
                return jnp.where(failed, i + 1, i), new_y, states, aux

            return branch

        stage, new_y, states, aux = lax.switch(
            state.stage,
            [handover(i) for i in range(len(self.solvers))],
            (new_y, states, aux),
        )
        new_state = _FallbackState(
            stage=stage, num_steps=state.num_steps + 1, states=states
        )
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state: _FallbackState, tags):
        results = [
            s.terminate(fn, y, args, options, st, tags)
            for s, st in zip(self.solvers, state.states, strict=True)
        ]
        terminate = _select(state.stage, [t for t, _ in results])
        result = _select(state.stage, [r for _, r in results])
        budget = options.get("step_budget", None)
        if budget is not None:
            out_of_budget = jnp.logical_not(terminate) & (state.num_steps >= budget)
            result = optx.RESULTS.where(
                out_of_budget, optx.RESULTS.nonlinear_max_steps_reached, result
            )
            terminate = terminate | out_of_budget
        return terminate, result

    def postprocess(
        self, fn, y, aux, args, options, state: _FallbackState, tags, result
    ):
        outputs: list[tuple[Any, Any, dict[str, Any]]] = [
            s.postprocess(fn, y, aux, args, options, st, tags, result)
            for s, st in zip(self.solvers, state.states, strict=True)
        ]
        stage = state.stage
        y_out: Y = _select(stage, [out[0] for out in outputs])
        aux_out: Aux = _select(stage, [out[1] for out in outputs])
        all_stats = [out[2] for out in outputs]
        common = set.intersection(*(set(s) for s in all_stats))
        stats: dict[str, PyTree] = {}
        summed = ("num_fn_evals", "num_accepted_steps")
        for key in sorted(common):
            values = [s[key] for s in all_stats]
            if key in summed:
                stats[key] = sum(values)
            elif key == "residual_history":
                stats[key] = values[0]  # only the first stage's history
            else:
                stats[key] = _select(stage, values)
        for s in all_stats:
            for key, value in s.items():
                if key not in common:
                    stats[key] = value
        stats["stage"] = stage
        stats["stage_fn_evals"] = jnp.stack([s["num_fn_evals"] for s in all_stats])
        return y_out, aux_out, stats


Fallback.__init__.__doc__ = """**Arguments:**

- `*solvers`: two or more eqxdeq solvers (subclasses of
    [`eqxdeq.AbstractDescentSearchSolver`][]), cheapest first. For a stall to hand
    over, give the early stages `Termination(stall_patience=...)`.
- `stage_steps`: optionally, per stage, the number of steps after which an
    unconverged stage hands over (`None`: no limit).
"""
