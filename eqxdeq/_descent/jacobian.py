"""Descents that use the Jacobian of the residual $g(y) = f(y) - y$.

They receive [`optimistix.FunctionInfo.ResidualJac`][] whose `jac` is the
*matrix-free* operator $\\partial g/\\partial y = \\partial f/\\partial y - I$: the
generic loop evaluates $f$ with `jax.linearize`, which costs one evaluation of $f$
(counted as such) and makes every Jacobian-vector product a tangent computation that
re-evaluates nothing. The Jacobian is never materialised unless the linear solver
asks for a matrix.
"""

import abc
from typing import Generic, TypeVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Int, Scalar

from .._custom_types import Y
from .._misc import (
    field_dtype,
    from_view,
    is_complex,
    is_python_number,
    max_norm,
    stats_dtype,
    to_view,
    tree_allfinite,
    tree_scale,
    tree_where,
    two_norm,
    ω,
)
from .._validation import check_newton_krylov_arguments


_ResidualJac = optx.FunctionInfo.ResidualJac
_State = TypeVar("_State")


class AbstractJacobianDescent(optx.AbstractDescent[Y, _ResidualJac, _State]):
    """A descent that needs $\\partial g/\\partial y$ at the accepted iterate.

    The generic loop ([`eqxdeq.AbstractDescentSearchSolver`][]) passes such a
    descent [`optimistix.FunctionInfo.ResidualJac`][] built from `jax.linearize`
    (one evaluation of $f$ per step, as for every descent); the search still sees
    only the residual. `stats` adds descent-specific counters to `sol.stats`.
    """

    @abc.abstractmethod
    def stats(self, state: _State) -> dict[str, Array]:
        """Statistics of the descent (e.g. Jacobian-vector products) for
        `sol.stats`."""

    @abc.abstractmethod
    def with_reference_residual(self, state: _State, residual_norm: Scalar) -> _State:
        """`state` (fresh from `init`) told the size $\\|g\\|_2$ of the residual at
        the start of a larger solve that this one continues (the solver's
        `options["reference_residual"]`, e.g. from [`eqxdeq.Fallback`][]). A
        descent without a continuation returns `state` unchanged."""


def krylov_matvecs(solver: lx.AbstractLinearSolver, num_steps, size: int):
    """The number of operator applications lineax's Krylov solvers make in
    `num_steps` of their loop (checked against a counted operator in the tests).

    - `lx.GMRES`: the first pass applies the operator once (the initial residual);
        every later pass runs a restart cycle of `min(restart, size)` Arnoldi steps
        plus one residual update.
    - `lx.BiCGStab`: one for the initial residual, two per step.
    """
    if isinstance(solver, lx.GMRES):
        assert isinstance(solver.restart, int)
        restart = min(solver.restart, size)
        return num_steps + jnp.maximum(num_steps - 1, 0) * restart
    elif isinstance(solver, lx.BiCGStab):
        return 1 + 2 * num_steps
    else:
        raise TypeError(f"Unsupported Krylov solver {type(solver).__name__}.")


_KRYLOV_SOLVERS = (lx.GMRES, lx.BiCGStab)


class _NewtonKrylovState(eqx.Module, Generic[Y]):
    first: Bool[Array, ""]
    g_norm_prev: Scalar
    g_norm_reference: Scalar  # ‖g‖ at which the pseudo-time step is `dt0`
    forcing_prev: Scalar
    direction: Y
    num_jvps: Int[Array, ""]
    num_linear_steps: Int[Array, ""]
    num_inexact_solves: Int[Array, ""]


class NewtonKrylovDescent(AbstractJacobianDescent[Y, _NewtonKrylovState]):
    r"""The inexact Newton direction, optionally with pseudo-transient continuation:
    $d$ with

    $$\|(\Delta t_k^{-1} I + I - \partial f/\partial y)\,d - g\| \le
      \eta_k \|g\|,$$

    found by a lineax Krylov solver on the matrix-free Jacobian (Jacobian-vector
    products only). With `pseudo_time_step=None`, $\Delta t_k = \infty$: the Newton
    direction. Otherwise $y + d$ is an implicit-Euler step of the ODE
    $\dot y = f(y) - y$ (linearised at $y$) with the pseudo-time step

    $$\Delta t_k = \Delta t_0 \frac{\|g_0\|_2}{\|g_k\|_2}$$

    (switched evolution relaxation, SER): a damped Picard step $\approx \Delta t\,g$
    far from the solution, the Newton step close to it, and in between a path that
    follows the ODE's flow, which converges to every fixed point that is a stable
    steady state of the flow (the eigenvalues of $\partial f/\partial y$ have real
    part below 1), however non-contractive $f$ is. $\|g_0\|$ is the first residual
    seen, or that of the whole solve when taking over from another solver
    ([`eqxdeq.Fallback`][]).

    The forcing term $\eta_k$ is Eisenstat and Walker's choice 2,
    $\eta_k = \gamma (\|g_k\| / \|g_{k-1}\|)^\alpha$ with $\gamma = 0.9$,
    $\alpha = 2$, safeguarded by $\gamma \eta_{k-1}^\alpha$ when that exceeds 0.1
    and kept in $[\eta_\text{min}, \eta_\text{max}]$: loose solves far from the
    solution, superlinear convergence close to it. Or a constant `forcing`.

    The tolerance is imposed by setting the Krylov solver's `atol` to
    $\eta_k \|g\|_\infty$ (and `rtol` to $\eta_k$), so the linear residual is
    measured in the max-norm, as lineax does. For a complex state the Krylov solve
    is complex, the norms and forcing terms are real (of $|g_i|$), and `rtol` is 0:
    lineax's first convergence check on complex vectors tests the residual alone,
    which would accept $d = 0$ for $\eta_k \ge 1/2$. A pytree mixing real and
    complex leaves is solved on the real and imaginary parts. A Krylov solve that
    stops early (its `max_steps`, stagnation) still returns a useful direction and
    is not an error; it is counted in `sol.stats["num_inexact_solves"]`. A
    non-finite direction is replaced by the residual (a Picard step), which the
    search then safeguards.

    `sol.stats` gains `num_jvps` (Jacobian-vector products in the Krylov solves),
    `num_linear_steps` (the Krylov solver's own step count) and
    `num_inexact_solves`.

    ??? cite "References"

        ```bibtex
        @article{eisenstat1996choosing,
            author = {Eisenstat, Stanley C. and Walker, Homer F.},
            title = {Choosing the Forcing Terms in an Inexact {N}ewton Method},
            journal = {SIAM Journal on Scientific Computing},
            volume = {17},
            number = {1},
            pages = {16--32},
            year = {1996},
        }
        @article{kelley1998convergence,
            author = {Kelley, C. T. and Keyes, David E.},
            title = {Convergence Analysis of Pseudo-Transient Continuation},
            journal = {SIAM Journal on Numerical Analysis},
            volume = {35},
            number = {2},
            pages = {508--523},
            year = {1998},
        }
        ```
    """

    # (Annotated loosely so that `__check_init__` can explain what is allowed.)
    linear_solver: lx.AbstractLinearSolver = lx.GMRES(
        rtol=0.0, atol=0.0, restart=10, max_steps=6
    )
    forcing: str | float = "eisenstat-walker"
    forcing_min: float | None = None
    forcing_max: float = 0.5
    pseudo_time_step: float | None = None

    def __check_init__(self):
        if not isinstance(self.linear_solver, _KRYLOV_SOLVERS):
            raise ValueError(
                "`NewtonKrylovDescent(linear_solver=...)` must be `lineax.GMRES` or "
                f"`lineax.BiCGStab`, not {type(self.linear_solver).__name__}. (For a "
                "direct solve use `optimistix.NewtonDescent(linear_solver=...)`.)"
            )
        check_newton_krylov_arguments(
            self.forcing,
            self.pseudo_time_step,
            forcing_min=self.forcing_min,
            forcing_max=self.forcing_max,
            owner="NewtonKrylovDescent",
        )
        if (
            self.forcing_min is not None
            and is_python_number(self.forcing_min)
            and is_python_number(self.forcing_max)
            and not self.forcing_min <= self.forcing_max
        ):
            raise ValueError(
                "`NewtonKrylovDescent(forcing_min=...)` must be in (0, forcing_max], "
                f"got forcing_min={self.forcing_min!r} > forcing_max="
                f"{self.forcing_max!r}."
            )

    def init(self, y: Y, f_info_struct) -> _NewtonKrylovState:
        del f_info_struct
        dtype = stats_dtype(y)
        zero = jnp.array(0)
        return _NewtonKrylovState(
            first=jnp.array(True),
            g_norm_prev=jnp.array(jnp.inf, dtype),
            g_norm_reference=jnp.array(jnp.nan, dtype),
            forcing_prev=jnp.array(self.forcing_max, dtype),
            direction=jtu.tree_map(jnp.zeros_like, y),
            num_jvps=zero,
            num_linear_steps=zero,
            num_inexact_solves=zero,
        )

    def _forcing(self, g_norm: Scalar, state: _NewtonKrylovState, dtype) -> Scalar:
        if not isinstance(self.forcing, str):
            return jnp.asarray(self.forcing, dtype)
        gamma, alpha = 0.9, 2.0
        forcing_max = jnp.asarray(self.forcing_max, dtype)
        if self.forcing_min is None:
            # Below ~sqrt(eps) a Krylov solve in this precision stagnates.
            forcing_min = jnp.sqrt(jnp.finfo(dtype).eps)
        else:
            forcing_min = jnp.asarray(self.forcing_min, dtype)
        eta = gamma * (g_norm / state.g_norm_prev) ** alpha
        safeguard = gamma * state.forcing_prev**alpha
        eta = jnp.where(safeguard > 0.1, jnp.maximum(eta, safeguard), eta)
        eta = jnp.where(state.first, forcing_max, eta)
        return jnp.clip(eta, forcing_min, forcing_max)

    def query(
        self, y: Y, f_info: _ResidualJac, state: _NewtonKrylovState
    ) -> _NewtonKrylovState:
        del y
        g = f_info.residual
        dtype = stats_dtype(g)
        g_norm = two_norm(g, dtype)
        eta = self._forcing(g_norm, state, dtype)
        g_max = max_norm(g, dtype)
        # lineax stops when |r_i| <= atol + rtol |b_i| and the last restart cycle
        # changed each d_i by at most atol + rtol |d_i|: with these values, when the
        # linear residual is at most ~eta ‖g‖ and d is settled to relative accuracy
        # eta.
        # (Tolerances are not differentiated: lineax rejects a solver with tangents,
        # e.g. under backpropagation through the iterations.)
        solve_dtype = field_dtype(g, dtype)
        if is_complex(solve_dtype):
            # lineax's first convergence check on complex vectors sees the step
            # placeholder inf divided by a complex scale, inf + nan·i, so it passes
            # on the residual test alone; with rtol = eta that accepts d = 0 (r = -g)
            # whenever eta >= 1/2, e.g. at the first step. With rtol = 0 the test is
            # |r_i| <= eta ‖g‖∞, which d = 0 fails for every eta < 1.
            tolerances = lax.stop_gradient((jnp.zeros_like(eta), eta * g_max))
        else:
            tolerances = lax.stop_gradient((eta, eta * g_max))
        solver = eqx.tree_at(lambda s: (s.rtol, s.atol), self.linear_solver, tolerances)
        # Switched evolution relaxation: the pseudo-time step grows as the residual
        # falls, dt_k = dt_0 ‖g_0‖ / ‖g_k‖, so the step moves from a damped Picard
        # step, dt g, far from the solution to the Newton step near it. ‖g_0‖ is the
        # first residual seen, or that of the whole solve when taking over from
        # another solver (`with_reference_residual`): restarting the continuation
        # from a small residual would otherwise crawl.
        reference = jnp.where(
            jnp.isnan(state.g_norm_reference), g_norm, state.g_norm_reference
        )
        dt0 = jnp.asarray(
            jnp.inf if self.pseudo_time_step is None else self.pseudo_time_step, dtype
        )
        # shift = 1/dt_k = ‖g_k‖ / (dt_0 ‖g_0‖); 0 (a Newton step) when the
        # residual is already 0, where the ratio would be 0/0. Like the Krylov
        # tolerances, the step schedule is not differentiated: its derivative
        # involves d‖g‖/dg = g/‖g‖, NaN at an exact fixed point (e.g. when `y0` is
        # one), under backpropagation through the iterations.
        safe_reference = jnp.where(reference > 0, reference, 1)
        ratio = jnp.where(reference > 0, g_norm / safe_reference, 0)
        shift = lax.stop_gradient(ratio / dt0)
        # (∂g/∂y - I/dt) d = -g, i.e. ((1 + 1/dt) I - ∂f/∂y) d = g. The Krylov
        # solve runs with every leaf in one dtype (at least float32, the widest of
        # the leaves; complex for a complex state): lineax's solvers need one dtype
        # across the pytree, and a Krylov solve in bfloat16 would stagnate at once.
        # A pytree mixing real and complex leaves is solved on the real and
        # imaginary parts (`to_view`). The Jacobian-vector products themselves run
        # in the leaves' own dtypes.
        jac = f_info.jac
        like = jax.eval_shape(lambda: g)

        def matvec(v):
            v = from_view(v, like)
            out = jac.mv(v)
            if self.pseudo_time_step is not None:
                out = (out**ω - tree_scale(shift, v) ** ω).ω
            return to_view(out, solve_dtype)

        neg_g = to_view((-(ω(g))).ω, solve_dtype)
        operator = lx.FunctionLinearOperator(matvec, jax.eval_shape(lambda: neg_g))
        sol = lx.linear_solve(operator, neg_g, solver, throw=False)
        finite = tree_allfinite(sol.value)
        direction = tree_where(finite, from_view(sol.value, like), g)
        num_steps = sol.stats["num_steps"]
        return _NewtonKrylovState(
            first=jnp.array(False),
            g_norm_prev=g_norm,
            g_norm_reference=reference,
            forcing_prev=eta,
            direction=direction,
            num_jvps=state.num_jvps
            + krylov_matvecs(self.linear_solver, num_steps, _size(neg_g)),
            num_linear_steps=state.num_linear_steps + num_steps,
            num_inexact_solves=state.num_inexact_solves
            + (sol.result != lx.RESULTS.successful).astype(int),
        )

    def step(
        self, step_size: Scalar, state: _NewtonKrylovState
    ) -> tuple[Y, optx.RESULTS]:
        return tree_scale(step_size, state.direction), optx.RESULTS.successful

    def with_reference_residual(
        self, state: _NewtonKrylovState, residual_norm: Scalar
    ) -> _NewtonKrylovState:
        return eqx.tree_at(
            lambda s: s.g_norm_reference,
            state,
            jnp.asarray(residual_norm, state.g_norm_reference.dtype),
        )

    def stats(self, state: _NewtonKrylovState) -> dict[str, Array]:
        return {
            "num_jvps": state.num_jvps,
            "num_linear_steps": state.num_linear_steps,
            "num_inexact_solves": state.num_inexact_solves,
        }


def _size(tree) -> int:
    return sum(x.size for x in jtu.tree_leaves(tree))


NewtonKrylovDescent.__init__.__doc__ = """**Arguments:**

- `linear_solver`: `lineax.GMRES` or `lineax.BiCGStab`; its `rtol` and `atol` are
    overwritten by the forcing term at every step, its `max_steps` (and GMRES's
    `restart`) bound the work per Newton step. Default GMRES with `restart=10`,
    `max_steps=6` (at most 56 Jacobian-vector products per step: lineax checks
    convergence once per restart cycle, after the first pass).
- `forcing`: `"eisenstat-walker"` (default) or a constant $\\eta \\in (0, 1)$.
- `forcing_min`: the smallest forcing term; default $\\sqrt{\\varepsilon}$ of the
    dtype, below which Krylov solves stagnate.
- `forcing_max`: the largest (and first) forcing term. Default 0.5: Eisenstat and
    Walker's 0.9 lets a step after a residual increase be solved so loosely that
    pseudo-transient continuation chatters near unstable points (the solver
    guide has the measurements).
- `pseudo_time_step`: $\\Delta t_0$, the pseudo-time step at the first residual;
    `None` for the Newton direction.
"""
