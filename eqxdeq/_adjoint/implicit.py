import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx

from ._core import implicit_apply, INPUT_Y0, is_fixed_point_rewrite


def default_linear_solver(dtype) -> lx.AbstractLinearSolver:
    """The backward solver used when none is given: matrix-free restarted GMRES with
    tolerances set from the dtype of the fixed point."""
    eps = float(jnp.finfo(dtype).eps)
    if eps < 1e-10:  # float64
        tol = 1e-12
    elif eps < 1e-5:  # float32
        tol = 50 * eps
    else:  # 16-bit
        tol = 4 * eps
    return lx.GMRES(rtol=tol, atol=tol, restart=20, stagnation_iters=20)


class ImplicitAdjoint(optx.AbstractAdjoint):
    r"""Exact gradients through a fixed point by the implicit function theorem.

    For $y^\star = f(y^\star, \theta)$,
    $\frac{\mathrm{d}y^\star}{\mathrm{d}\theta} = (I - \partial_y f)^{-1}
    \partial_\theta f$, so reverse mode solves the adjoint system
    $(I - \partial_y f)^\top w = \bar y$ and returns $(\partial_\theta f)^\top w$.
    The operator is applied matrix-free (one vector-Jacobian product of $f$ per
    iteration of the linear solver); the Jacobian is never materialised unless you
    pass a dense solver such as `lineax.LU()`. Memory does not depend on the number of
    forward iterations.

    Unlike [`optimistix.ImplicitAdjoint`][], whose default linear solver materialises
    the Jacobian, the default here is restarted `lineax.GMRES` with tolerances chosen
    from the dtype. Any [`lineax.AbstractLinearSolver`][] may be given, including
    eqxdeq's [`eqxdeq.Richardson`][] and [`eqxdeq.Neumann`][]. Forward mode
    (`jax.jvp`) and higher derivatives work too.

    !!! info "A failed backward solve"

        If the linear solve fails (e.g. runs out of steps because the layer is not
        contractive at the fixed point) the gradient computation raises an
        `equinox.EquinoxRuntimeError` with lineax's message. There is no `throw=False`
        for the backward pass, since a gradient cannot carry a result code (lineax's own
        transposed solves always throw); run with the environment variable
        `EQX_ON_ERROR=nan` to get NaN gradients instead, detectable with `jnp.isfinite`.
    """

    linear_solver: lx.AbstractLinearSolver | None = None

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        linear_solver = self.linear_solver
        if linear_solver is None:
            # Tolerances for the least precise leaf: f (and so the operator) is
            # only as accurate as that (the solve itself runs in the widest dtype).
            leaves = jtu.tree_leaves(inputs[INPUT_Y0])
            dtype = max((x.dtype for x in leaves), key=lambda d: jnp.finfo(d).eps)
            linear_solver = default_linear_solver(dtype)
        return implicit_apply(
            primal_fn,
            inputs,
            tags,
            linear_solver,
            precondition=False,
            # Root finds, minimisations, least squares: optimistix's own rewrite.
            rewrite_fn=None if is_fixed_point_rewrite(rewrite_fn) else rewrite_fn,
        )


ImplicitAdjoint.__init__.__doc__ = """**Arguments:**

- `linear_solver`: the lineax solver for the system in $I - \\partial_y f$. Default
    `None`: `lineax.GMRES(rtol=tol, atol=tol, restart=20)` with `tol = 1e-12` in
    float64, `50 ε` in float32 and `4 ε` in 16-bit dtypes (ε = machine epsilon).
"""
