"""The one mechanism behind eqxdeq's implicit adjoints.

Every gradient method of the implicit-function-theorem family applies some
approximation of $(I - \\partial f/\\partial y)^{-1}$. Here that is always a lineax
solve inside optimistix's `implicit_jvp`, on the residual $r(y) = y - f(y)$, or on the
*preconditioned* residual $r(y) = P\\,(y - f(y))$ where $P \\approx (I - \\partial
f/\\partial y)^{-1}$ is the forward solver's own inverse-Jacobian estimate (SHINE).
Because `implicit_jvp` is a `custom_jvp`, forward mode, reverse mode and higher
derivatives all come from this one definition.

This module also pins the private contract of optimistix's adjoints: the layout of
`inputs` and of the primal's residual output.
"""

import functools as ft

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import PyTree
from optimistix._fixed_point import _rewrite_fn as _optx_fixed_point_rewrite

from .._misc import field_dtype, from_view, real_dtype, to_view, while_loop, ω
from ._backward import BackwardSolver, nan_gate, Report


# optimistix's `_iterate` takes
#   inputs = (fn, solver, y0, args, options, max_steps, f_struct, aux_struct, tags)
# and the adjoint appends a `while_loop`. Its primal returns `(y, residual)` with
#   residual = (num_steps, result, dynamic_final_state, static_state, aux, stats).
INPUT_FN, INPUT_SOLVER, INPUT_Y0, INPUT_ARGS = 0, 1, 2, 3
NUM_INPUTS = 9
RESIDUAL_STATE = 2


def split_inputs(inputs):
    """`(fn, solver, args)` from an adjoint's `inputs` (with or without the appended
    `while_loop`)."""
    if len(inputs) not in (NUM_INPUTS, NUM_INPUTS + 1):
        raise RuntimeError(
            "eqxdeq relies on optimistix passing 9 `inputs` to an adjoint, but got "
            f"{len(inputs)}. This version of optimistix is not supported by eqxdeq."
        )
    return inputs[INPUT_FN], inputs[INPUT_SOLVER], inputs[INPUT_ARGS]


def is_fixed_point_rewrite(rewrite_fn) -> bool:
    """Whether optimistix handed the adjoint its fixed-point rewrite `f(y) - y`.

    That is the case exactly for `optx.fixed_point` with a fixed-point solver. A root
    find (including `optx.fixed_point` with a root finder, minimiser or least-squares
    solver, which optimistix turns into a root find of `f(y) - y` by wrapping `fn`),
    a minimisation and a least-squares solve hand over other rewrites, and `fn` in
    `inputs` is then not the fixed-point map.
    """
    return rewrite_fn is _optx_fixed_point_rewrite or (
        getattr(rewrite_fn, "__wrapped__", None) is _optx_fixed_point_rewrite
    )


def require_fixed_point_rewrite(rewrite_fn, adjoint: str) -> None:
    """Refuse, at trace time, an adjoint that approximates `(I - ∂f/∂y)⁻¹` (and so
    needs the fixed-point map `f`) anywhere but a fixed-point solve."""
    if not is_fixed_point_rewrite(rewrite_fn):
        raise ValueError(
            f"`{adjoint}` approximates $(I - ∂f/∂y)^{{-1}}$ for a fixed point "
            "`y = f(y)`, so it can only be used with `optimistix.fixed_point` and a "
            "fixed-point solver (such as `eqxdeq.Anderson`). It was given another "
            "problem: `optimistix.root_find`, `optimistix.minimise`, "
            "`optimistix.least_squares`, or `optimistix.fixed_point` with a root "
            "finder, minimiser or least-squares solver (which optimistix turns into a "
            "root find). Use `eqxdeq.ImplicitAdjoint()` or "
            "`optimistix.ImplicitAdjoint()` there, or an eqxdeq fixed-point solver "
            "(e.g. `eqxdeq.NewtonKrylov` in place of `optimistix.Newton`)."
        )


def lax_while(inputs):
    """Append the non-differentiable `lax.while_loop` the primal runs in."""
    return inputs + (ft.partial(while_loop, kind="lax"),)


def _rewrite(root, residual, inputs):
    del residual
    fn, _, args = split_inputs(inputs)
    f_val, _ = fn(root, args)
    return (root**ω - f_val**ω).ω


def _preconditioned_rewrite(root, residual, inputs):
    fn, solver, args = split_inputs(inputs)
    f_val, _ = fn(root, args)
    g = (f_val**ω - root**ω).ω
    descent_state = residual[RESIDUAL_STATE].descent_state
    # P (y - f(y)) = -H (y - f(y)) = H g, with H ≈ (∂g/∂y)^{-1}, g = f(y) - y.
    return solver.descent.inverse_jacobian_mv(descent_state, g)


def solve_dtype(tree):
    """The one dtype of the linear solve: the widest dtype of the leaves; complex
    only if every floating leaf is (see `field_dtype`)."""
    with jax.numpy_dtype_promotion("standard"):
        widest = jnp.result_type(*jtu.tree_leaves(tree))
    return field_dtype(tree, real_dtype(widest))


# The linear solve sees the fixed point with every leaf in one dtype, the widest of
# the leaves (lineax's solvers need one dtype across a pytree); `f` still runs in
# the leaves' own dtypes. For a pytree of one dtype the casts are no-ops. A pytree
# that mixes real and complex leaves is solved on the real and imaginary parts of
# its complex leaves (`to_view`), the real vector space it lives in.
# `packed = (inputs, primal_fn, rewrite, slot)`, with `slot` the statistics slot of
# `_backward.py` or None.


def _uniform_primal(packed):
    inputs, primal_fn, _, slot = packed
    root, residual = primal_fn(inputs)
    root = to_view(root, solve_dtype(inputs[INPUT_Y0]))
    # The statistics slot (see `_backward.py`): `q = p`, the root of `q - p`.
    return (root if slot is None else (root, slot)), residual


def _uniform_rewrite(root, residual, packed):
    inputs, _, rewrite, slot = packed
    y0 = inputs[INPUT_Y0]
    if slot is None:
        return to_view(rewrite(from_view(root, y0), residual, inputs), solve_dtype(y0))
    root, q = root
    out = to_view(rewrite(from_view(root, y0), residual, inputs), solve_dtype(y0))
    # `one` is exactly 1, but batched wherever the fixed point is (under `vmap`), so
    # that the slot of the linear system is too: each batch element then reports
    # its own statistics, summed into an unbatched probe by JAX's transpose.
    # (`isnan(x) | True` is True for every x, NaN included.)
    first = jtu.tree_leaves(root)[0].reshape(-1)[:1]
    one = (jnp.isnan(first) | True).astype(slot.dtype)
    return out, q - one * slot


def has_inverse_jacobian(solver) -> bool:
    descent = getattr(solver, "descent", None)
    return hasattr(descent, "inverse_jacobian_mv")


# `implicit_jvp` requires global functions; unwrap the jaxtyping import hook.
_GLOBAL = ("_rewrite", "_preconditioned_rewrite", "_uniform_primal", "_uniform_rewrite")
for _name in _GLOBAL:
    _f = globals()[_name]
    if _f.__globals__["__name__"].startswith("jaxtyping"):
        globals()[_name] = _f.__wrapped__


def _flip_tags(tags: frozenset[object]) -> frozenset[object]:
    """optimistix's tags describe `∂f/∂y - I`; our operator is `I - ∂f/∂y`."""
    swap: dict[object, object] = {
        lx.positive_semidefinite_tag: lx.negative_semidefinite_tag,
        lx.negative_semidefinite_tag: lx.positive_semidefinite_tag,
    }
    return frozenset(swap.get(tag, tag) for tag in tags)


def implicit_apply(
    primal_fn,
    inputs: PyTree,
    tags: frozenset[object],
    linear_solver: lx.AbstractLinearSolver,
    *,
    precondition: bool,
    report: Report,
    rewrite_fn=None,
):
    """Run the primal loop, with tangents from the implicit function theorem.

    The tangent of the returned fixed point is `A⁻¹ (∂f/∂θ · t)` where `A⁻¹` is
    applied by `linear_solver` to `A = I - ∂f/∂y` (or to `P A` if `precondition`).
    If `rewrite_fn` is given (any optimistix rewrite `r(y) = 0` at the solution, e.g.
    a root find's `g(y)`), `A = ∂r/∂y` with optimistix's `tags` instead.

    The linear solve runs inside a `BackwardSolver`, which reports its outcome and
    applies `report.on_failure` (see `_backward.py`).
    """
    if rewrite_fn is not None:
        rewrite = rewrite_fn
    elif precondition:
        rewrite, tags = _preconditioned_rewrite, frozenset()
    else:
        rewrite, tags = _rewrite, _flip_tags(tags)
    slot = None
    if report.needs_slot:
        slot = report.slot(real_dtype(solve_dtype(inputs[INPUT_Y0])))
        if report.on_failure == "nan":
            inputs, slot = nan_gate(inputs, slot)
    solver = BackwardSolver.wrap(linear_solver, report, slot=slot is not None)
    packed = (lax_while(inputs), primal_fn, rewrite, slot)
    root, residual = optx.internal.implicit_jvp(
        _uniform_primal, _uniform_rewrite, packed, tags, solver
    )
    if slot is not None:
        root, _ = root
    return from_view(root, inputs[INPUT_Y0]), residual


def stop_gradient_inputs(inputs):
    """Block all derivatives through the primal's inputs (used by adjoints that
    differentiate something other than the loop)."""
    dynamic, static = eqx.partition(inputs, eqx.is_inexact_array)
    return eqx.combine(lax.stop_gradient(dynamic), static)
