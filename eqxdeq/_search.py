"""Searches for fixed-point problems. Fixed damping is [`optimistix.LearningRate`][];
this module adds a derivative-free backtracking line search on the residual."""

from typing import cast

import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Int, Scalar, ScalarLike

from ._custom_types import Y
from ._misc import stats_dtype, tree_inner
from ._validation import check_int, check_real


_Residual = optx.FunctionInfo.Residual


class _BacktrackingState(eqx.Module):
    step_size: Scalar
    num_accepted: Int[Array, ""]
    num_rejected: Int[Array, ""]


class DerivativeFreeBacktracking(
    optx.AbstractSearch[Y, _Residual, _Residual, _BacktrackingState]
):
    r"""Derivative-free backtracking on the merit function $\tfrac12\|g(y)\|_2^2$,
    $g(y) = f(y) - y$ (Li–Fukushima).

    A trial $y + \alpha d$ is accepted when

    $$\|g(y + \alpha d)\|^2 \le (1 + \eta_k - \sigma \alpha^2)\,\|g(y)\|^2,
      \qquad \eta_k = \frac{\eta_0}{(k + 1)^2},$$

    with $k$ the number of accepted steps so far; otherwise $\alpha$ is multiplied by
    `decrease_factor` and $f$ is evaluated at the shorter trial (one step of the
    solver). No Jacobian is needed, so it works with any descent, including
    directions that are not descent directions of the merit function (Anderson,
    Broyden): the summable non-monotone slack $\eta_k$ guarantees that a short enough
    step is accepted.

    In floating point a "short enough" step may round to no step at all, and a
    quasi-Newton direction that is not a descent direction stays so until its model
    is updated. So after `max_backtracks` consecutive rejections the (short) trial is
    accepted anyway: the descent (Broyden, Anderson) then sees a new secant pair
    along the failed direction and corrects its model. With `return_best=True` (the
    default) such a step cannot make the returned point of a failed solve worse.

    ??? cite "References"

        ```bibtex
        @article{li2000derivative,
            author = {Li, Dong-Hui and Fukushima, Masao},
            title = {A derivative-free line search and global convergence of
                     {B}royden-like method for nonlinear equations},
            journal = {Optimization Methods and Software},
            volume = {13},
            number = {3},
            pages = {181--201},
            year = {2000},
        }
        ```
    """

    decrease_factor: ScalarLike = 0.5
    slope: ScalarLike = 1e-4
    step_init: ScalarLike = 1.0
    nonmonotone: ScalarLike = 1e-2
    max_backtracks: int = 8

    def __check_init__(self):
        name = "DerivativeFreeBacktracking"
        check_real(
            name,
            "decrease_factor",
            self.decrease_factor,
            lower=0,
            upper=1,
            lower_open=True,
            upper_open=True,
        )
        check_real(name, "slope", self.slope, lower=0, upper=1, upper_open=True)
        check_real(name, "step_init", self.step_init, lower=0, upper=1, lower_open=True)
        check_real(name, "nonmonotone", self.nonmonotone, lower=0)
        check_int(name, "max_backtracks", self.max_backtracks, minimum=1)

    def init(self, y: Y, f_info_struct: _Residual) -> _BacktrackingState:
        del f_info_struct
        dtype = stats_dtype(y)
        return _BacktrackingState(
            step_size=jnp.array(self.step_init, dtype),
            num_accepted=jnp.array(0),
            num_rejected=jnp.array(0),
        )

    def step(
        self,
        first_step: Bool[Array, ""],
        y: Y,
        y_eval: Y,
        f_info: _Residual,
        f_eval_info: _Residual,
        state: _BacktrackingState,
    ) -> tuple[Scalar, Bool[Array, ""], optx.RESULTS, _BacktrackingState]:
        del y, y_eval
        dtype = stats_dtype(f_info.residual)
        merit = tree_inner(f_info.residual, f_info.residual, dtype)
        merit_eval = tree_inner(f_eval_info.residual, f_eval_info.residual, dtype)
        k = (state.num_accepted + 1).astype(dtype)
        eta = jnp.asarray(self.nonmonotone, dtype) / k**2
        slope = jnp.asarray(self.slope, dtype)
        bound = (1 + eta - slope * state.step_size**2) * merit
        # NaN/inf trials compare False, so they are rejected.
        give_up = state.num_rejected >= self.max_backtracks
        accept = first_step | give_up | (merit_eval <= bound)
        step_size = jnp.where(
            accept,
            jnp.asarray(self.step_init, dtype),
            jnp.asarray(self.decrease_factor, dtype) * state.step_size,
        )
        step_size = cast(Scalar, step_size)
        new_state = _BacktrackingState(
            step_size=step_size,
            num_accepted=state.num_accepted + accept.astype(int),
            num_rejected=jnp.where(accept, 0, state.num_rejected + 1),
        )
        return step_size, accept, optx.RESULTS.successful, new_state


DerivativeFreeBacktracking.__init__.__doc__ = """**Arguments:**

- `decrease_factor`: the factor by which the step length shrinks after a rejection.
- `slope`: $\\sigma$, the sufficient-decrease constant.
- `step_init`: the first step length tried along each new direction.
- `nonmonotone`: $\\eta_0$, the summable slack that allows a temporary increase.
- `max_backtracks`: after this many consecutive rejections the trial is accepted
    regardless (see above). Default 8, i.e. a step of $2^{-8}$.
"""
