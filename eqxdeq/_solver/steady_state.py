"""A continuous DEQ: the fixed point of `f` as the steady state of an ODE."""

from collections.abc import Callable
from typing import Any, cast, Generic

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from .._custom_types import Aux, Y
from .._misc import (
    from_view,
    is_python_number,
    merge_complex,
    stats_dtype,
    to_view,
    tree_allfinite,
    tree_where,
    tree_zeros_like_struct,
    two_norm,
    ω,
)
from .._termination import detailed_result, terminate_result, Termination
from ._base import check_solver_fields
from ._common import COMMON_ARGUMENTS_DOC


class _Counter:
    """Counts the evaluations of `f` traced by one call of a diffrax solver."""

    def __init__(self):
        self.count = 0


def _same_leaves(a: PyTree, b: PyTree) -> bool:
    """Whether two pytrees are the very same (traced) arrays: a trace-time check."""
    leaves_a, tree_a = jtu.tree_flatten(a)
    leaves_b, tree_b = jtu.tree_flatten(b)
    return tree_a == tree_b and all(x is y for x, y in zip(leaves_a, leaves_b))


class _ResidualTerm(diffrax.AbstractTerm):
    r"""The vector field $\mathrm{d}z/\mathrm{d}t = f(z) - z$ of a fixed-point problem.

    `z` is the iterate with every leaf cast to one real floating dtype (that of the
    time), complex leaves split into their real and imaginary parts (`to_view`), so
    that diffrax's solvers see a uniform, real pytree; `f` is called with the
    structure and dtypes of the iterate, `like`. Called at `cache[0]` itself (the
    same traced arrays) it returns `cache[1]`, the residual already known there,
    without evaluating `f`. Every other call evaluates `f` once and is counted in
    `counter` (at trace time).
    """

    fn: Callable
    cache: tuple[PyTree, PyTree] | None
    counter: _Counter
    like: PyTree[jax.ShapeDtypeStruct]

    def vf(self, t, y, args):
        del t
        if self.cache is not None and _same_leaves(y, self.cache[0]):
            return self.cache[1]
        self.counter.count += 1
        f, _ = self.fn(from_view(y, self.like), args)
        dtype = jtu.tree_leaves(y)[0].dtype
        return (to_view(f, dtype) ** ω - y**ω).ω

    def contr(self, t0, t1, **kwargs):
        del kwargs
        return t1 - t0

    def prod(self, vf, control):
        control = jnp.asarray(control)
        return jtu.tree_map(lambda v: control.astype(v.dtype) * v, vf)


def _tableau(solver: diffrax.AbstractRungeKutta) -> diffrax.ButcherTableau:
    tableau = solver.tableau
    assert isinstance(tableau, diffrax.ButcherTableau)  # checked in __check_init__
    return tableau


def _like(new: PyTree, old: PyTree) -> PyTree:
    """Cast the array leaves of `new` to the dtypes of the corresponding leaves of
    `old` (arrays or `jax.ShapeDtypeStruct`s)."""

    def cast(n, o):
        if eqx.is_array(o) or isinstance(o, jax.ShapeDtypeStruct):
            return jnp.asarray(n).astype(o.dtype)
        return n

    return jtu.tree_map(cast, new, old)


def _struct(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _strong(tree: PyTree) -> PyTree:
    """Python scalars and weakly typed arrays to strongly typed arrays."""

    def convert(x):
        if isinstance(x, (bool, int, float)) or eqx.is_array(x):
            x = jnp.asarray(x)
            return x.astype(x.dtype)
        return x

    return jtu.tree_map(convert, tree)


class _SteadyStateState(eqx.Module, Generic[Y]):
    # The ODE.
    t0: Scalar  # current time; the next step is over [t0, t1]
    t1: Scalar
    vf: Y  # f(y) - y at the current (last accepted) iterate y, in the time's dtype
    solver_state: Any  # the diffrax solver's state (None for Runge–Kutta)
    controller_state: Any
    # Termination.
    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]
    stalled: Bool[Array, ""]
    initial_residual: Scalar
    stall_reference: Scalar
    steps_since_progress: Int[Array, ""]
    # Statistics.
    num_ode_steps: Int[Array, ""]
    num_fn_evals: Int[Array, ""]
    num_accepted_steps: Int[Array, ""]
    abs_residual: Scalar
    rel_residual: Scalar
    best_y: Y | None
    best_abs_residual: Scalar
    best_rel_residual: Scalar
    residual_history: Array | None
    aux_zeros: Any  # returned by every step: the aux output is evaluated at the end


class SteadyState(optx.AbstractFixedPointSolver[Y, Aux, _SteadyStateState]):
    r"""A continuous DEQ: finds the fixed point $y = f(y)$ as the steady state of the
    ODE

    $$\frac{\mathrm{d}z}{\mathrm{d}t} = f(z) - z, \qquad z(0) = y_0,$$

    integrated with any explicit [diffrax](https://docs.kidger.site/diffrax/) solver
    and step-size controller. This is the continuous DEQ of DeepEquilibriumNetworks.jl
    (a `SteadyStateProblem`).

    The ODE is stable wherever every eigenvalue $\lambda$ of $\partial f/\partial y$
    has $\operatorname{Re}\lambda < 1$, a much weaker condition than the
    contraction $|\lambda| < 1$ that [`eqxdeq.Picard`][] needs: e.g. a layer whose
    Jacobian has eigenvalues $\pm 2i$ has a stable steady state that Picard iteration
    diverges from. On contractive layers it is slower than Picard, and much slower
    than [`eqxdeq.Anderson`][] or [`eqxdeq.Broyden`][]: an explicit integrator's step
    is limited by stability to $O(1/|\lambda - 1|)$ for the largest $|\lambda - 1|$,
    while the slowest mode needs a time of order $1/(1 - \operatorname{Re}\lambda)$.

    Each step of the optimistix loop is one step of the diffrax solver, accepted or
    rejected by the step-size controller. The solve stops on the fixed-point residual
    $f(y) - y$ (the vector field itself) with `rtol`, `atol`, `norm` and
    `termination`, exactly like the other eqxdeq solvers; the ODE tolerances of the
    controller only steer the step size.

    **Cost.** `sol.stats["num_fn_evals"]` counts every evaluation of $f$: one at $y_0$,
    then per step (accepted or rejected)

    | solver | evaluations per step |
    | --- | --- |
    | explicit Runge–Kutta with FSAL (`Tsit5`, `Dopri5`, `Bosh3`, `Dopri8`) | stages − 1 (6, 6, 3, 13): the residual is the FSAL stage, free |
    | other explicit Runge–Kutta (`Heun`, `Midpoint`, `Ralston`) | stages + 1: the residual at the new point costs one more |
    | other solvers (`Euler`, `ReversibleHeun`, …) | the evaluations of one step, counted at trace time, + 1 for the residual; an evaluation at the current iterate reuses its known residual |

    plus one at the end when `fn` has an auxiliary output (it is evaluated at the
    returned $y$). So `Euler` with `ConstantStepSize` and `dt0=1` *is*
    [`eqxdeq.Picard`][] (the same iterates and one evaluation per step), and `dt0=β`
    is Picard with relaxation β.

    !!! tip "ODE tolerances"

        Only the end point matters, not the accuracy of the trajectory; but the
        controller's tolerances cannot be loose. Once the step is limited by
        stability, the controller keeps it at the edge of the stability region, where
        the stiff components of $z$ are held at about the ODE tolerance: the
        fixed-point residual stalls near it. So by default (`stepsize_controller=None`)
        the controller is tied to the fixed-point tolerances,
        `diffrax.PIDController(rtol=rtol/10, atol=atol/10, pcoeff=0.2, icoeff=0.4)`;
        the PI coefficients damp the oscillation of the step size at the stability
        edge (the solver guide has the measurements).

    Implicit diffrax solvers (`Kvaerno5`, `ImplicitEuler`, …) are not supported: the
    number of evaluations of their inner nonlinear solves is not known.

    A complex state is integrated as its real and imaginary parts, in real time:
    diffrax sees real arrays only (its complex support is experimental), and for an
    explicit solver, whose coefficients are real, that is the same arithmetic.

    Supports the following `options`:

    - `step_budget`: a (possibly traced) integer; the solve stops after this many ODE
        steps (accepted or rejected) with
        `optimistix.RESULTS.nonlinear_max_steps_reached` unless converged.

    `sol.stats` has the keys of every eqxdeq solver (see
    [`eqxdeq.AbstractDescentSearchSolver`][]), with `num_accepted_steps` the accepted
    ODE steps and `residual_history` the residual at $y_0$ and after each step. A
    candidate step that is accepted but not finite (a constant step size on an
    unstable ODE) is not taken: the solve stops with
    [`eqxdeq.RESULTS.diverged`][eqxdeq.RESULTS].
    """  # noqa: E501

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]
    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController | None
    dt0: float
    termination: Termination
    return_best: bool
    history_length: int

    def __init__(
        self,
        rtol: float,
        atol: float,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        solver: diffrax.AbstractSolver = diffrax.Tsit5(),
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        dt0: float = 1.0,
        *,
        termination: Termination = Termination(),
        return_best: bool = True,
        history_length: int = 0,
    ):
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.solver = solver
        self.stepsize_controller = stepsize_controller
        self.dt0 = dt0
        self.termination = termination
        self.return_best = return_best
        self.history_length = history_length

    def __check_init__(self):
        check_solver_fields(self, "SteadyState")
        solver = self.solver
        if not isinstance(solver, diffrax.AbstractSolver):
            raise ValueError(
                "`SteadyState(solver=...)` must be a diffrax solver, e.g. "
                f"`diffrax.Tsit5()`, got {type(solver).__name__}."
            )
        structure = solver.term_structure
        if not (
            isinstance(structure, type) and issubclass(structure, diffrax.AbstractTerm)
        ):
            raise ValueError(
                "`SteadyState(solver=...)` must be an ODE solver taking a single term, "
                f"got {type(solver).__name__} (for terms {structure})."
            )
        if isinstance(solver, diffrax.AbstractImplicitSolver):
            raise ValueError(
                "`SteadyState(solver=...)` must be an explicit diffrax solver (e.g. "
                "`Tsit5`, `Dopri5`, `Heun`, `Euler`); implicit solvers such as "
                f"{type(solver).__name__} are not supported."
            )
        if isinstance(solver, diffrax.AbstractRungeKutta) and not (
            isinstance(solver, diffrax.AbstractERK)
            and isinstance(solver.tableau, diffrax.ButcherTableau)
        ):
            raise ValueError(
                "`SteadyState(solver=...)`: of the Runge–Kutta methods only explicit "
                f"ones are supported, got {type(solver).__name__}."
            )
        controller = self._controller()
        if not isinstance(controller, diffrax.AbstractStepSizeController):
            raise ValueError(
                "`SteadyState(stepsize_controller=...)` must be a diffrax step-size "
                "controller, e.g. `diffrax.PIDController(rtol=1e-2, atol=1e-2)` or "
                f"`diffrax.ConstantStepSize()`, got {type(controller).__name__}."
            )
        if isinstance(
            controller, diffrax.AbstractAdaptiveStepSizeController
        ) and not isinstance(solver, diffrax.AbstractAdaptiveSolver):
            raise ValueError(
                f"`SteadyState(stepsize_controller=...)`: {type(solver).__name__} has "
                "no error estimate, so it needs `diffrax.ConstantStepSize()`."
            )
        if self.dt0 is None or (
            is_python_number(self.dt0) and not (0 < self.dt0 < float("inf"))  # pyright: ignore[reportOperatorIssue]
        ):
            raise ValueError("`SteadyState(dt0=...)` must be positive and finite.")

    def _controller(self) -> diffrax.AbstractStepSizeController:
        """The step-size controller used: `stepsize_controller`, or the default tied
        to the tolerances."""
        if self.stepsize_controller is None:
            return diffrax.PIDController(
                rtol=0.1 * self.rtol, atol=0.1 * self.atol, pcoeff=0.2, icoeff=0.4
            )
        return self.stepsize_controller

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del options, f_struct, tags
        # The ODE is integrated, and the time kept, in one real dtype for all leaves
        # (complex leaves as their real and imaginary parts: diffrax's complex
        # support is experimental, and for explicit solvers, whose coefficients are
        # real, the two are the same arithmetic).
        dtype = stats_dtype(y)
        z = to_view(y, dtype)
        f, _ = fn(y, args)
        vf = (to_view(f, dtype) ** ω - z**ω).ω
        abs_residual = two_norm(vf, dtype)
        rel_residual = abs_residual / two_norm(f, dtype)
        with jax.numpy_dtype_promotion("standard"):
            converged = self.termination.converged(
                self.rtol,
                self.atol,
                self.norm,
                merge_complex(vf, y),
                merge_complex((vf**ω + z**ω).ω, y),
            )
        t0 = jnp.array(0.0, dtype)
        counter = _Counter()
        term = _ResidualTerm(fn, (z, vf), counter, _struct(y))
        controller = self._controller().wrap(1)
        with jax.numpy_dtype_promotion("standard"):
            t1, controller_state = controller.init(
                term,
                t0,
                jnp.array(jnp.inf, dtype),
                z,
                jnp.asarray(self.dt0).astype(dtype),
                args,
                self.solver.func,
                self.solver.error_order(term),
            )
        t1 = jnp.asarray(t1).astype(dtype)
        if isinstance(self.solver, diffrax.AbstractRungeKutta):
            solver_state = None
        else:
            solver_state = self.solver.init(term, t0, t1, z, args)
        num_fn_evals = 1 + counter.count
        if self.history_length > 0:
            history = jnp.full((self.history_length,), jnp.nan, dtype)
            history = history.at[0].set(abs_residual)
        else:
            history = None
        zero = jnp.array(0)
        return _SteadyStateState(
            t0=t0,
            t1=t1,
            vf=vf,
            solver_state=_strong(solver_state),
            controller_state=_strong(controller_state),
            converged=converged,
            diverged=jnp.invert(jnp.isfinite(abs_residual)),
            stalled=jnp.array(False),
            initial_residual=abs_residual,
            stall_reference=abs_residual,
            steps_since_progress=zero,
            num_ode_steps=zero,
            num_fn_evals=jnp.array(num_fn_evals),
            num_accepted_steps=zero,
            abs_residual=abs_residual,
            rel_residual=rel_residual,
            best_y=y if self.return_best else None,
            best_abs_residual=abs_residual,
            best_rel_residual=rel_residual,
            residual_history=history,
            aux_zeros=tree_zeros_like_struct(aux_struct),
        )

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        dtype = stats_dtype(y)
        z = to_view(y, dtype)
        solver = self.solver
        counter = _Counter()
        if isinstance(solver, diffrax.AbstractRungeKutta):
            # The stages are evaluated in a loop, so count them from the tableau.
            term = _ResidualTerm(fn, None, counter, _struct(y))
            tableau = _tableau(solver)
            # FSAL: the last stage is the vector field at the new point.
            fsal = tableau.fsal
            if fsal:
                # diffrax's FSAL state is `(first_step, f(y))`: reuse our residual.
                solver_state = (jnp.array(False), state.vf)
                step_evals = tableau.num_stages - 1
            else:
                solver_state = None
                step_evals = tableau.num_stages
        else:
            term = _ResidualTerm(fn, (z, state.vf), counter, _struct(y))
            fsal = False
            solver_state = state.solver_state
            step_evals = None
        z1, y_error, _, new_solver_state, solver_result = solver.step(
            term, state.t0, state.t1, z, args, solver_state, False
        )
        y1 = from_view(z1, y)
        if step_evals is None:
            step_evals = counter.count
        if fsal:
            if not (
                isinstance(new_solver_state, tuple)
                and len(new_solver_state) == 2
                and jtu.tree_structure(new_solver_state[1]) == jtu.tree_structure(z)
            ):
                raise RuntimeError(
                    "eqxdeq relies on diffrax's FSAL Runge–Kutta state being "
                    "`(first_step, f(y))`. This version of diffrax is not supported."
                )
            vf1 = new_solver_state[1]
            new_solver_state = None
        else:
            f1, _ = fn(y1, args)
            vf1 = (to_view(f1, dtype) ** ω - z1**ω).ω
            step_evals += 1
        if y_error is not None:
            y_error = jtu.tree_map(
                lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), y_error
            )
        controller = self._controller().wrap(1)
        with jax.numpy_dtype_promotion("standard"):
            (keep, t0, t1, _, controller_state, controller_result) = (
                controller.adapt_step_size(
                    state.t0,
                    state.t1,
                    z,
                    z1,
                    args,
                    y_error,
                    cast(float, solver.error_order(term)),
                    state.controller_state,
                )
            )
        keep = jnp.asarray(keep)
        finite = tree_allfinite(z1) & tree_allfinite(vf1)
        accept = keep & finite
        blew_up = keep & jnp.invert(finite)
        ode_failed = (solver_result != diffrax.RESULTS.successful) | (
            controller_result != diffrax.RESULTS.successful
        )

        new_y = tree_where(accept, y1, y)
        vf = tree_where(accept, vf1, state.vf)
        if state.solver_state is not None:
            new_solver_state = tree_where(
                accept, _like(new_solver_state, state.solver_state), state.solver_state
            )
        f1 = (vf1**ω + z1**ω).ω
        abs_eval = two_norm(vf1, dtype)
        rel_eval = abs_eval / two_norm(f1, dtype)
        abs_residual = jnp.where(accept, abs_eval, state.abs_residual)
        rel_residual = jnp.where(accept, rel_eval, state.rel_residual)
        with jax.numpy_dtype_promotion("standard"):
            converged = self.termination.converged(
                self.rtol,
                self.atol,
                self.norm,
                merge_complex(vf1, y),
                merge_complex(f1, y),
            )
        converged = accept & converged

        # Safe termination, on the accepted iterates.
        diverged = (
            blew_up
            | ode_failed
            | (accept & self.termination.diverged(abs_eval, state.initial_residual))
        )
        improved = accept & (abs_eval < state.best_abs_residual)
        best_abs_residual = jnp.where(improved, abs_eval, state.best_abs_residual)
        best_rel_residual = jnp.where(improved, rel_eval, state.best_rel_residual)
        stall_reference, steps_since_progress, stalled = self.termination.stall(
            best_abs_residual, state.stall_reference, state.steps_since_progress
        )
        if self.return_best:
            best_y = tree_where(improved, y1, state.best_y)
        else:
            best_y = None
        num_ode_steps = state.num_ode_steps + 1
        if state.residual_history is None:
            history = None
        else:
            history = state.residual_history.at[num_ode_steps].set(
                abs_residual, mode="drop"
            )

        new_state = _SteadyStateState(
            t0=jnp.asarray(t0).astype(dtype),
            t1=jnp.asarray(t1).astype(dtype),
            vf=vf,
            solver_state=new_solver_state,
            controller_state=_like(controller_state, state.controller_state),
            converged=converged,
            diverged=diverged,
            stalled=stalled,
            initial_residual=state.initial_residual,
            stall_reference=stall_reference,
            steps_since_progress=steps_since_progress,
            num_ode_steps=num_ode_steps,
            num_fn_evals=state.num_fn_evals + step_evals,
            num_accepted_steps=state.num_accepted_steps + accept.astype(int),
            abs_residual=abs_residual,
            rel_residual=rel_residual,
            best_y=best_y,
            best_abs_residual=best_abs_residual,
            best_rel_residual=best_rel_residual,
            residual_history=history,
            aux_zeros=state.aux_zeros,
        )
        # The aux output is evaluated once, in `postprocess`.
        return new_y, new_state, state.aux_zeros

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, tags
        return terminate_result(
            state.converged, state.diverged, state.stalled, state.num_ode_steps, options
        )

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del options, tags
        detailed = detailed_result(result, state.stalled)
        if self.return_best:
            use_best = jnp.logical_not(state.converged)
            y = tree_where(use_best, state.best_y, y)
            abs_residual = jnp.where(
                use_best, state.best_abs_residual, state.abs_residual
            )
            rel_residual = jnp.where(
                use_best, state.best_rel_residual, state.rel_residual
            )
        else:
            abs_residual = state.abs_residual
            rel_residual = state.rel_residual
        num_fn_evals = state.num_fn_evals
        if jtu.tree_leaves(aux):
            _, aux = fn(y, args)
            num_fn_evals = num_fn_evals + 1
        stats = {
            "num_fn_evals": num_fn_evals,
            "num_accepted_steps": state.num_accepted_steps,
            "abs_residual": abs_residual,
            "rel_residual": rel_residual,
            "best_abs_residual": state.best_abs_residual,
            "best_rel_residual": state.best_rel_residual,
            "result": detailed,
        }
        if state.residual_history is not None:
            stats["residual_history"] = state.residual_history
        return y, aux, stats


SteadyState.__init__.__doc__ = (
    """**Arguments:**

- `rtol`: relative tolerance on the fixed-point residual $f(y) - y$.
- `atol`: absolute tolerance on the fixed-point residual.
- `norm`: the norm used in the termination criterion, as for the other solvers.
    Default [`optimistix.max_norm`][].
- `solver`: an explicit diffrax solver. Default `diffrax.Tsit5()` (FSAL: the residual
    is free).
- `stepsize_controller`: a diffrax step-size controller. Default `None`:
    `diffrax.PIDController(rtol=rtol/10, atol=atol/10, pcoeff=0.2, icoeff=0.4)` (see
    above). A solver without an error estimate (`Euler`) needs
    `diffrax.ConstantStepSize()`.
- `dt0`: the first step size (for `ConstantStepSize` every step), in units of the
    time scale of $\\mathrm{d}z/\\mathrm{d}t = f(z) - z$, on which one Euler step of
    size 1 is one Picard iteration. Default 1.
"""
    + COMMON_ARGUMENTS_DOC
)
