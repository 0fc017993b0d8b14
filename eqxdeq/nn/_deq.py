"""`eqxdeq.nn.DEQ`: an equinox layer whose output is the fixed point of a cell."""

from collections.abc import Callable, Sequence
from typing import Any, overload

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optimistix as optx
from jax.core import Tracer
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from .._adjoint import ImplicitAdjoint, PhantomAdjoint
from .._fixed_point import fixed_point
from .._results import RESULTS
from .._validation import check_bool
from ..regularization import jacobian_spectral_radius
from ._init import _cast_like, _matches, _struct, AbstractInit, Predictor, Zeros
from ._norm import remove_norm, reset_norm


def _cell_fn(z, args):
    cell, x, key = args
    return cell(z, x, key=key)


class DEQStats(eqx.Module):
    """What a trainer logs about a DEQ solve (per sample under `jax.vmap`).

    All fields but `init_loss` carry no gradient.

    | field | meaning | torchdeq |
    | --- | --- | --- |
    | `num_steps` | solver steps taken | `nstep` (of the solve) |
    | `num_fn_evals` | evaluations of the cell | |
    | `abs_residual`, `rel_residual` | $\\lVert f(z)-z\\rVert_2$ and that over $\\lVert f(z)\\rVert_2$ at the returned $z$ | `abs_trace[-1]`, `rel_trace[-1]` |
    | `abs_lowest`, `rel_lowest` | the smallest absolute residual seen, and the relative residual there (NaN where the solver does not track it) | `abs_lowest`, `rel_lowest` |
    | `nstep` | the step at which the returned iterate was reached (exact with a residual history; else `num_steps`) | `nstep` |
    | `residual_history` | $\\lVert f(z)-z\\rVert_2$ per evaluation, NaN-padded, or `None` | `abs_trace` |
    | `spectral_radius` | power-iteration estimate of $\\rho(\\partial f/\\partial z)$ at $z^\\star$, or `None` | `sradius` |
    | `result` | the precise [`eqxdeq.RESULTS`][] of the solve | |
    | `init_loss` | SkipDEQ's $\\lVert z_0 - \\operatorname{sg}(z^\\star)\\rVert^2/n$ for a [`eqxdeq.nn.Predictor`][] initial state, else 0 | |
    """  # noqa: E501

    num_steps: Int[Array, ""]
    num_fn_evals: Int[Array, ""]
    abs_residual: Float[Array, ""]
    rel_residual: Float[Array, ""]
    abs_lowest: Float[Array, ""]
    rel_lowest: Float[Array, ""]
    nstep: Int[Array, ""]
    residual_history: Float[Array, " history"] | None
    spectral_radius: Float[Array, ""] | None
    result: RESULTS
    init_loss: Float[Array, ""]

    @property
    def successful(self) -> Bool[Array, "*batch"]:
        """Whether the solve met its tolerance (per sample under `jax.vmap`)."""
        return self.result == RESULTS.successful


def _stats_from_solution(sol, init_loss, spectral_radius, solver) -> DEQStats:
    stats = sol.stats
    nan = jnp.array(jnp.nan, init_loss.dtype)
    abs_residual = stats.get("abs_residual", nan)
    num_steps = stats["num_steps"]
    history = stats.get("residual_history")
    result = stats.get("result", RESULTS.promote(sol.result))
    # A converged solve, or a solver without `return_best`, returns its last iterate;
    # an unconverged `return_best` solve the one of smallest residual.
    if history is None or not getattr(solver, "return_best", True):
        nstep = num_steps
    else:
        best = jnp.argmin(jnp.where(jnp.isnan(history), jnp.inf, history)) + 1
        best = jnp.minimum(best, num_steps).astype(num_steps.dtype)
        nstep = jnp.where(result == RESULTS.successful, num_steps, best)
    out = DEQStats(
        num_steps=num_steps,
        num_fn_evals=stats.get("num_fn_evals", num_steps),
        abs_residual=abs_residual,
        rel_residual=stats.get("rel_residual", nan),
        abs_lowest=stats.get("best_abs_residual", abs_residual),
        rel_lowest=stats.get("best_rel_residual", nan),
        nstep=nstep,
        residual_history=history,
        spectral_radius=spectral_radius,
        result=result,
        init_loss=init_loss,
    )
    # Everything but the SkipDEQ loss is for logging.
    dynamic, static = eqx.partition(out, eqx.is_inexact_array)
    dynamic = eqx.tree_at(lambda s: s.init_loss, lax.stop_gradient(dynamic), init_loss)
    return eqx.combine(dynamic, static)


def _untrainable(tree):
    """`tree` with its concrete scalar floating arrays as Python scalars.

    optimistix stores e.g. `LearningRate(learning_rate)` (in every eqxdeq solver) as a
    weakly typed 0-d array: inside a `DEQ` it would count as a parameter for
    `eqx.filter(model, eqx.is_inexact_array)`, so an optimiser would update the
    solver (weight decay shrinks its step) and flip its weak type (a recompilation of
    the training step). As a Python scalar it is a static setting of the solver.
    """

    def leaf(x):
        if eqx.is_inexact_array(x) and jnp.ndim(x) == 0 and not isinstance(x, Tracer):
            return x.item()
        return x

    return jtu.tree_map(leaf, tree)


def _mean_square(x, y):
    leaves = [jnp.sum(jnp.square(a - b)) for a, b in zip(*map(jtu.tree_leaves, (x, y)))]
    size = sum(a.size for a in jtu.tree_leaves(x))
    return sum(leaves) / size


class DEQ(eqx.Module):
    r"""A deep equilibrium layer: $z^\star = f(z^\star, x)$ for a cell $f$.

    Calling it solves the fixed point with [`eqxdeq.fixed_point`][] (that is,
    [`optimistix.fixed_point`][] with precise errors) and the given solver and
    adjoint, and returns $z^\star$ with its [`eqxdeq.nn.DEQStats`][]:

    ```python
    z_star, stats = deq(x, key=key)
    ```

    The cell is called as `cell(z, x, key=key)`, with **one key per solve** (the same
    at every iteration), so dropout inside the cell (e.g.
    [`eqxdeq.nn.VariationalDropout`][]) applies one mask throughout the solve and $f$
    is a fixed function with a fixed point. The cell is passed to the solve as part of
    `args`, so gradients reach its parameters through the adjoint.

    Like equinox's layers, `DEQ` acts on **one sample**: use `jax.vmap` over a batch,
    which solves every sample to its own tolerance with its own Anderson mixing,
    where solving the whole batch as one state waits for the worst sample and mixes
    all samples with one set of coefficients (the batching guide has measurements).
    A cell that accepts a batch also works unbatched, solving the batch as one state.

    **Training and inference.** `inference=True` (or [`equinox.nn.inference_mode`][])
    switches to `inference_solver` and `inference_max_steps` where given — torchdeq's
    `eval_f_max_iter` / `eval_factor`: usually more steps or a tighter tolerance at
    test time. A runtime `step_budget=` (a traced integer) caps the steps without
    recompiling.

    **Stateful cells.** With spectral normalisation
    ([`eqxdeq.nn.apply_norm`][]`(cell, "spectral")`), call `deq(x, state, key=key)`;
    it advances the power iteration once per call (not per iteration: the solve sees
    one fixed normalised weight) unless in inference mode, and returns
    `(z_star, stats, state)`.

    Solves use `throw=False` by default: a training step should not raise on one
    sample that did not converge; read `stats.result` / `stats.successful` instead.
    """

    cell: Callable
    latent: Any
    solver: optx.AbstractFixedPointSolver = eqx.field(converter=_untrainable)
    adjoint: optx.AbstractAdjoint = eqx.field(
        default=ImplicitAdjoint(), converter=_untrainable
    )
    init: AbstractInit = Zeros()
    max_steps: int = eqx.field(default=64, static=True)
    inference_solver: optx.AbstractFixedPointSolver | None = eqx.field(
        default=None, converter=_untrainable
    )
    inference_max_steps: int | None = eqx.field(default=None, static=True)
    spectral_radius_iters: int = eqx.field(default=0, static=True)
    throw: bool = eqx.field(default=False, static=True)
    inference: bool = False

    def __check_init__(self):
        if not callable(self.cell):
            raise ValueError("`DEQ(cell=...)` must be callable as cell(z, x, key=...).")
        if not isinstance(self.solver, optx.AbstractFixedPointSolver):
            raise ValueError(
                "`DEQ(solver=...)` must be an `optimistix.AbstractFixedPointSolver` "
                f"(e.g. `eqxdeq.Anderson(rtol, atol)`), got {type(self.solver)}."
            )
        if self.inference_solver is not None and not isinstance(
            self.inference_solver, optx.AbstractFixedPointSolver
        ):
            raise ValueError(
                "`DEQ(inference_solver=...)` must be None or an "
                "`optimistix.AbstractFixedPointSolver`."
            )
        if not isinstance(self.adjoint, optx.AbstractAdjoint):
            raise ValueError(
                "`DEQ(adjoint=...)` must be an `optimistix.AbstractAdjoint`, got "
                f"{type(self.adjoint)}."
            )
        if not isinstance(self.init, AbstractInit):
            raise ValueError(
                "`DEQ(init=...)` must be an `eqxdeq.nn.AbstractInit` (`Zeros()`, "
                "`HalfNormal()`, `Predictor(module)`); pass a given state as "
                "`deq(x, z0=...)` instead."
            )
        for name in ("max_steps", "inference_max_steps"):
            value = getattr(self, name)
            if value is None and name == "inference_max_steps":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`DEQ({name}=...)` must be a positive int.")
        if (
            not isinstance(self.spectral_radius_iters, int)
            or isinstance(self.spectral_radius_iters, bool)
            or self.spectral_radius_iters < 0
        ):
            raise ValueError("`DEQ(spectral_radius_iters=...)` must be an int >= 0.")
        if not isinstance(self.throw, bool):
            raise ValueError(
                f"`DEQ(throw=...)` must be True or False, got {self.throw!r}."
            )
        check_bool("DEQ", "inference", self.inference)
        _check_latent(self.latent)

    def _struct(self, x):
        latent = self.latent
        if _is_shape(latent):
            leaves = jtu.tree_leaves(x)
            dtype = jnp.result_type(leaves[0]) if leaves else jnp.result_type(float)
            if not jnp.issubdtype(dtype, jnp.inexact):
                dtype = jnp.result_type(float)
            return jax.ShapeDtypeStruct(tuple(latent), dtype)
        return _struct(latent)

    def _settings(self, inference):
        if inference:
            solver = self.inference_solver or self.solver
            max_steps = self.inference_max_steps or self.max_steps
        else:
            solver, max_steps = self.solver, self.max_steps
        return solver, max_steps

    def _prepare(self, x, state, z0, key, inference):
        """The (stateless) cell, the new state, the initial state and the solve key."""
        inference = self.inference if inference is None else inference
        cell = self.cell
        if state is not None:
            if not inference:
                state = reset_norm(cell, state)
            cell = remove_norm(cell, state)
        struct = self._struct(x)
        init_key = solve_key = None
        if key is not None:
            init_key, solve_key = jr.split(key)
        if z0 is None:
            z0 = self.init(x, struct, key=init_key)
        elif not _matches(z0, struct):
            raise ValueError(
                f"`deq(x, z0=...)`: `z0` must have the DEQ's state structure {struct}, "
                f"got {jax.eval_shape(lambda: z0)}."
            )
        else:
            z0 = _cast_like(z0, struct)
        return cell, state, z0, solve_key, inference

    def _finish(self, sol, cell, x, z0, key, state, solver):
        z_star = sol.value
        if isinstance(self.init, Predictor):
            init_loss = _mean_square(z0, lax.stop_gradient(z_star))
        else:
            init_loss = jnp.zeros((), _float_dtype(z_star))
        radius = None
        if self.spectral_radius_iters > 0:
            frozen = _stop_gradient((cell, x, z_star))
            radius = jacobian_spectral_radius(
                lambda z: frozen[0](z, frozen[1], key=key),
                frozen[2],
                key=jr.PRNGKey(0) if key is None else jr.fold_in(key, 1),
                num_iters=self.spectral_radius_iters,
            )
        stats = _stats_from_solution(sol, init_loss, radius, solver)
        if state is None:
            return z_star, stats
        return z_star, stats, state

    @overload
    def __call__(
        self,
        x: PyTree[Array],
        state: None = None,
        *,
        key: PRNGKeyArray | None = None,
        z0: PyTree[Array] | None = None,
        step_budget: int | Int[Array, ""] | None = None,
        inference: bool | None = None,
    ) -> tuple[PyTree[Array], DEQStats]: ...

    @overload
    def __call__(
        self,
        x: PyTree[Array],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        z0: PyTree[Array] | None = None,
        step_budget: int | Int[Array, ""] | None = None,
        inference: bool | None = None,
    ) -> tuple[PyTree[Array], DEQStats, eqx.nn.State]: ...

    def __call__(
        self,
        x: PyTree[Array],
        state: eqx.nn.State | None = None,
        *,
        key: PRNGKeyArray | None = None,
        z0: PyTree[Array] | None = None,
        step_budget: int | Int[Array, ""] | None = None,
        inference: bool | None = None,
    ):
        """**Arguments:**

        - `x`: the input (one sample), passed to the cell at every iteration.
        - `state`: the [`equinox.nn.State`][] of a cell with spectral normalisation,
            or `None`.
        - `key`: a PRNG key: split into one for the initial state and one passed to
            the cell at every iteration of this solve. Optional for deterministic
            cells and initial states.
        - `z0`: a given initial state (e.g. the previous solution, for warm
            starts); overrides `init`.
        - `step_budget`: at most this many solver steps (a traced integer: changing
            it does not recompile; eqxdeq solvers only).
        - `inference`: overrides the `inference` field for this call.

        **Returns:**

        `(z_star, stats)` with `stats` a [`eqxdeq.nn.DEQStats`][], or
        `(z_star, stats, state)` if `state` was given.
        """
        cell, state, z0, key, inference = self._prepare(x, state, z0, key, inference)
        solver, max_steps = self._settings(inference)
        options = {} if step_budget is None else {"step_budget": step_budget}
        sol = fixed_point(
            _cell_fn,
            solver,
            z0,
            (cell, x, key),
            options=options,
            max_steps=max_steps,
            adjoint=self.adjoint,
            throw=self.throw,
        )
        return self._finish(sol, cell, x, z0, key, state, solver)

    @overload
    def trajectory(
        self,
        x: PyTree[Array],
        state: None = None,
        *,
        n_states: int = 2,
        indexing: Sequence[int] | None = None,
        correction_adjoint: optx.AbstractAdjoint = ...,
        key: PRNGKeyArray | None = None,
        z0: PyTree[Array] | None = None,
        inference: bool | None = None,
    ) -> tuple[tuple[PyTree[Array], ...], DEQStats]: ...

    @overload
    def trajectory(
        self,
        x: PyTree[Array],
        state: eqx.nn.State,
        *,
        n_states: int = 2,
        indexing: Sequence[int] | None = None,
        correction_adjoint: optx.AbstractAdjoint = ...,
        key: PRNGKeyArray | None = None,
        z0: PyTree[Array] | None = None,
        inference: bool | None = None,
    ) -> tuple[tuple[PyTree[Array], ...], DEQStats, eqx.nn.State]: ...

    def trajectory(
        self,
        x: PyTree[Array],
        state: eqx.nn.State | None = None,
        *,
        n_states: int = 2,
        indexing: Sequence[int] | None = None,
        correction_adjoint: optx.AbstractAdjoint = PhantomAdjoint(
            steps=1, mode="unroll"
        ),
        key: PRNGKeyArray | None = None,
        z0: PyTree[Array] | None = None,
        inference: bool | None = None,
    ):
        r"""Solve while sampling intermediate states, for **fixed-point
        correction** (torchdeq's `n_states` / `indexing` / `DEQSliced`).

        The solve is cut into segments at the cumulative step counts `indexing`
        (default: `n_states` equal segments of `max_steps`). Each segment is one
        `eqxdeq.fixed_point` call started from the previous segment's state (without
        gradient) with that many steps; the state it ends at gets the gradient of
        `correction_adjoint` (default: one unrolled step, a phantom gradient), and the
        last segment is the real solve with the layer's `adjoint`. A solve that
        converges early makes every later segment return immediately.

        Combine the losses of the states with
        [`eqxdeq.regularization.fixed_point_correction`][].

        **Arguments:** as for `__call__`, plus

        - `n_states`: the number of states returned (≥ 1), when `indexing` is None.
        - `indexing`: increasing cumulative step counts at which states are taken;
            the last state is always the full solve (`max_steps`).
        - `correction_adjoint`: the gradient attached to every state but the last.

        **Returns:**

        `(states, stats)` (or `(states, stats, state)`), with `states` a tuple of
        `len(indexing) + 1` (or `n_states`) states, the last one $z^\star$, and `stats`
        those of the last segment (`num_fn_evals`, `num_steps` and `nstep` counted
        over all).
        """
        cell, state, z0, key, inference = self._prepare(x, state, z0, key, inference)
        solver, max_steps = self._settings(inference)
        bounds = _segment_bounds(n_states, indexing, max_steps)
        states, z, evals, steps = [], z0, 0, 0
        start = 0
        for bound in bounds[:-1]:
            sol = fixed_point(
                _cell_fn,
                solver,
                lax.stop_gradient(z),
                (cell, x, key),
                max_steps=bound - start,
                adjoint=correction_adjoint,
                throw=False,
            )
            evals = evals + sol.stats.get("num_fn_evals", sol.stats["num_steps"])
            steps = steps + sol.stats["num_steps"]
            z, start = sol.value, bound
            states.append(z)
        sol = fixed_point(
            _cell_fn,
            solver,
            lax.stop_gradient(z),
            (cell, x, key),
            max_steps=max_steps - start,
            adjoint=self.adjoint,
            throw=self.throw,
        )
        out = self._finish(sol, cell, x, z0, key, state, solver)
        stats = out[1]
        stats = eqx.tree_at(
            lambda s: (s.num_fn_evals, s.num_steps, s.nstep),
            stats,
            (stats.num_fn_evals + evals, stats.num_steps + steps, stats.nstep + steps),
        )
        states.append(out[0])
        return (tuple(states), stats) + out[2:]


DEQ.__init__.__doc__ = r"""**Arguments:**

- `cell`: the layer $f$, called as `cell(z, x, key=key)` and returning a state of the
    same structure as `z`; usually an equinox module (its parameters are trained).
- `latent`: the state's structure: a shape tuple (the state is then one array of the
    input's floating dtype) or a pytree of `jax.ShapeDtypeStruct`s (e.g. a tuple of
    resolutions for a multiscale DEQ).
- `solver`: any [`optimistix.AbstractFixedPointSolver`][], e.g.
    `eqxdeq.Anderson(rtol=1e-4, atol=1e-4)`. Its scalar array fields (such as
    optimistix's `LearningRate`) are stored as Python scalars, so that the solvers
    and adjoint are not trainable parameters of the layer.
- `adjoint`: any [`optimistix.AbstractAdjoint`][]; default
    [`eqxdeq.ImplicitAdjoint`][]`()`. [`eqxdeq.JFB`][] and
    [`eqxdeq.PhantomAdjoint`][] are cheaper, approximate alternatives.
- `init`: the initial-state policy: [`eqxdeq.nn.Zeros`][]`()` (default),
    [`eqxdeq.nn.HalfNormal`][]`(scale)` or [`eqxdeq.nn.Predictor`][]`(module)`
    (SkipDEQ). A given state is passed at call time as `z0=`.
- `max_steps`: the solver's step limit in training.
- `inference_solver`, `inference_max_steps`: used instead in inference mode (e.g.
    more steps, or a tighter tolerance); `None` keeps the training settings.
- `spectral_radius_iters`: if positive, `stats.spectral_radius` estimates the
    spectral radius of $\partial f/\partial z$ at $z^\star$ by this many power
    iterations (torchdeq's `sradius_mode`); costs that many Jacobian-vector products.
- `throw`: passed to [`eqxdeq.fixed_point`][]: `True` raises on a failed solve, with
    eqxdeq's precise reason (e.g. a stall rather than a divergence); default `False`
    (read `stats.result`).
- `inference`: the inference flag, as for [`equinox.nn.Dropout`][].
"""


def _is_shape(latent) -> bool:
    return isinstance(latent, tuple) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in latent
    )


def _check_latent(latent):
    if _is_shape(latent):
        return
    leaves = jtu.tree_leaves(latent)
    if not leaves or not all(isinstance(s, jax.ShapeDtypeStruct) for s in leaves):
        raise ValueError(
            "`DEQ(latent=...)` must be a shape tuple such as `(64,)` or a pytree of "
            f"`jax.ShapeDtypeStruct`s, got {latent!r}."
        )
    if not all(jnp.issubdtype(s.dtype, jnp.inexact) for s in leaves):
        raise ValueError("`DEQ(latent=...)` must have floating (or complex) dtypes.")


def _float_dtype(tree):
    dtypes = [jnp.finfo(x.dtype).dtype for x in jtu.tree_leaves(tree)]
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes)


def _stop_gradient(tree):
    """`lax.stop_gradient` on the floating arrays of `tree`, other leaves as they are
    (a module's Python bools and ints must stay Python values)."""
    dynamic, static = eqx.partition(tree, eqx.is_inexact_array)
    return eqx.combine(lax.stop_gradient(dynamic), static)


def _segment_bounds(n_states, indexing, max_steps) -> list[int]:
    if indexing is None:
        if not isinstance(n_states, int) or n_states < 1:
            raise ValueError("`DEQ.trajectory(n_states=...)` must be an int >= 1.")
        bounds = [round(max_steps * (i + 1) / n_states) for i in range(n_states)]
    else:
        bounds = [int(i) for i in indexing] + [max_steps]
    if any(b <= a for a, b in zip([0] + bounds, bounds)) or bounds[-1] != max_steps:
        raise ValueError(
            "`DEQ.trajectory(indexing=...)` must be strictly increasing step counts "
            f"between 1 and max_steps={max_steps} (exclusive); got {list(indexing)}."
            if indexing is not None
            else f"`DEQ.trajectory(n_states={n_states})` exceeds max_steps={max_steps}."
        )
    return bounds
