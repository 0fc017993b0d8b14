"""`eqxdeq.fixed_point`: `optimistix.fixed_point` with precise errors."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jax.core import Tracer
from jaxtyping import PyTree

from ._adjoint import ImplicitAdjoint
from ._results import RESULTS
from ._validation import describe


_SOLVER_TYPES = (
    optx.AbstractFixedPointSolver,
    optx.AbstractRootFinder,
    optx.AbstractLeastSquaresSolver,
    optx.AbstractMinimiser,
)


def _cast_struct(x) -> jax.ShapeDtypeStruct:
    """The shape and dtype of `x` (an array, a Python number or a
    `jax.ShapeDtypeStruct`) after optimistix's cast of `y0` and of `fn`'s output:
    integer and boolean dtypes become the default floating dtype."""
    dtype = x.dtype if isinstance(x, jax.ShapeDtypeStruct) else jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(float)
    return jax.ShapeDtypeStruct(jnp.shape(x), dtype)


def _struct(tree):
    """Shapes and dtypes of `tree`'s leaves as they are (no weak types)."""
    return jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct(
            jnp.shape(x),
            x.dtype if isinstance(x, jax.ShapeDtypeStruct) else jnp.result_type(x),
        ),
        tree,
    )


def _cast(tree):
    return jtu.tree_map(_cast_struct, tree)


def _path(path) -> str:
    return "`y0" + jtu.keystr(path) + "`" if path else "`y0`"


def _is_pair(out) -> bool:
    return isinstance(out, (tuple, list)) and len(out) == 2


def _same(a, b) -> bool:
    """Whether `a` and `b` agree as optimistix compares them (after its casts)."""
    return eqx.tree_equal(_cast(a), _cast(b)) is True


def _explain_mismatch(y0_struct, out_struct, raw_y0_struct) -> str:
    """Where `fn`'s output (cast as optimistix casts it) differs from `y0`."""
    y0_leaves, y0_def = jtu.tree_flatten_with_path(y0_struct)
    out_leaves, out_def = jtu.tree_flatten_with_path(out_struct)
    if y0_def != out_def:
        y0_paths = {jtu.keystr(p) for p, _ in y0_leaves}
        out_paths = {jtu.keystr(p) for p, _ in out_leaves}
        detail = ""
        missing = sorted(y0_paths - out_paths)
        extra = sorted(out_paths - y0_paths)
        if "" not in y0_paths | out_paths:  # (Not for a single array.)
            if missing:
                detail += f" Missing from the output: {', '.join(missing)}."
            if extra:
                detail += f" Not in `y0`: {', '.join(extra)}."
        return (
            "`fn(y, args)` must return a pytree of the structure of `y0`: expected "
            f"{y0_def}, got {out_def}.{detail}"
        )
    raw = jtu.tree_leaves(raw_y0_struct)
    for ((path, expected), (_, got)), raw_leaf in zip(
        zip(y0_leaves, out_leaves, strict=True), raw, strict=True
    ):
        if expected.shape != got.shape:
            return (
                f"`fn(y, args)` must return the shapes of `y0`: at {_path(path)} it "
                f"returned shape {got.shape}, expected {expected.shape}."
            )
        if expected.dtype != got.dtype:
            cast = ""
            if raw_leaf.dtype != expected.dtype:
                cast = (
                    f" (`y0` there is {raw_leaf.dtype}, which optimistix casts to "
                    f"the default floating dtype {expected.dtype})"
                )
            return (
                "`fn(y, args)` must return the dtypes of `y0`: at "
                f"{_path(path)} it returned {got.dtype}, expected "
                f"{expected.dtype}{cast}. Cast the output (e.g. "
                "`out.astype(y.dtype)`) or pass a `y0` of the dtype `fn` returns."
            )
    return (
        "The input and output of `fixed_point_fn` must have the same structure: "
        f"`y0` is {y0_struct}, `fn(y, args)` returned {out_struct}."
    )


def _check_fn(fn, y0, args, has_aux: bool) -> None:
    """Trace-time checks of `fn`'s output against `y0`, with `jax.eval_shape`."""
    y0_cast = jtu.tree_map(lambda x: jnp.asarray(x, _cast_struct(x).dtype), y0)
    raw = eqx.filter_eval_shape(fn, y0_cast, args)
    if has_aux:
        if not _is_pair(raw):
            hint = ""
            if _same(raw, y0):
                hint = " It returned the structure of `y0`: did you mean has_aux=False?"
            raise ValueError(
                "With `has_aux=True`, `fn(y, args)` must return a pair `(f(y), aux)`; "
                f"it returned {_describe_struct(raw)}.{hint}"
            )
        out = raw[0]
    else:
        out = raw
    if _same(out, y0):
        return
    if not has_aux and _is_pair(raw) and _same(raw[0], y0):
        raise ValueError(
            "`fn(y, args)` returned a pair whose first element has the structure of "
            "`y0`, as `(f(y), aux)` does: did you mean has_aux=True? (Without it, "
            "the whole output must have the structure of `y0`.)"
        )
    message = _explain_mismatch(_cast(y0), _cast(out), _struct(y0))
    if has_aux and _same(raw, y0):
        message += " The whole output has the structure of `y0`: did you mean "
        message += "has_aux=False?"
    raise ValueError(message)


def _describe_struct(tree) -> str:
    if isinstance(tree, jax.ShapeDtypeStruct):
        return f"a single array of shape {tree.shape} and dtype {tree.dtype}"
    if isinstance(tree, (tuple, list)):
        return f"a {type(tree).__name__} of length {len(tree)}"
    return f"{jtu.tree_structure(tree)}"


def _check_y0(y0) -> None:
    for path, leaf in jtu.tree_flatten_with_path(y0)[0]:
        dtype = jnp.result_type(leaf)
        if dtype == jnp.bool_:
            raise ValueError(
                f"`y0` must be floating (or complex): {_path(path)} is boolean. A "
                "fixed-point iteration moves `y` continuously; cast it, e.g. "
                "`y0.astype(float)`, if that is intended."
            )
        if isinstance(leaf, Tracer) or not jnp.issubdtype(dtype, jnp.inexact):
            continue
        # (On the device for a JAX array: one bool comes back, not the array.)
        finite = (
            jnp.all(jnp.isfinite(leaf))
            if isinstance(leaf, jax.Array)
            else (np.all(np.isfinite(np.asarray(leaf))))
        )
        if not finite:
            raise ValueError(
                f"`y0` must be finite: {_path(path)} contains NaN or inf, so every "
                "iterate would be non-finite."
            )


def _check_arguments(solver, adjoint, max_steps, has_aux, throw, options, tags):
    if not isinstance(solver, _SOLVER_TYPES):
        hint = ""
        if isinstance(solver, type) and issubclass(solver, _SOLVER_TYPES):
            hint = f" Did you mean `{solver.__name__}(rtol, atol)`, an instance?"
        raise ValueError(
            "`solver` must be a fixed-point solver such as `eqxdeq.Anderson(rtol, "
            "atol)` (any `optimistix.AbstractFixedPointSolver`, or an optimistix root "
            f"finder, least-squares solver or minimiser), got {describe(solver)}."
            + hint
        )
    if not isinstance(adjoint, optx.AbstractAdjoint):
        hint = ""
        if isinstance(adjoint, type) and issubclass(adjoint, optx.AbstractAdjoint):
            hint = f" Did you mean `{adjoint.__name__}()`, an instance?"
        raise ValueError(
            "`adjoint` must be an `optimistix.AbstractAdjoint` such as "
            f"`eqxdeq.ImplicitAdjoint()`, got {describe(adjoint)}." + hint
        )
    if max_steps is not None and (
        isinstance(max_steps, (bool, np.bool_))
        or not isinstance(max_steps, (int, np.integer))
        or max_steps < 1
    ):
        raise ValueError(
            "`max_steps` must be a positive int or None (no limit), got "
            f"{describe(max_steps)}. (For a bound that changes without recompiling, "
            "pass `options={'step_budget': jnp.asarray(k)}` to an eqxdeq solver.)"
        )
    for name, value in (("has_aux", has_aux), ("throw", throw)):
        if not isinstance(value, bool):
            raise ValueError(
                f"`{name}` must be True or False (a Python bool), got "
                f"{describe(value)}."
            )
    if options is not None and not isinstance(options, dict):
        raise ValueError(
            "`options` must be a dict (or None), e.g. `{'step_budget': 10}`, got "
            f"{describe(options)}."
        )
    if not isinstance(tags, frozenset):
        raise ValueError(
            "`tags` must be a frozenset of lineax tags, e.g. "
            f"`frozenset({{lineax.symmetric_tag}})`, got {describe(tags)}."
        )


def precise_result(sol: optx.Solution) -> RESULTS:
    """The precise outcome of a solve, as an [`eqxdeq.RESULTS`][]:
    `sol.stats["result"]` when the solver records one (every eqxdeq solver does) and
    it is a failure, else `sol.result` promoted."""
    promoted = RESULTS.promote(sol.result)
    precise = sol.stats.get("result", None) if isinstance(sol.stats, dict) else None
    if not isinstance(precise, RESULTS):
        return promoted
    failed = promoted != RESULTS.successful
    return RESULTS.where(failed & (precise != RESULTS.successful), precise, promoted)


@eqx.filter_jit
def _solve(fn, solver, y0, args, options, has_aux, max_steps, adjoint, throw, tags):
    _check_fn(fn, y0, args, has_aux)
    sol = optx.fixed_point(
        fn,
        solver,
        y0,
        args,
        options,
        has_aux=has_aux,
        max_steps=max_steps,
        adjoint=adjoint,
        throw=False,
        tags=tags,
    )
    if throw:
        result = precise_result(sol)
        sol = result.error_if(sol, result != RESULTS.successful)
    return sol


def fixed_point(
    fn,
    solver,
    y0: PyTree,
    args: PyTree[Any] = None,
    options: dict[str, Any] | None = None,
    *,
    has_aux: bool = False,
    max_steps: int | None = 256,
    adjoint: optx.AbstractAdjoint = ImplicitAdjoint(),
    throw: bool = True,
    tags: frozenset[object] = frozenset(),
) -> optx.Solution:
    r"""Find a fixed point $y = f(y, \text{args})$: exactly
    [`optimistix.fixed_point`][] (same arguments, same [`optimistix.Solution`][],
    same `sol.result`), with precise error messages.

    Use it in place of `optx.fixed_point` whenever an error should say what went
    wrong, which is almost always; the two differ only in their errors:

    - **Bad input is caught before the solve, at trace time**, with a message that
        names the argument, what was expected and what was given:
        - `fn`'s output is evaluated abstractly (`jax.eval_shape`, no computation)
            and compared with `y0`: a pytree structure, shape or dtype mismatch
            names the leaf (e.g. `` `y0['z'][1]` ``) and both sides;
        - `has_aux=True` with an `fn` that returns a single array, and `(f(y), aux)`
            returned without `has_aux=True` ("did you mean has_aux=True?");
        - a boolean `y0` is rejected (cast it if intended); an integer `y0` is cast
            to the default floating dtype, as `optx.fixed_point` does. A concrete
            (not traced) `y0` must be finite;
        - `solver` must be a solver instance (not its class, e.g.
            `eqxdeq.Anderson` instead of `eqxdeq.Anderson(1e-5, 1e-5)`), `adjoint`
            an adjoint instance, `max_steps` a positive int or `None`, `throw` and
            `has_aux` bools, `options` a dict.

        Incompatible solver/adjoint pairs (e.g. [`eqxdeq.ReversibleAdjoint`][]
        with any solver but [`eqxdeq.Reversible`][]; [`eqxdeq.JFB`][] with a root
        finder) are rejected by the adjoint itself, as under `optx.fixed_point`.

    - **Failures raise eqxdeq's precise reason.** `optx.fixed_point(...,
        throw=True)` can only raise an [`optimistix.RESULTS`][] message: its loop
        carries no other result type, so a divergence and a stall both read as
        optimistix's generic "nonlinear divergence". Here the solve runs with
        `throw=False` and the error is raised from the [`eqxdeq.RESULTS`][] in
        `sol.stats["result"]` (every eqxdeq solver records one; other solvers'
        `sol.result` is used as it is), e.g. "The fixed-point iteration stalled:
        the best residual did not decrease ...". It is raised with
        [`equinox.error_if`][], so it works under `jax.jit` and `jax.vmap` and
        respects `EQX_ON_ERROR` (`EQX_ON_ERROR=nan` returns NaNs instead).

    With `throw=False` the result is exactly that of `optx.fixed_point`: read
    `sol.result == optimistix.RESULTS.successful`, or `sol.stats["result"]` for the
    precise reason (see [results and statistics](results_stats.md)).

    ```python
    sol = eqxdeq.fixed_point(fn, eqxdeq.Anderson(rtol=1e-5, atol=1e-5), y0, args)
    ```

    The checks cost nothing at run time: they happen once per compilation (the
    finiteness of a concrete `y0` once per call, outside `jax.jit`).

    **Arguments:**

    - `fn`: the function `fn(y, args)`, returning a pytree of the structure, shapes
        and dtypes of `y` (or `(f(y), aux)` with `has_aux=True`).
    - `solver`: a fixed-point solver, e.g. [`eqxdeq.Anderson`][]; or, as for
        `optx.fixed_point`, an optimistix root finder, least-squares solver or
        minimiser (applied to $f(y) - y$).
    - `y0`: the initial guess, a pytree of floating (or complex) arrays.
    - `args`: passed as the `args` of `fn(y, args)`.
    - `options`: the solver's runtime options, e.g. `{"step_budget": k}` (see
        [`eqxdeq.AbstractDescentSearchSolver`][]); unknown keys are an error.
    - `has_aux`: whether `fn` returns `(f(y), aux)`.
    - `max_steps`: the maximum number of steps, a positive int, or `None`.
    - `adjoint`: how to differentiate the solve; default
        [`eqxdeq.ImplicitAdjoint`][]`()` (matrix-free GMRES), unlike
        `optx.fixed_point`'s `optimistix.ImplicitAdjoint()`.
    - `throw`: raise on failure (default), with eqxdeq's precise message; `False`
        returns the solution with its result codes instead.
    - `tags`: lineax tags describing the Jacobian of `y ↦ fn(y, args) - y`.

    **Returns:**

    An [`optimistix.Solution`][], as `optx.fixed_point` returns.
    """
    _check_arguments(solver, adjoint, max_steps, has_aux, throw, options, tags)
    _check_y0(y0)
    return _solve(
        fn, solver, y0, args, options, has_aux, max_steps, adjoint, throw, tags
    )
