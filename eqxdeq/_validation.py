"""Checks of user input, shared by eqxdeq's constructors and entry points.

Every check runs in Python, at construction or at trace time, and lets traced values
through (they cannot be inspected without a host sync). A failed check raises a
`ValueError` whose message names the argument, says what was expected and what was
given.
"""

import inspect
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax.core import Tracer


class ToleranceWarning(UserWarning):
    """The tolerances are below what the dtype of the state can resolve, so the
    solve will most likely run to `max_steps` without converging.

    Emitted at trace time by [`eqxdeq.AbstractDescentSearchSolver`][]'s `init` (so by
    every descent+search solver) when the larger of the concrete `rtol` and `atol`
    is positive but below [`eqxdeq.min_tolerance`][] (the machine epsilon) of the
    least precise floating leaf of the state. Silence it with
    `warnings.filterwarnings("ignore", category=eqxdeq.ToleranceWarning)`.
    """


def describe(value: Any) -> str:
    """`value` for an error message: its repr (shortened) and its type."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, type):
        return f"the class {value.__name__}"
    kind = type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{text} ({article} {kind})"


def _concrete_scalar(value: Any) -> tuple[bool, Any]:
    """`(True, python_number)` for a concrete real scalar (Python, NumPy or JAX),
    `(False, None)` for a traced value. Raises `TypeError` for anything else."""
    if isinstance(value, Tracer):
        return False, None
    if isinstance(value, (bool, np.bool_)):
        raise TypeError
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True, float(value)
    if isinstance(value, (np.ndarray, jax.Array)):
        if value.shape != () or not (
            jnp.issubdtype(value.dtype, jnp.integer)
            or jnp.issubdtype(value.dtype, jnp.floating)
        ):
            raise TypeError
        return True, float(value)
    raise TypeError


def check_real(
    owner: str,
    field: str,
    value: Any,
    *,
    lower: float | int | None = None,
    upper: float | int | None = None,
    lower_open: bool = False,
    upper_open: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> None:
    """`owner(field=value)` must be a real scalar (not a bool) in the interval given,
    finite unless `allow_inf`; `None` if `allow_none`. Traced values pass."""
    if value is None and allow_none:
        return
    if lower is None and upper is None:
        interval = "a real number"
    else:
        lo = "(" if lower_open or lower is None else "["
        hi = ")" if upper_open or upper is None else "]"
        lo_v = "-inf" if lower is None else f"{lower:g}"
        hi_v = "inf" if upper is None else f"{upper:g}"
        interval = f"a number in {lo}{lo_v}, {hi_v}{hi}"
    if not allow_inf:
        interval = f"a finite {interval[2:]}" if interval.startswith("a ") else interval
    if allow_none:
        interval += " or None"
    try:
        concrete, number = _concrete_scalar(value)
    except TypeError:
        raise ValueError(
            f"`{owner}({field}=...)` must be {interval}, got {describe(value)}."
        ) from None
    if not concrete:
        return
    bad = math.isnan(number) or (math.isinf(number) and not allow_inf)
    if lower is not None:
        bad = bad or number < lower or (lower_open and number == lower)
    if upper is not None:
        bad = bad or number > upper or (upper_open and number == upper)
    if bad:
        raise ValueError(f"`{owner}({field}=...)` must be {interval}, got {value!r}.")


def check_int(
    owner: str,
    field: str,
    value: Any,
    *,
    minimum: int,
    allow_none: bool = False,
) -> None:
    """`owner(field=value)` must be a Python (or NumPy) int of at least `minimum`
    (not a bool, not a float such as 2.0), or `None` if `allow_none`."""
    if value is None and allow_none:
        return
    expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"`{owner}({field}=...)` must be {expected}, got {describe(value)}."
        )
    if value < minimum:
        raise ValueError(f"`{owner}({field}=...)` must be {expected}, got {value!r}.")


def check_bool(owner: str, field: str, value: Any) -> None:
    """`owner(field=value)` must be a Python bool (a traced or array bool passes)."""
    if isinstance(value, (bool, np.bool_, Tracer)):
        return
    if isinstance(value, jax.Array) and value.dtype == jnp.bool_ and value.shape == ():
        return
    raise ValueError(
        f"`{owner}({field}=...)` must be True or False, got {describe(value)}."
    )


def _ordinal(i: int) -> str:
    return {0: "first", 1: "second", 2: "third", 3: "fourth", 4: "fifth"}.get(
        i, f"{i + 1}th"
    )


def check_norm(owner: str, norm: Any, cls: type | None = None, **known: Any) -> None:
    """`owner(norm=...)` must be callable, `PyTree -> Scalar`. When `norm` is a
    number and `cls` takes `norm` positionally, say so: `Picard(1e-5, 1e-5, 0.8)`
    passes 0.8 as the norm, not as the relaxation."""
    if callable(norm):
        return
    message = (
        f"`{owner}(norm=...)` must be a callable mapping a pytree to a scalar, such "
        f"as `optimistix.max_norm` (the default), `optimistix.rms_norm` or "
        f"`optimistix.two_norm`; got {describe(norm)}."
    )
    if cls is not None:
        try:
            parameters = list(inspect.signature(cls).parameters.values())
        except (TypeError, ValueError):
            parameters = []
        positional = [
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if "norm" in positional:
            i = positional.index("norm")
            message += (
                f" `norm` is the {_ordinal(i)} positional argument of "
                f"`{owner}({', '.join(positional[: i + 1])}, ...)`"
            )
            suggestion = None
            if isinstance(norm, (int, float)) and not isinstance(norm, bool):
                for p in parameters[[q.name for q in parameters].index("norm") + 1 :]:
                    default = p.default
                    if isinstance(default, (int, float)) and not isinstance(
                        default, bool
                    ):
                        suggestion = p.name
                        break
            if suggestion is None:
                message += ": pass the arguments after it by keyword."
            else:
                before = ", ".join(
                    repr(known[n]) if n in known else n for n in positional[:i]
                )
                message += (
                    f": pass the arguments after it by keyword, e.g. "
                    f"`{owner}({before}, {suggestion}={norm!r})`."
                )
    raise ValueError(message)


def check_termination_fields(termination: Any) -> None:
    """What `Termination.__check_init__` leaves unchecked: the types of its numeric
    fields (a string `divergence_factor` would otherwise fail deep inside the solve),
    and `stall_patience=True`."""
    check_real(
        "Termination",
        "divergence_factor",
        termination.divergence_factor,
        lower=1,
        lower_open=True,
        allow_none=True,
        allow_inf=True,
    )
    check_int(
        "Termination",
        "stall_patience",
        termination.stall_patience,
        minimum=1,
        allow_none=True,
    )
    check_real(
        "Termination",
        "stall_tol",
        termination.stall_tol,
        lower=0,
        upper=1,
        upper_open=True,
    )


def check_linear_solver(owner: str, field: str, value: Any, allow_none: bool) -> None:
    """`owner(field=...)` must be a `lineax.AbstractLinearSolver` (or None)."""
    if value is None and allow_none:
        return
    if isinstance(value, lx.AbstractLinearSolver):
        return
    hint = ""
    if isinstance(value, type) and issubclass(value, lx.AbstractLinearSolver):
        hint = f" (did you mean `{value.__name__}(...)`, an instance?)"
    raise ValueError(
        f"`{owner}({field}=...)` must be a `lineax.AbstractLinearSolver` such as "
        "`lineax.GMRES(rtol, atol)`, `eqxdeq.Richardson(rtol, atol)` or "
        f"`eqxdeq.Neumann(steps)`{' or None' if allow_none else ''}; got "
        f"{describe(value)}{hint}."
    )


#
# Tolerances against the precision of the state.
#

# The tolerance floor in multiples of the machine epsilon of the state's dtype: below
# one epsilon a solve converges only when the rounded iteration happens to land on an
# exact fixed point (docs/api/results_stats.md, "Achievable tolerances", has the
# measurements behind this).
TOLERANCE_EPS_FACTOR = 1


def min_tolerance(dtype: Any) -> float:
    """The tolerance floor of a state of `dtype`: its machine epsilon (of the real
    part, for a complex dtype). A solve whose `rtol` and `atol` are both below it is
    warned about ([`eqxdeq.ToleranceWarning`][]): it converges only by luck. What
    can be relied on is a few times more; see the measured table in the
    documentation of results and statistics.

    **Arguments:**

    - `dtype`: a floating or complex dtype.

    **Returns:**

    A Python float: 2.2e-16 for float64, 1.2e-7 for float32, 9.8e-4 for float16 and
    7.8e-3 for bfloat16.
    """
    return TOLERANCE_EPS_FACTOR * float(jnp.finfo(dtype).eps)


def _least_precise_dtype(y: Any):
    dtypes = [
        jnp.result_type(x)
        for x in jtu.tree_leaves(y)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    if not dtypes:
        return None
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps))


def check_tolerances(name: str, rtol: Any, atol: Any, y: Any) -> None:
    """Warn (a [`eqxdeq.ToleranceWarning`][]) when concrete tolerances cannot be met
    in the precision of `y`: when the larger of `rtol` and `atol` is positive but
    below [`eqxdeq.min_tolerance`][] of the least precise floating leaf of `y`.
    Exactly zero tolerances (`rtol = atol = 0`) ask for a fixed number of steps and
    are not warned about; traced tolerances are not checked.

    The larger of the two counts because the criterion
    `|f(y) - y| <= atol + rtol * |f(y)|` can be met as soon as either term alone
    is reachable: `rtol` relative to `|f(y)|`, `atol` for a state of magnitude
    about 1.
    """
    values = []
    for value in (rtol, atol):
        try:
            concrete, number = _concrete_scalar(value)
        except TypeError:
            return
        if not concrete:
            return
        values.append(number)
    largest = max(values)
    dtype = _least_precise_dtype(y)
    if dtype is None or not largest > 0:
        return
    floor = min_tolerance(dtype)
    if largest < floor:
        name_ = jnp.dtype(dtype).name
        warnings.warn(
            f"`{name}(rtol={rtol!r}, atol={atol!r})`: both tolerances are below the "
            f"machine epsilon of the {name_} state ({floor:.2g}), so the solve "
            "converges only if the rounded iteration happens to land on an exact "
            "fixed point, and otherwise runs all `max_steps`. Use `rtol`/`atol` of "
            f"at least a few times {floor:.2g} for {name_} (see "
            "`eqxdeq.min_tolerance`), or a more precise dtype for the state.",
            ToleranceWarning,
            stacklevel=2,
        )


def check_newton_krylov_arguments(
    forcing: Any,
    pseudo_time_step: Any,
    line_search: Any = False,
    forcing_min: Any = None,
    forcing_max: Any = 0.5,
    owner: str = "NewtonKrylov",
) -> None:
    """The types and ranges of Newton–Krylov's settings, checked before they reach
    `NewtonKrylovDescent` (whose own comparisons fail on e.g. `forcing=None` with
    Python's "'<' not supported"). Traced values pass."""
    if isinstance(forcing, str):
        if forcing != "eisenstat-walker":
            raise ValueError(
                f"`{owner}(forcing=...)` must be 'eisenstat-walker' or a number in "
                f"(0, 1), got {forcing!r}."
            )
    else:
        try:
            check_real(
                owner,
                "forcing",
                forcing,
                lower=0,
                upper=1,
                lower_open=True,
                upper_open=True,
            )
        except ValueError:
            raise ValueError(
                f"`{owner}(forcing=...)` must be 'eisenstat-walker' or a number in "
                f"(0, 1), got {describe(forcing)}."
            ) from None
    check_real(
        owner,
        "pseudo_time_step",
        pseudo_time_step,
        lower=0,
        lower_open=True,
        allow_none=True,
    )
    check_real(
        owner,
        "forcing_max",
        forcing_max,
        lower=0,
        upper=1,
        lower_open=True,
        upper_open=True,
    )
    check_real(
        owner, "forcing_min", forcing_min, lower=0, lower_open=True, allow_none=True
    )
    if not isinstance(line_search, bool):
        raise ValueError(
            f"`{owner}(line_search=...)` must be a bool, got {describe(line_search)}."
        )
