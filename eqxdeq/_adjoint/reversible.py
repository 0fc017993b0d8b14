from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._misc import stats_dtype, tree_allfinite, tree_where, two_norm, ω
from .._results import RESULTS
from .._solver.reversible import check_checkpoints, Reversible, scale, unrelax
from ._backward import (
    BackwardStats,
    call_back,
    check_callback,
    check_on_failure,
    check_probe,
    one_solve,
    raise_index,
    raise_messages,
    Report,
)
from ._core import (
    INPUT_Y0,
    lax_while,
    NUM_INPUTS,
    require_fixed_point_rewrite,
    RESIDUAL_STATE,
    split_inputs,
)


def _zeros_if_none(cotangent, like):
    if cotangent is None:
        return jtu.tree_map(jnp.zeros_like, like)
    return jtu.tree_map(
        lambda c, x: jnp.zeros_like(x) if c is None else c,
        cotangent,
        like,
        is_leaf=lambda c: c is None,
    )


_MAX_RELATIVE_DRIFT = 1.0


@eqx.filter_custom_vjp
def _reversible_solve(vjp_arg, primal_fn, solver, rest, report):
    fn, y0, args, _ = vjp_arg
    return primal_fn(lax_while((fn, solver, y0, args, *rest)))


@_reversible_solve.def_fwd
def _reversible_solve_fwd(perturbed, vjp_arg, primal_fn, solver, rest, report):
    del perturbed, report
    fn, y0, args, _ = vjp_arg
    root, residual = primal_fn(lax_while((fn, solver, y0, args, *rest)))
    num_steps = residual[0]
    state = residual[RESIDUAL_STATE]
    # All the backward pass needs: the final pair, the number of steps and the
    # checkpoints (if any).
    return (root, residual), (root, state.z, num_steps, state.checkpoints)


def _pair_distance(a, b, dtype):
    """`‖(a_y - b_y, a_z - b_z)‖₂` for pairs `(y, z)`."""
    return two_norm((a**ω - b**ω).ω, dtype)


@_reversible_solve.def_bwd
def _reversible_solve_bwd(
    residuals, grad_obj, perturbed, vjp_arg, primal_fn, solver, rest, report
):
    del perturbed, primal_fn, rest
    y_final, z_final, num_steps, checkpoints = residuals
    grad_root, _ = grad_obj
    beta = solver.relaxation
    fn, y0, args, probe = vjp_arg
    diff_params, static_params = eqx.partition((fn, args), eqx.is_inexact_array)
    dtype = stats_dtype(y_final)

    def f(params, y):
        fn_, args_ = eqx.combine(params, static_params)
        return fn_(y, args_)[0]

    def cond_fun(carry):
        return carry[0] > 0

    def body_fun(carry):
        step, y, z, y_bar, z_bar, params_bar, overflow, drift = carry
        if checkpoints is not None:
            # Discard the reconstruction's accumulated rounding error (and measure
            # it: the distance from the reconstruction to the exact copy).
            restored = checkpoints.restore(step, y, z)
            drift = jnp.maximum(drift, _pair_distance(restored, (y, z), dtype))
            y, z = restored
        # Undo z' = (1 - β) z + β f(y'), and pull β z̄' back through f(y').
        f_y, vjp_y = jax.vjp(f, diff_params, y)
        z = unrelax(beta, z, f_y)
        params_bar_y, y_bar_f = vjp_y(scale(beta, z_bar, keep=False))
        y_bar = (y_bar**ω + y_bar_f**ω).ω
        # Undo y' = (1 - β) y + β f(z), and pull β ȳ' back through f(z).
        f_z, vjp_z = jax.vjp(f, diff_params, z)
        y = unrelax(beta, y, f_z)
        params_bar_z, z_bar_f = vjp_z(scale(beta, y_bar, keep=False))
        y_bar = scale(beta, y_bar, keep=True)
        z_bar = (scale(beta, z_bar, keep=True) ** ω + z_bar_f**ω).ω
        params_bar = jtu.tree_map(
            lambda a, b, c: a + b + c, params_bar, params_bar_y, params_bar_z
        )
        overflow = overflow | jnp.logical_not(tree_allfinite((y, z)))
        return step - 1, y, z, y_bar, z_bar, params_bar, overflow, drift

    y_bar = _zeros_if_none(grad_root, y_final)
    z_bar = jtu.tree_map(jnp.zeros_like, z_final)
    params_bar = jtu.tree_map(jnp.zeros_like, diff_params)
    overflow = jnp.array(False)
    drift = jnp.zeros((), dtype)
    init = (num_steps, y_final, z_final, y_bar, z_bar, params_bar, overflow, drift)
    _, y_rec, z_rec, y_bar, z_bar, params_bar, overflow, drift = lax.while_loop(
        cond_fun, body_fun, init
    )
    # y_0 = z_0 = y0 exactly: the error of the last reconstructed segment.
    drift = jnp.maximum(drift, _pair_distance((y_rec, z_rec), (y0, y0), dtype))
    # From a finite final pair, a non-finite reconstruction is the backward pass's
    # own failure (rounding errors amplified past overflow), not the forward's.
    overflow = overflow & tree_allfinite((y_final, z_final))
    cotangent_in = _zeros_if_none(grad_root, y_final)
    norm_final = two_norm((y_final, z_final), dtype)
    relative = jnp.where(
        norm_final > 0, drift / jnp.where(norm_final > 0, norm_final, 1), 0
    )
    # A reconstruction further from the exact iterates than their own size is
    # unrelated to them: its gradient is luck (measured on the reversible page).
    drifted = relative > _MAX_RELATIVE_DRIFT
    result = RESULTS.where(
        drifted,
        RESULTS.backward_reconstruction_drifted,
        RESULTS.successful,  # pyright: ignore[reportArgumentType]
    )
    result = RESULTS.where(overflow, RESULTS.backward_reconstruction_overflow, result)
    result = RESULTS.where(
        tree_allfinite(cotangent_in), result, RESULTS.backward_nonfinite_cotangent
    )
    failed = result != RESULTS.successful
    # y_0 = z_0 = y0.
    y0_bar = (y_bar**ω + z_bar**ω).ω
    grads = (params_bar, y0_bar)
    if report.on_failure == "jfb":
        # The JFB gradient: ȳ pulled back through one application of f at y_N.
        _, vjp_final = jax.vjp(f, diff_params, y_final)
        jfb_params_bar, _ = vjp_final(cotangent_in)
        jfb = (jfb_params_bar, jtu.tree_map(jnp.zeros_like, y0_bar))
        fallback = failed & (result != RESULTS.backward_nonfinite_cotangent)
        grads = tree_where(fallback, jfb, grads)
        raise_if = result == RESULTS.backward_nonfinite_cotangent
    elif report.on_failure == "nan":
        fallback = jnp.array(False)
        grads = jtu.tree_map(
            lambda g: jnp.where(failed, jnp.asarray(jnp.nan, g.dtype), g), grads
        )
        raise_if = jnp.array(False)
    else:
        fallback = jnp.array(False)
        raise_if = failed
    grads = eqx.branched_error_if(
        grads, raise_if, raise_index(result), raise_messages(report.description)
    )
    probe_bar = None
    if report.callback is not None or probe is not None:
        data = one_solve(
            steps=num_steps,
            residual=drift,
            relative=relative,
            result=result,
            fallback=fallback,
            dtype=dtype if probe is None else probe.dtype,
        )
        if report.callback is not None:
            grads = call_back(report.callback, data, grads)
        if probe is not None:
            probe_bar = data
    params_bar, y0_bar = grads
    fn_bar, args_bar = params_bar
    return fn_bar, y0_bar, args_bar, probe_bar


class ReversibleAdjoint(optx.AbstractAdjoint):
    r"""The exact gradient of [`eqxdeq.Reversible`][]'s iterations, in memory
    independent of their number.

    ```python
    sol = optx.fixed_point(fn, eqxdeq.Reversible(rtol, atol), y0, args,
                           adjoint=eqxdeq.ReversibleAdjoint())
    ```

    The gradient is that of the $N$ steps the forward solve took, $y_N$ as a function
    of `y0`, `args` and the arrays closed over by `fn`: what backpropagating through
    the iterations ([`optimistix.RecursiveCheckpointAdjoint`][]) gives, not the
    implicit-function-theorem gradient at the fixed point (the two agree as the
    solve converges). Only the final pair $(y_N, z_N)$ and $N$ are kept; the backward
    pass reconstructs $(y_n, z_n)$ from $(y_{n+1}, z_{n+1})$ by inverting each step,

    $$z_n = \frac{z_{n+1} - \beta f(y_{n+1})}{1 - \beta}, \qquad
    y_n = \frac{y_{n+1} - \beta f(z_n)}{1 - \beta},$$

    and pulls the cotangents back through the two evaluations as it goes: two
    vector-Jacobian products of $f$ per step (whose primal outputs are the
    evaluations the inversion needs), and no linear solve.

    Must be used with `solver=eqxdeq.Reversible(...)`; any other solver raises a
    `ValueError` at trace time.

    **Checkpoints.** Inverting a contraction expands: each backward step multiplies
    rounding errors in the reconstructed iterates by at least $1/(1-\beta)$, so a
    pure reconstruction drifts from the forward trajectory geometrically in the
    number of steps. So the forward solve also keeps exact copies of
    $(y_n, z_n)$ in `checkpoints` slots (every step at first; when the slots fill,
    every other copy is dropped and the spacing doubles), and the backward pass
    restarts its reconstruction from each copy: the error grows only over the
    $\le 2N/\text{checkpoints}$ steps between copies. Memory stays independent of
    $N$: $2 \times$ `checkpoints` copies of $y$, besides the final pair.

    The reversible page of the documentation has the measured gradient error
    against BPTT for each number of checkpoints. Keep the steps between copies
    few (the error of a reconstruction grows geometrically with them; a smaller
    $\beta$ tolerates more). A reconstruction that overflows raises a runtime error
    (as a failed linear solve of [`eqxdeq.ImplicitAdjoint`][] does) rather than
    returning a NaN gradient. For a gradient at a tightly converged fixed point after
    many steps prefer [`eqxdeq.ImplicitAdjoint`][].

    !!! info "Reverse mode only"

        This is a `jax.custom_vjp`: `jax.grad` and `jax.vjp` work, `jax.jvp` raises
        JAX's "can't apply forward-mode autodiff (jvp) to a custom_vjp function".
        Use [`eqxdeq.ImplicitAdjoint`][] for forward mode. The auxiliary output,
        `sol.state` and `sol.stats` carry no gradient.
    """

    checkpoints: int | None = None
    # Annotated `str` (not a `Literal`) so that `__check_init__` can
    # reject other values with a helpful message.
    on_failure: str = eqx.field(default="raise", static=True, kw_only=True)
    callback: Callable[[BackwardStats], Any] | None = eqx.field(
        default=None, static=True, kw_only=True
    )
    probe: BackwardStats | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        if self.checkpoints is not None:
            check_checkpoints(self.checkpoints, "ReversibleAdjoint")
        check_on_failure(self.on_failure, "ReversibleAdjoint")
        check_callback(self.callback, "ReversibleAdjoint")
        check_probe(self.probe, "ReversibleAdjoint")

    def _checkpoints(self, solver: Reversible) -> int:
        """The number of checkpoints the solve keeps: the solver's, validated
        against this adjoint's `checkpoints` (the adjoint never changes it)."""
        ours, theirs = self.checkpoints, solver.checkpoints
        if ours is not None and ours != theirs:
            raise ValueError(
                f"`eqxdeq.ReversibleAdjoint(checkpoints={ours})` does not match "
                f"`eqxdeq.Reversible(checkpoints={theirs})`: the checkpoints are kept "
                "by the forward solve, so they are set on the solver, "
                f"`eqxdeq.Reversible(..., checkpoints={ours})`, and the adjoint reads "
                "them. Leave `ReversibleAdjoint(checkpoints=None)` (the default) to "
                "use the solver's."
            )
        return theirs

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        require_fixed_point_rewrite(rewrite_fn, "eqxdeq.ReversibleAdjoint")
        del tags
        fn, solver, args = split_inputs(inputs)
        if not isinstance(solver, Reversible):
            raise ValueError(
                "`eqxdeq.ReversibleAdjoint` computes gradients by running "
                "`eqxdeq.Reversible`'s iteration backwards, so it requires "
                f"`solver=eqxdeq.Reversible(...)`, but got `{type(solver).__name__}`. "
                "Use `eqxdeq.ImplicitAdjoint()` (or "
                "`optimistix.RecursiveCheckpointAdjoint()`) with other solvers."
            )
        checkpoints = self._checkpoints(solver)
        description = (
            f"eqxdeq.ReversibleAdjoint() (eqxdeq.Reversible(checkpoints={checkpoints}))"
        )
        # The probe travels with the differentiated arguments.
        report = Report(description, self.on_failure, self.callback, None)
        if self.probe is not None:
            dtype = stats_dtype(inputs[INPUT_Y0])
            probe = jnp.asarray(self.probe.data).astype(dtype)
        else:
            probe = None
        rest = tuple(inputs[INPUT_Y0 + 2 : NUM_INPUTS])
        root, residual = _reversible_solve(
            (fn, inputs[INPUT_Y0], args, probe),
            primal_fn,
            solver,
            rest,
            report,
        )
        # The residual (state, aux, stats, result) carries no gradient. Say so, or
        # JAX treats even its integer leaves as differentiated outputs of the
        # custom_vjp, which breaks `error_if` on `sol.result`.
        dynamic, static = eqx.partition(residual, eqx.is_array)
        return root, eqx.combine(lax.stop_gradient(dynamic), static)


ReversibleAdjoint.__init__.__doc__ = r"""**Arguments:**

- `checkpoints`: `None` (default): use the number of checkpoints the solver keeps,
    [`eqxdeq.Reversible`][]`(checkpoints=...)`, which is where to set it. An int
    (even, or 0 for none) states the number this adjoint expects: a solver that
    keeps a different number raises a `ValueError` naming both.
- `on_failure`: what a failed backward pass (a reconstruction that overflowed) does:
    `"raise"` (default), `"nan"` (NaN gradients) or `"jfb"` (the JFB gradient at
    $y_N$). Keyword only.
- `callback`, `probe`: report the backward pass, as for
    [`eqxdeq.ImplicitAdjoint`][]: `steps` is the number $N$ of steps run backwards,
    `residual` the largest distance $\|(y_n, z_n) - (\tilde y_n, \tilde z_n)\|_2$
    between the reconstruction and the exact pair at each checkpoint and at
    $y_0 = z_0$ (the reconstruction error), `relative_residual` that over
    $\|(y_N, z_N)\|_2$. Keyword only.
"""
