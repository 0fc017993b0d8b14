import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._misc import tree_allfinite, ω
from .._solver.reversible import check_checkpoints, Reversible, unrelax, weights
from ._core import (
    INPUT_Y0,
    lax_while,
    NUM_INPUTS,
    require_fixed_point_rewrite,
    RESIDUAL_STATE,
    split_inputs,
)


def _scale(beta, tree, *, keep: bool):
    """`(1 - β) tree` if `keep`, else `β tree`, as `relax` weights them."""
    return jtu.tree_map(lambda a: weights(beta, a)[0 if keep else 1] * a, tree)


def _zeros_if_none(cotangent, like):
    if cotangent is None:
        return jtu.tree_map(jnp.zeros_like, like)
    return jtu.tree_map(
        lambda c, x: jnp.zeros_like(x) if c is None else c,
        cotangent,
        like,
        is_leaf=lambda c: c is None,
    )


@eqx.filter_custom_vjp
def _reversible_solve(vjp_arg, primal_fn, solver, rest):
    fn, y0, args = vjp_arg
    return primal_fn(lax_while((fn, solver, y0, args, *rest)))


@_reversible_solve.def_fwd
def _reversible_solve_fwd(perturbed, vjp_arg, primal_fn, solver, rest):
    del perturbed
    fn, y0, args = vjp_arg
    root, residual = primal_fn(lax_while((fn, solver, y0, args, *rest)))
    num_steps = residual[0]
    state = residual[RESIDUAL_STATE]
    # All the backward pass needs: the final pair, the number of steps and the
    # checkpoints (if any).
    return (root, residual), (root, state.z, num_steps, state.checkpoints)


@_reversible_solve.def_bwd
def _reversible_solve_bwd(
    residuals, grad_obj, perturbed, vjp_arg, primal_fn, solver, rest
):
    del perturbed, primal_fn, rest
    y_final, z_final, num_steps, checkpoints = residuals
    grad_root, _ = grad_obj
    beta = solver.relaxation
    fn, _, args = vjp_arg
    diff_params, static_params = eqx.partition((fn, args), eqx.is_inexact_array)

    def f(params, y):
        fn_, args_ = eqx.combine(params, static_params)
        return fn_(y, args_)[0]

    def cond_fun(carry):
        return carry[0] > 0

    def body_fun(carry):
        step, y, z, y_bar, z_bar, params_bar, overflow = carry
        if checkpoints is not None:
            # Discard the reconstruction's accumulated rounding error.
            y, z = checkpoints.restore(step, y, z)
        # Undo z' = (1 - β) z + β f(y'), and pull β z̄' back through f(y').
        f_y, vjp_y = jax.vjp(f, diff_params, y)
        z = unrelax(beta, z, f_y)
        params_bar_y, y_bar_f = vjp_y(_scale(beta, z_bar, keep=False))
        y_bar = (y_bar**ω + y_bar_f**ω).ω
        # Undo y' = (1 - β) y + β f(z), and pull β ȳ' back through f(z).
        f_z, vjp_z = jax.vjp(f, diff_params, z)
        y = unrelax(beta, y, f_z)
        params_bar_z, z_bar_f = vjp_z(_scale(beta, y_bar, keep=False))
        y_bar = _scale(beta, y_bar, keep=True)
        z_bar = (_scale(beta, z_bar, keep=True) ** ω + z_bar_f**ω).ω
        params_bar = jtu.tree_map(
            lambda a, b, c: a + b + c, params_bar, params_bar_y, params_bar_z
        )
        overflow = overflow | jnp.logical_not(tree_allfinite((y, z)))
        return step - 1, y, z, y_bar, z_bar, params_bar, overflow

    y_bar = _zeros_if_none(grad_root, y_final)
    z_bar = jtu.tree_map(jnp.zeros_like, z_final)
    params_bar = jtu.tree_map(jnp.zeros_like, diff_params)
    overflow = jnp.array(False)
    init = (num_steps, y_final, z_final, y_bar, z_bar, params_bar, overflow)
    *_, y_bar, z_bar, params_bar, overflow = lax.while_loop(cond_fun, body_fun, init)
    # From a finite final pair, a non-finite reconstruction is the backward pass's
    # own failure (rounding errors amplified past overflow), not the forward's.
    overflow = overflow & tree_allfinite((y_final, z_final))
    y_bar, z_bar, params_bar = eqx.error_if(
        (y_bar, z_bar, params_bar),
        overflow,
        "`eqxdeq.ReversibleAdjoint`: reconstructing the iterates backwards "
        "overflowed (inverting the contraction amplifies rounding errors "
        "geometrically in the number of steps between checkpoints). Use more "
        "`ReversibleAdjoint(checkpoints=...)`, fewer steps, a smaller "
        "`Reversible(relaxation=...)`, float64, or `eqxdeq.ImplicitAdjoint()`.",
    )
    # y_0 = z_0 = y0.
    y0_bar = (y_bar**ω + z_bar**ω).ω
    fn_bar, args_bar = params_bar
    return fn_bar, y0_bar, args_bar


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

    checkpoints: int = 8

    def __check_init__(self):
        check_checkpoints(self.checkpoints, "ReversibleAdjoint")

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
        solver = eqx.tree_at(lambda s: s.checkpoints, solver, self.checkpoints)
        rest = tuple(inputs[INPUT_Y0 + 2 : NUM_INPUTS])
        root, residual = _reversible_solve(
            (fn, inputs[INPUT_Y0], args), primal_fn, solver, rest
        )
        # The residual (state, aux, stats, result) carries no gradient. Say so, or
        # JAX treats even its integer leaves as differentiated outputs of the
        # custom_vjp, which breaks `error_if` on `sol.result`.
        dynamic, static = eqx.partition(residual, eqx.is_array)
        return root, eqx.combine(lax.stop_gradient(dynamic), static)


ReversibleAdjoint.__init__.__doc__ = """**Arguments:**

- `checkpoints`: the number of exact copies of $(y_n, z_n)$ the forward solve keeps
    to restart the backward reconstruction from (an even int; default 8). 0 keeps
    none: the paper's pure reconstruction, accurate for a handful of steps only.
"""
