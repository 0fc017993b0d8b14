"""A continuous DEQ: the fixed point of `f` as the steady state of an ODE."""

from collections.abc import Callable
from typing import Any, cast, Generic

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._custom_types import Aux, Fn, Y
from .._misc import (
    from_view,
    is_python_number,
    stats_dtype,
    to_view,
    tree_allfinite,
    tree_where,
    tree_zeros_like_struct,
    ω,
)
from .._termination import (
    AbstractProgressSolver,
    BASIC_OPTIONS,
    check_options,
    Progress,
    Termination,
)
from .._validation import check_tolerances
from ._base import check_solver_fields
from ._common import COMMON_ARGUMENTS_DOC


def _residual_term(fn: Fn, like: PyTree, dtype) -> diffrax.ODETerm:
    """$\\mathrm{d}z/\\mathrm{d}t = f(z) - z$ on `z = to_view(y, dtype)`, one real dtype
    for diffrax; `f` gets the structure and dtypes of `like`."""

    def vector_field(t, z, args):
        del t
        f, _ = fn(from_view(z, like), args)
        return (to_view(f, dtype) ** ω - z**ω).ω

    return diffrax.ODETerm(vector_field)


class _SteadyStateState(eqx.Module, Generic[Y, Aux]):
    # (t0, t1) of the next ODE step, the solver's and the controller's opaque states
    ode: tuple[Scalar, Scalar, PyTree, PyTree]
    aux: Aux  # at the current iterate
    progress: Progress[Y, Aux]


class SteadyState(AbstractProgressSolver[Y, Aux, _SteadyStateState]):
    r"""A continuous DEQ: the fixed point $y = f(y)$ as the steady state of
    $\mathrm{d}z/\mathrm{d}t = f(z) - z$, $z(0) = y_0$, integrated by a diffrax solver
    and step-size controller. It converges if every eigenvalue $\lambda$ of
    $\partial f/\partial y$ has $\operatorname{Re}\lambda < 1$ ([`eqxdeq.Picard`][]
    needs $|\lambda| < 1$), but is slower on contractive layers.

    The first step evaluates $f$ at $y_0$. Every later one is one diffrax step
    (public `solver.step`, `stepsize_controller.adapt_step_size`) and one
    evaluation of `fn` at its end point, for the residual, the termination check and
    the aux output there; the end point is the new iterate if the step is accepted.

    **Cost** in evaluations of $f$ per step, after the first (which costs one):

    | solver | per step |
    | --- | --- |
    | FSAL Runge–Kutta (`Tsit5`, `Dopri5`, `Bosh3`, `Dopri8`) | stages (7, 7, 4, 14); one more until a step is accepted |
    | other explicit Runge–Kutta (`Heun`, `Midpoint`, `Ralston`) | stages + 1 (3) |
    | `Euler` | 2 |

    One more than diffrax needs: its public API cannot be handed the residual at the
    end point (a FSAL solver evaluates it again as its last stage, the others at the
    start of the next step). So `Euler` with `ConstantStepSize` and `dt0=β` gives
    [`eqxdeq.Picard`][]'s iterates (relaxation β) at twice the cost. Supported:
    `diffrax.Euler` and the explicit Runge–Kutta methods (`diffrax.AbstractERK`);
    not implicit solvers (unknown cost), nor `ReversibleHeun` or `LeapfrogMidpoint`
    (no steady state). A complex state is integrated as its real and imaginary parts.

    `options` and `sol.stats` as for [`eqxdeq.AbstractDescentSearchSolver`][] (no
    `y0_evaluation`), with `num_accepted_steps` the accepted ODE steps and
    `residual_history` the residual at $y_0$, then at the end of each ODE step. An
    accepted step that is not finite stops the solve as diverged, without being taken.
    """  # noqa: E501

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    solver: diffrax.AbstractSolver = diffrax.Tsit5()
    stepsize_controller: diffrax.AbstractStepSizeController | None = None
    dt0: float = 1.0
    termination: Termination = eqx.field(default=Termination(), kw_only=True)
    return_best: bool = eqx.field(default=True, kw_only=True)
    history_length: int = eqx.field(default=0, kw_only=True)

    def __check_init__(self):
        check_solver_fields(self, "SteadyState")
        if not isinstance(self.solver, (diffrax.Euler, diffrax.AbstractERK)):
            raise ValueError(
                "`SteadyState(solver=...)` must be `diffrax.Euler()` or an explicit "
                f"Runge–Kutta method such as `diffrax.Tsit5()`, got {self.solver!r}."
            )
        controller = self.stepsize_controller
        if not isinstance(controller, diffrax.AbstractStepSizeController | None):
            raise ValueError(
                "`SteadyState(stepsize_controller=...)` must be a diffrax step-size "
                f"controller, got {controller!r}."
            )
        adaptive = (diffrax.AbstractAdaptiveStepSizeController, type(None))
        if isinstance(self.solver, diffrax.Euler) and isinstance(controller, adaptive):
            raise ValueError(
                "`SteadyState(stepsize_controller=...)`: `Euler` has no error "
                "estimate, so it needs a constant step, `diffrax.ConstantStepSize()` "
                "(the default controller is an adaptive `PIDController`)."
            )
        if is_python_number(self.dt0) and not 0 < self.dt0 < float("inf"):
            raise ValueError("`SteadyState(dt0=...)` must be positive and finite.")

    @property
    def _controller(self) -> diffrax.AbstractStepSizeController:
        controller = self.stepsize_controller
        if controller is None:
            controller = diffrax.PIDController(
                rtol=0.1 * self.rtol, atol=0.1 * self.atol, pcoeff=0.2, icoeff=0.4
            )
        return controller.wrap(1)

    def init(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _SteadyStateState[Y, Aux]:
        del f_struct, tags
        check_options("SteadyState", options, BASIC_OPTIONS + ("reference_residual",))
        check_tolerances("SteadyState", self.rtol, self.atol, y)
        dtype = stats_dtype(y)  # of the ODE and its time
        term, z = _residual_term(fn, y, dtype), to_view(y, dtype)
        t0, dt0 = jnp.zeros((), dtype), jnp.asarray(self.dt0, dtype)
        # No evaluation of `f`: the controller evaluates only to choose a missing
        # `dt0`; a FSAL solver's first step evaluates every stage.
        order = self.solver.error_order(term)
        t1, controller_state = self._controller.init(
            term, t0, jnp.inf, z, dt0, args, self.solver.func, order
        )
        ode = (t0, t1, self.solver.init(term, t0, t1, z, args), controller_state)
        return _SteadyStateState(
            ode=jtu.tree_map(jnp.asarray, ode),
            aux=tree_zeros_like_struct(aux_struct),
            progress=Progress.start(
                y,
                aux_struct,
                keep_best=self.return_best,
                history_length=self.history_length,
                reference_residual=options.get("reference_residual", None),
            ),
        )

    def step(
        self,
        fn: Fn,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _SteadyStateState[Y, Aux],
        tags: frozenset[object],
    ) -> tuple[Y, _SteadyStateState[Y, Aux], Aux]:
        del options, tags
        solver, controller = self.solver, self._controller
        dtype, n = stats_dtype(y), state.progress.num_steps
        term, first = _residual_term(fn, y, dtype), n == 0

        def ode_step(_):
            t0, t1, solver_state, controller_state = state.ode
            z, order = to_view(y, dtype), cast(float, solver.error_order(term))
            z1, error, _, new_solver_state, s_result = solver.step(
                term, t0, t1, z, args, solver_state, False
            )
            # (As diffrax's loop: a NaN error estimate rejects the step.)
            error = jtu.tree_map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), error)
            keep, t0, t1, _, controller_state, c_result = controller.adapt_step_size(
                t0, t1, z, z1, args, error, order, controller_state
            )
            keep = jnp.asarray(keep)
            solver_state = tree_where(keep, new_solver_state, solver_state)
            ode = jtu.tree_map(jnp.asarray, (t0, t1, solver_state, controller_state))
            ok = diffrax.RESULTS.successful
            failed = (s_result != ok) | (c_result != ok)
            return from_view(z1, y), keep, failed, ode

        # The first step evaluates `f` at `y0`, the others at the end of an ODE step.
        no_step = lambda _: (y, jnp.array(True), jnp.array(False), state.ode)
        new, keep, ode_failed, ode = lax.cond(first, no_step, ode_step, None)
        f, aux = fn(new, args)
        g = (f**ω - new**ω).ω
        finite = tree_allfinite(g)
        accept = keep & finite
        tab = getattr(solver, "tableau", None)  # (None: Euler, one stage)
        stages, fsal = (1, False) if tab is None else (tab.num_stages, tab.fsal)
        # FSAL: once a step is accepted, its last stage is the next one's first.
        fsal_known = fsal & (state.progress.num_accepted_steps > 0)
        evals = jnp.where(first, 1, 1 + stages - fsal_known.astype(int))
        progress = state.progress.observe(
            self, new, f, g, aux, accept=accept, num_evals=evals, history_index=n
        )
        failed = ode_failed | (keep & ~finite)
        progress = progress.end_step(self, accept & ~first, failed=failed)
        aux = tree_where(accept, aux, state.aux)
        return tree_where(accept, new, y), _SteadyStateState(ode, aux, progress), aux

    def extra_stats(self, state: _SteadyStateState[Y, Aux]) -> dict[str, Any]:
        del state
        return {}


SteadyState.__init__.__doc__ = (
    """**Arguments:**

- `rtol`, `atol`, `norm`: the termination criterion on $f(y) - y$, as for every
    eqxdeq solver. Default `norm`: [`optimistix.max_norm`][].
- `solver`: `diffrax.Euler()` or an explicit Runge–Kutta method; `Tsit5()` default.
- `stepsize_controller`: a diffrax step-size controller. Default `None`: one tied to
    the tolerances, `diffrax.PIDController(rtol=rtol/10, atol=atol/10, pcoeff=0.2,
    icoeff=0.4)`, since looser ODE tolerances stall the residual at the edge of
    stability. `Euler` (no error estimate) needs `diffrax.ConstantStepSize()`.
- `dt0`: the first step size (every one, for `ConstantStepSize`); an Euler step of
    size 1 is one Picard iteration. Default 1.
"""
    + COMMON_ARGUMENTS_DOC
)
