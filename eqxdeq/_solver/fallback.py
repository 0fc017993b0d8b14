from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from .._custom_types import Aux, Fn, Y
from .._misc import tree_where, ω
from .._termination import AbstractProgressSolver, BASIC_OPTIONS, check_options
from ._base import AbstractDescentSearchSolver


class _FallbackState(eqx.Module):
    stage: Int[Array, ""]  # the stage running now
    stage_num_steps: Int[Array, " stages"]  # steps taken by each stage
    num_steps: Int[Array, ""]
    terminate: Bool[Array, ""]  # the running stage's `terminate`, after its step
    result: optx.RESULTS
    states: tuple[Any, ...]


def _handover_options(solver: optx.AbstractFixedPointSolver) -> tuple[str, ...]:
    """The `options` through which a stage can continue another's solve."""
    if isinstance(solver, AbstractDescentSearchSolver):
        return ("y0_evaluation", "reference_residual")
    if isinstance(solver, AbstractProgressSolver):
        return ("reference_residual",)
    return ()


def _concatenate_histories(histories, counts):
    """The stages' residual histories, one after the other, each cut at its
    number of evaluations, NaN-padded to their total length."""
    position, offset = [], jnp.array(0)
    for history, count in zip(histories, counts, strict=True):
        index = jnp.arange(history.shape[0])
        position.append(jnp.where(index < count, offset + index, jnp.iinfo(int).max))
        offset = offset + count
    values = jnp.concatenate(histories)
    order = jnp.argsort(jnp.concatenate(position), stable=True)
    keep = jnp.sort(jnp.concatenate(position)) < jnp.iinfo(int).max
    return jnp.where(keep, values[order], jnp.nan)


class Fallback(optx.AbstractFixedPointSolver[Y, Aux, _FallbackState]):
    r"""A polyalgorithm: run a cheap solver and, when it fails, continue with a
    stronger one from the best point found so far.

    ```python
    solver = eqxdeq.Fallback(
        eqxdeq.Anderson(1e-5, 1e-5, termination=eqxdeq.Termination(stall_patience=20)),
        eqxdeq.NewtonKrylov(1e-5, 1e-5),
    )
    ```

    **Policy.** Stage $i$ runs until its own `terminate` ends it: successfully (the
    solve ends), or with a failure — for an eqxdeq solver, its
    [`eqxdeq.Termination`][] detects divergence or a stall — or until it has taken
    `stage_steps[i]` steps. Then the next stage starts from the failed stage's best
    iterate. The last stage's failure ends the solve with its result.

    **Stages** are any `optimistix.AbstractFixedPointSolver`s. They talk to
    `Fallback` through optimistix's solver interface (`init`, `step`, `terminate`,
    `postprocess`) and, for eqxdeq's solvers
    ([`eqxdeq.AbstractProgressSolver`][]s), the [`eqxdeq.Progress`][] in their state
    and two `options`:

    - the handover point is the best iterate in the failed stage's `Progress` (its
        smallest $\|f(y) - y\|_2$), or, for a stage that keeps none
        (`return_best=False`, [`eqxdeq.Reversible`][], optimistix's solvers), its
        last iterate;
    - a descent+search stage (Picard, Anderson, Broyden, ...) taking over from a
        best iterate gets `options["y0_evaluation"]`, the residual already known
        there, and evaluates nothing again; a stage whose descent needs the
        Jacobian (Newton–Krylov) linearises $f$ there, one evaluation; other stages
        evaluate $f$ at the handover point once more;
    - every eqxdeq stage gets `options["reference_residual"]`, the residual at the
        start of the whole solve: the reference for divergence, and for
        Newton–Krylov's pseudo-time continuation (restarting it from the smaller
        handover residual would crawl).

    Optimistix's fixed-point solvers (e.g. `optx.FixedPointIteration`) never report
    a failure, so as early stages they hand over only after `stage_steps`. Root
    finders, minimisers and least-squares solvers cannot be stages: they solve a
    different problem than the fixed-point map they would be given.

    Each stage keeps its own tolerances and termination; `max_steps` of
    `optx.fixed_point` and `options["step_budget"]` bound the total. Every stage is
    compiled once and each step runs one `lax.switch` on the stage: switching never
    recompiles, and under `jax.vmap` each sample switches on its own. (Under
    `jax.vmap` the stage is a batched index, so every step computes the step of
    every stage for all samples and selects: a step costs the sum of the stages'
    costs. Bound the cheap stage with `stage_steps`.)

    `sol.stats` holds the common statistics (summed over stages for the counts,
    those of the final stage for the residuals, the stages' residual histories one
    after the other), any stage-specific keys (e.g. `num_jvps`), `stage` (the index
    of the stage that ended the solve), `stage_fn_evals` and `stage_num_steps`
    (per stage; `stage_fn_evals` is -1 for a stage that does not count its
    evaluations, such as optimistix's solvers), and `stages`, a tuple of every
    stage's own `sol.stats`.
    """

    solvers: tuple[optx.AbstractFixedPointSolver, ...]
    stage_steps: tuple[int | None, ...]

    def __init__(
        self,
        # (Annotated loosely so that `__check_init__` can explain what is allowed.)
        *solvers: optx.AbstractIterativeSolver,
        stage_steps: tuple[int | None, ...] | None = None,
    ):
        self.solvers = tuple(solvers)  # pyright: ignore[reportAttributeAccessIssue]
        if stage_steps is None:
            stage_steps = (None,) * len(self.solvers)
        self.stage_steps = tuple(stage_steps)

    def __check_init__(self):
        if len(self.solvers) < 2:
            raise ValueError("`Fallback(*solvers)` needs at least two solvers.")
        for solver in self.solvers:
            if not isinstance(solver, optx.AbstractFixedPointSolver):
                raise ValueError(
                    "`Fallback(*solvers)` takes fixed-point solvers (eqxdeq's, or "
                    "optimistix's `AbstractFixedPointSolver`s), not "
                    f"{type(solver).__name__}: a root finder, minimiser or "
                    "least-squares solver solves a different problem than the "
                    "fixed-point map a stage is given."
                )
        if len(self.stage_steps) != len(self.solvers):
            raise ValueError(
                "`Fallback(stage_steps=...)` must have one entry per solver, got "
                f"{len(self.stage_steps)} for {len(self.solvers)} solvers."
            )
        for steps in self.stage_steps:
            if steps is not None and not (
                isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
            ):
                raise ValueError(
                    "`Fallback(stage_steps=...)` entries must be None or ints >= 1, "
                    f"got {steps!r}."
                )

    # optimistix's interface: the tolerances of the last stage, which end the solve.
    @property
    def rtol(self) -> float:
        return self.solvers[-1].rtol

    @property
    def atol(self) -> float:
        return self.solvers[-1].atol

    @property
    def norm(self) -> Callable[[PyTree], Scalar]:  # pyright: ignore[reportIncompatibleMethodOverride]
        return self.solvers[-1].norm

    def init(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _FallbackState:
        check_options("Fallback", options, BASIC_OPTIONS)
        states = tuple(
            s.init(fn, y, args, {}, f_struct, aux_struct, tags) for s in self.solvers
        )
        zero = jnp.array(0)
        steps = jnp.zeros(len(self.solvers), int)
        terminate, result = self.solvers[0].terminate(fn, y, args, {}, states[0], tags)
        return _FallbackState(zero, steps, zero, terminate, result, states)

    def step(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _FallbackState,
        tags: frozenset[object],
    ) -> tuple[Y, _FallbackState, Aux]:
        del options
        num_stages = len(self.solvers)

        def run_stage(i: int):
            def branch(states):
                solver = self.solvers[i]
                new_y, stage_state, aux = solver.step(fn, y, args, {}, states[i], tags)
                states = states[:i] + (stage_state,) + states[i + 1 :]
                terminate, result = solver.terminate(
                    fn, new_y, args, {}, stage_state, tags
                )
                stage_num_steps = state.stage_num_steps.at[i].add(1)
                stage = jnp.array(i)
                if i == num_stages - 1:
                    return new_y, aux, stage, stage_num_steps, terminate, result, states
                # Hand over on a failure, or after `stage_steps[i]` steps.
                converged = terminate & (result == optx.RESULTS.successful)
                failed = terminate & jnp.invert(converged)
                limit = self.stage_steps[i]
                if limit is not None:
                    failed = failed | (
                        jnp.invert(converged) & (stage_num_steps[i] >= limit)
                    )
                stay = (new_y, aux, stage, stage_num_steps, terminate, result, states)

                def hand_over(stay):
                    new_y, aux, _, stage_num_steps, _, _, states = stay
                    progress = None
                    if isinstance(solver, AbstractProgressSolver):
                        progress = states[i].progress
                    options_next = {}
                    following = self.solvers[i + 1]
                    allowed = _handover_options(following)
                    if progress is not None and progress.best is not None:
                        point, g, point_aux = progress.best
                        if "y0_evaluation" in allowed:
                            f = (point**ω + g**ω).ω
                            options_next["y0_evaluation"] = (f, point_aux)
                    else:
                        point, point_aux = new_y, aux
                    if progress is not None and "reference_residual" in allowed:
                        options_next["reference_residual"] = progress.initial_residual
                    next_state = following.init(
                        fn,
                        point,
                        args,
                        options_next,
                        jax.eval_shape(lambda: y),
                        jax.eval_shape(lambda: aux),
                        tags,
                    )
                    next_terminate, next_result = following.terminate(
                        fn, point, args, {}, next_state, tags
                    )
                    return (
                        point,
                        point_aux,
                        jnp.array(i + 1),
                        stage_num_steps,
                        next_terminate,
                        next_result,
                        states[: i + 1] + (next_state,) + states[i + 2 :],
                    )

                # A real branch: the next stage is set up only on the step that
                # hands over (under `jax.vmap`, as everywhere, both sides run).
                return lax.cond(failed, hand_over, lambda stay: stay, stay)

            return branch

        new_y, aux, stage, stage_num_steps, terminate, result, states = lax.switch(
            state.stage, [run_stage(i) for i in range(num_stages)], state.states
        )
        new_state = _FallbackState(
            stage=stage,
            stage_num_steps=stage_num_steps,
            num_steps=state.num_steps + 1,
            terminate=terminate,
            result=result,
            states=states,
        )
        return new_y, new_state, aux

    def terminate(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _FallbackState,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        del fn, y, args, tags
        terminate, result = state.terminate, state.result
        budget = options.get("step_budget", None)
        if budget is not None:
            out_of_budget = jnp.invert(terminate) & (state.num_steps >= budget)
            result = optx.RESULTS.where(
                out_of_budget, optx.RESULTS.nonlinear_max_steps_reached, result
            )
            terminate = terminate | out_of_budget
        return terminate, result

    def postprocess(
        self,
        fn: Fn,
        y: Y,
        aux: Aux,
        args: PyTree,
        options: dict[str, Any],
        state: _FallbackState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Aux, dict[str, Any]]:
        del options
        stage = state.stage
        outputs = []
        for i, (solver, stage_state) in enumerate(
            zip(self.solvers, state.states, strict=True)
        ):
            # An earlier stage ended with its own failure, or its `stage_steps`.
            done, own = solver.terminate(fn, y, args, {}, stage_state, tags)
            own = optx.RESULTS.where(
                done, own, optx.RESULTS.nonlinear_max_steps_reached
            )
            own = optx.RESULTS.where(stage == i, result, own)
            outputs.append(
                solver.postprocess(fn, y, aux, args, {}, stage_state, tags, own)
            )
        y_out, aux_out = outputs[-1][:2]
        for i in range(len(outputs) - 2, -1, -1):
            y_out, aux_out = tree_where(stage == i, outputs[i][:2], (y_out, aux_out))
        all_stats = [out[2] for out in outputs]
        stats: dict[str, Any] = {}
        common = set.intersection(*(set(s) for s in all_stats))
        for key in sorted(common):
            values = [s[key] for s in all_stats]
            if key in ("num_fn_evals", "num_accepted_steps"):
                stats[key] = sum(values)
            elif key == "residual_history":
                counts = [s["num_fn_evals"] for s in all_stats]
                stats[key] = _concatenate_histories(values, counts)
            else:
                out = values[-1]
                for i in range(len(values) - 2, -1, -1):
                    out = tree_where(stage == i, values[i], out)
                stats[key] = out
        for s in all_stats:
            for key, value in s.items():
                if key not in common:
                    stats[key] = value
        stats["stage"] = stage
        stats["stage_fn_evals"] = jnp.stack(
            [jnp.asarray(s.get("num_fn_evals", -1)) for s in all_stats]
        )
        stats["stage_num_steps"] = state.stage_num_steps
        stats["stages"] = tuple(all_stats)
        return y_out, aux_out, stats


Fallback.__init__.__doc__ = """**Arguments:**

- `*solvers`: two or more fixed-point solvers, cheapest first (see above for what
    each kind of stage can do). For a stall to hand over, give the early stages
    `Termination(stall_patience=...)`.
- `stage_steps`: optionally, per stage, the number of its steps after which an
    unconverged stage hands over (`None`: no limit).
"""
