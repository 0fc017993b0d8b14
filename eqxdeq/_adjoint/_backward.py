"""What the backward pass of an eqxdeq adjoint reports, and what it does when it fails.

Every adjoint with a backward linear solve runs it through `BackwardSolver`, a lineax
solver that wraps the adjoint's own. lineax calls its `compute` for the transposed
system in reverse mode (and for the system itself in forward mode), so that is where
the outcome of the solve is known. There it

- turns lineax's result (and the precise `stats["result"]` of eqxdeq's own linear
  solvers) into a precise `eqxdeq.RESULTS` member of the backward pass;
- applies the adjoint's `on_failure` policy: raise with a message naming the adjoint
  and its linear solver, substitute the right-hand side (the JFB gradient), or leave
  the NaN to a gate (below); and always hands lineax a finite solution with
  `successful`, so that lineax's own transposed solve (which always throws) never
  raises its generic message;
- reports `BackwardStats`: to the adjoint's `callback` (a host callback), and into a
  *slot* of the linear system, through which they become the cotangent of the
  adjoint's `probe`.

The slot: with a probe (or `on_failure="nan"`), the implicit system in the state
`y` is extended by a block `q` of `BackwardStats` size with the residual `q - p`,
where `p` is the probe. Its Jacobian is block diagonal with an identity block, so the
tangent of `y` is unchanged, and `q` is dropped. In reverse mode the transposed solve
is asked for the `q` block of `(A^T)^{-1} (ȳ, 0)`, which is zero; `BackwardSolver`
writes the statistics there instead, and the transpose of `q - p` hands them to `p`
as its cotangent. Everything stays a JAX value: no effects, works under `jit` and
`vmap` (batched statistics), and sums over every solve that shares the probe.

`on_failure="nan"` cannot put NaNs into the solution (lineax would then raise
"singular"), so it puts NaNs into the cotangents of the solve's inputs instead: a
`custom_vjp` gate on those inputs reads the failure count from the slot's cotangent.
(A `custom_vjp`: reverse mode only.)
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Float, PyTree

from .._misc import stats_dtype, tree_allfinite, tree_where, two_norm, ω
from .._results import RESULTS


ON_FAILURE = ("raise", "nan", "jfb")

# The layout of `BackwardStats.data`.
_SOLVES, _STEPS, _RESIDUAL, _RELATIVE, _FAILED, _FALLBACKS = range(6)
_RESULTS0 = 6
STATS_SIZE = _RESULTS0 + len(RESULTS)


class BackwardStats(eqx.Module):
    r"""What the backward (adjoint) linear solves of a gradient computation did.

    Pass a zero probe to an adjoint and differentiate with respect to it: its
    gradient *is* the statistics of the backward solves it saw.

    ```python
    def loss(params, probe):
        adjoint = eqxdeq.ImplicitAdjoint(probe=probe)
        sol = optx.fixed_point(f, solver, z0, params, adjoint=adjoint)
        return jnp.sum(sol.value ** 2)

    grads, stats = jax.grad(loss, argnums=(0, 1))(params, eqxdeq.BackwardStats.probe())
    stats.steps, stats.residual, stats.result   # steps, ‖Aᵀv - ȳ‖₂, eqxdeq.RESULTS
    ```

    Every field is a *sum over the solves* that shared the probe: under `jax.vmap` of
    the solve inside the loss (a batch), or when the layer is applied several times,
    `stats.solves` counts them and `stats.steps` is their total. (Divide by
    `stats.solves` for means.) With the probe batched as well, e.g. per-sample
    gradients `jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, None, 0))`,
    each field has the batch shape. The same object, for one solve (under `vmap`: one
    per batch element, stacked), is what an adjoint's `callback` receives.

    The probe's *value* is never used (only its cotangent is), so an optimiser that
    updates it along with the parameters of a model does no harm.

    The statistics are those of the linear solve the adjoint runs, $A^\top v =
    \bar y$ with $A = I - \partial f/\partial y$ at the fixed point
    (preconditioned for [`eqxdeq.ShineAdjoint`][]; for
    [`eqxdeq.ReversibleAdjoint`][] see there), and of the solution $v$ the linear
    solver returned, before any fallback replaced it.

    **Attributes** (properties of the one array `data`):

    - `solves`: the number of backward solves.
    - `steps`: their total number of steps, as each linear solver counts them
        (`stats["num_steps"]` of the lineax solve: matrix-vector products for
        eqxdeq's solvers, iterations for lineax's; 0 for a direct solver such as
        `lineax.LU`).
    - `residual`: the sum of the final residuals $\|A^\top v - \bar y\|_2$,
        recomputed from the linear solver's $v$ (one extra matrix-vector product per
        solve, only when reporting).
    - `relative_residual`: the sum of $\|A^\top v - \bar y\|_2 / \|\bar y\|_2$
        (0 for a zero cotangent).
    - `failed`: the number of solves whose result was not successful, whatever the
        `on_failure` policy did about it.
    - `fallbacks`: the number of failed solves replaced by the JFB gradient
        (`on_failure="jfb"`).
    - `results`: counts per [`eqxdeq.RESULTS`][] member (indexed by its value).
    - `result`: the `eqxdeq.RESULTS` of the solves: `successful`, or the failure
        with the lowest code among those that occurred (for one solve, its result).
        Read its message with `eqxdeq.RESULTS[stats.result]`.
    """

    data: Float[Array | np.ndarray, "*batch k"]

    @classmethod
    def probe(cls, dtype=None) -> "BackwardStats":
        """A zero probe, to pass as `probe=` to an adjoint and differentiate.

        **Arguments:**

        - `dtype`: a floating dtype; default JAX's default float (float32, or
            float64 with `jax_enable_x64`). Counts are exact up to $2^{24}$ in
            float32.

        **Returns:**

        A `BackwardStats` of zeros.
        """
        if dtype is None:
            dtype = jnp.zeros(()).dtype
        return cls(data=jnp.zeros((STATS_SIZE,), dtype))

    def __check_init__(self):
        shape = getattr(self.data, "shape", None)
        if shape is not None and (len(shape) == 0 or shape[-1] != STATS_SIZE):
            raise ValueError(
                f"`BackwardStats(data=...)` must have a last axis of size {STATS_SIZE}"
                f", got shape {shape}. Make a probe with `BackwardStats.probe()`."
            )

    @property
    def solves(self) -> Array:
        return jnp.asarray(self.data)[..., _SOLVES]

    @property
    def steps(self) -> Array:
        return jnp.asarray(self.data)[..., _STEPS]

    @property
    def residual(self) -> Array:
        return jnp.asarray(self.data)[..., _RESIDUAL]

    @property
    def relative_residual(self) -> Array:
        return jnp.asarray(self.data)[..., _RELATIVE]

    @property
    def failed(self) -> Array:
        return jnp.asarray(self.data)[..., _FAILED]

    @property
    def fallbacks(self) -> Array:
        return jnp.asarray(self.data)[..., _FALLBACKS]

    @property
    def results(self) -> Array:
        return jnp.asarray(self.data)[..., _RESULTS0:]

    @property
    def result(self) -> RESULTS:
        failures = jnp.asarray(self.results)[..., 1:] > 0
        index = jnp.where(
            jnp.any(failures, axis=-1), 1 + jnp.argmax(failures, axis=-1), 0
        )
        return results_item(index)


def results_item(value) -> RESULTS:
    """The `RESULTS` member of (integer, possibly traced or batched) `value`."""
    value = jnp.asarray(value, jnp.int32)
    return eqx.tree_at(lambda r: r._value, RESULTS.successful, value)


def one_solve(
    *,
    steps,
    residual,
    relative,
    result: RESULTS,
    fallback,
    dtype,
) -> Float[Array, " k"]:
    """`BackwardStats.data` for one solve."""
    head = jnp.stack(
        [
            jnp.ones((), dtype),
            jnp.asarray(steps).astype(dtype),
            jnp.asarray(residual).astype(dtype),
            jnp.asarray(relative).astype(dtype),
            (result != RESULTS.successful).astype(dtype),
            jnp.asarray(fallback).astype(dtype),
        ]
    )
    counts = jax.nn.one_hot(result._value, len(RESULTS), dtype=dtype)
    return jnp.concatenate([head, counts])


def check_on_failure(value, adjoint: str):
    if value not in ON_FAILURE:
        raise ValueError(
            f"`{adjoint}(on_failure=...)` must be one of 'raise', 'nan' or 'jfb', "
            f"got {value!r}."
        )


def check_callback(value, adjoint: str):
    if value is not None and not callable(value):
        raise ValueError(
            f"`{adjoint}(callback=...)` must be a function of one `BackwardStats`, "
            f"or None; got {value!r}."
        )


def check_probe(value, adjoint: str):
    if value is not None and not isinstance(value, BackwardStats):
        raise ValueError(
            f"`{adjoint}(probe=...)` must be an `eqxdeq.BackwardStats` (make one with "
            f"`eqxdeq.BackwardStats.probe()`), or None; got {type(value).__name__}."
        )


#
# Descriptions, for error messages.
#


def _describe_value(value) -> str | None:
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.3g}"
    if isinstance(value, Tracer):
        return "<traced>"
    if eqx.is_array(value) and jnp.ndim(value) == 0:
        return _describe_value(value.item())
    return None


_FIELDS = ("steps", "rtol", "atol", "max_steps", "damping", "restart")


def describe_solver(solver: lx.AbstractLinearSolver) -> str:
    """A short description of a linear solver, e.g. `eqxdeq.Neumann(steps=50)` or
    `lineax.GMRES(rtol=1e-05, atol=1e-05, restart=20)`."""
    cls = type(solver)
    module = cls.__module__.split(".")[0]
    pieces = []
    for name in _FIELDS:
        if hasattr(solver, name):
            value = getattr(solver, name)
            if name == "damping" and isinstance(value, int | float) and value == 1:
                continue  # the default of eqxdeq's solvers
            text = _describe_value(value)
            if text is not None:
                pieces.append(f"{name}={text}")
    return f"{module}.{cls.__name__}({', '.join(pieces)})"


_PREFIX = "backward (adjoint) linear solve"


def raise_messages(description: str) -> list[str]:
    """The message raised for each pair `(RESULTS member, lineax.RESULTS member)`
    at index `raise_index(...)`: eqxdeq's precise message naming the adjoint and its
    linear solver (`"... backward (adjoint) linear solve of `<description>` ..."`),
    followed by the linear solver's own message if it had one."""
    messages = []
    for message in RESULTS._index_to_message:  # pyright: ignore
        if _PREFIX in message:
            message = message.replace(_PREFIX, f"{_PREFIX} of `{description}`", 1)
        else:
            message = f"`{description}`: {message}"
        for lineax_message in lx.RESULTS._index_to_message:  # pyright: ignore
            if lineax_message:
                messages.append(
                    f"{message}\n\nThe linear solver said: {lineax_message}"
                )
            else:
                messages.append(message)
    return messages


def raise_index(result: RESULTS, lineax_result: lx.RESULTS | None = None) -> Array:
    """The index into `raise_messages` of a precise and a lineax result."""
    lineax_value = 0 if lineax_result is None else lineax_result._value
    return result._value * len(lx.RESULTS) + lineax_value


#
# Results.
#


def _backward_table() -> np.ndarray:
    """The backward `RESULTS` member for each `RESULTS` member of a linear solve."""
    mapping = {
        "successful": "successful",
        "linear_solve_diverged": "backward_diverged",
        "max_steps_reached": "backward_max_steps_reached",
        "stagnation": "backward_stagnation",
        "breakdown": "backward_breakdown",
        "singular": "backward_singular",
        "nonfinite_input": "backward_nonfinite_cotangent",
    }
    names = {item._value.item(): name for name, item in RESULTS._name_to_item.items()}  # pyright: ignore
    table = np.zeros(len(RESULTS), np.int32)
    for index, name in names.items():
        if name.startswith("backward_"):
            target = name
        else:
            target = mapping.get(name, "backward_failed")
        table[index] = getattr(RESULTS, target)._value.item()
    return table


_BACKWARD_TABLE = _backward_table()


def backward_result(
    result: lx.RESULTS, stats: dict[str, Any], solution, vector
) -> RESULTS:
    """The precise outcome of a backward solve, as a `RESULTS.backward_*` member (or
    `successful`)."""
    precise = stats.get("result", None)
    if not isinstance(precise, RESULTS):
        precise = RESULTS.promote(result)
    # As lineax does after `compute`: a "successful" non-finite solution is singular
    # (or the input was non-finite already).
    finite_x = tree_allfinite(solution)
    finite_b = tree_allfinite(vector)
    precise = RESULTS.where(
        (precise == RESULTS.successful) & jnp.logical_not(finite_x),
        RESULTS.singular,  # pyright: ignore[reportArgumentType]
        precise,
    )
    nonfinite = RESULTS.nonfinite_input
    precise = RESULTS.where(finite_b, precise, nonfinite)  # pyright: ignore
    with jax.ensure_compile_time_eval():
        value = jnp.asarray(_BACKWARD_TABLE)[precise._value]
    return results_item(value)


#
# The backward solver.
#


class Report(eqx.Module):
    """How an adjoint reports its backward solves and handles their failure: the
    static settings plus the (optional) probe array."""

    description: str = eqx.field(static=True)
    on_failure: str = eqx.field(static=True)
    callback: Callable | None = eqx.field(static=True)
    probe: BackwardStats | None
    # Accept a stagnated Krylov solve whose relative residual is at most this (the
    # default linear solver of `ImplicitAdjoint`, whose tolerance eqxdeq chose).
    stagnation_tol: float | None = eqx.field(default=None, static=True)

    @property
    def needs_slot(self) -> bool:
        return self.probe is not None or self.on_failure == "nan"

    @property
    def reports(self) -> bool:
        return self.needs_slot or self.callback is not None

    def slot(self, dtype) -> Float[Array, " k"]:
        if self.probe is None:
            return jnp.zeros((STATS_SIZE,), dtype)
        return jnp.asarray(self.probe.data).astype(dtype)


class _BackwardState(eqx.Module):
    inner: Any
    operator: lx.AbstractLinearOperator | None
    transposed: bool = eqx.field(static=True)


def _restrict(operator: lx.AbstractLinearOperator, slot_struct):
    """The `y` block of the block-diagonal operator on `(y, q)`."""
    operator = lx.linearise(operator)
    y_struct = operator.in_structure()[0]

    def mv(y):
        q = jnp.zeros(slot_struct.shape, slot_struct.dtype)
        return operator.mv((y, q))[0]

    tags = getattr(operator, "tags", frozenset())
    return lx.FunctionLinearOperator(mv, y_struct, tags)


def _host_callback(callback, dtype, data):
    callback(BackwardStats(data=np.asarray(data)))
    return np.zeros(np.shape(data)[:-1], dtype)


def call_back(callback: Callable, data: Array, tree: PyTree) -> PyTree:
    """Call `callback(BackwardStats(data))` on the host, once per call of the
    compiled code (under `vmap`: once, with the batch in `data`), and return `tree`
    unchanged, but depending on the call, so that it is not dead code.

    A `jax.pure_callback` (not `jax.debug.callback`, which runs once per batch
    element under `vmap`, and whose `ordered=True` cannot cross lineax's primitive).
    """
    data = lax.stop_gradient(data)
    token = jax.pure_callback(
        ft.partial(_host_callback, callback, data.dtype),
        jax.ShapeDtypeStruct((), data.dtype),
        data,
        vmap_method="broadcast_all",
    )
    # `x - (+0)` is `x`, bit for bit (signed zeros included): a data dependence
    # that keeps the callback alive and changes nothing.
    return jtu.tree_map(lambda x: x - token.astype(x.dtype), tree)


class BackwardSolver(lx.AbstractLinearSolver[_BackwardState]):
    """The adjoint's linear solver, with the adjoint's reporting and failure policy
    around it (see the module docstring)."""

    inner: lx.AbstractLinearSolver
    description: str = eqx.field(static=True)
    on_failure: str = eqx.field(static=True)
    callback: Callable | None = eqx.field(static=True)
    reports: bool = eqx.field(static=True)
    slot: bool = eqx.field(static=True)
    stagnation_tol: float | None = eqx.field(static=True)

    @classmethod
    def wrap(cls, inner: lx.AbstractLinearSolver, report: Report, slot: bool):
        # The probe itself stays out: the linear solver may not carry tangents.
        return cls(
            inner,
            report.description,
            report.on_failure,
            report.callback,
            report.reports,
            slot,
            report.stagnation_tol,
        )

    def init(self, operator, options):
        if self.slot:
            operator = _restrict(operator, operator.in_structure()[1])
        inner = self.inner.init(operator, options)
        keep = self.reports or self.stagnation_tol is not None
        return _BackwardState(inner, operator if keep else None, transposed=False)

    def compute(self, state, vector, options):
        if self.slot:
            vector, slot_vector = vector
        else:
            slot_vector = None
        solution, result, stats = self.inner.compute(state.inner, vector, options)
        precise = backward_result(result, stats, solution, vector)
        dtype = slot_vector.dtype if slot_vector is not None else stats_dtype(vector)
        norm_b = two_norm(vector, dtype)

        def relative_residual():
            # ‖A v - b‖₂ / ‖b‖₂ of the linear solver's own solution (one product).
            operator = state.operator
            assert operator is not None
            residual = two_norm((operator.mv(solution) ** ω - vector**ω).ω, dtype)
            relative = jnp.where(
                norm_b > 0, residual / jnp.where(norm_b > 0, norm_b, 1), 0
            )
            return residual, relative

        if self.reports:
            residual, relative = relative_residual()
        if self.stagnation_tol is not None:
            # A stagnation at the dtype's resolution is as good as this dtype gets:
            # success. (Measured only when it stagnated, unless reporting anyway.)
            stagnated = precise == RESULTS.backward_stagnation
            if self.reports:
                stagnated_relative = relative  # pyright: ignore
            else:
                stagnated_relative = lax.cond(
                    stagnated,
                    lambda: relative_residual()[1],
                    lambda: jnp.asarray(jnp.inf, dtype),
                )
            accept = stagnated & (stagnated_relative <= self.stagnation_tol)
            success = RESULTS.successful
            precise = RESULTS.where(accept, success, precise)  # pyright: ignore
        failed = precise != RESULTS.successful
        bad_cotangent = precise == RESULTS.backward_nonfinite_cotangent
        policy = self.on_failure
        if policy == "jfb":
            fallback = failed & jnp.logical_not(bad_cotangent)
            solution = tree_where(fallback, vector, solution)
            raise_if = bad_cotangent
        elif policy == "nan":
            # Finite, so that lineax does not raise; the gate puts the NaNs in.
            fallback = jnp.array(False)
            zeros = jtu.tree_map(jnp.zeros_like, vector)
            finite = tree_where(bad_cotangent, zeros, vector)
            solution = tree_where(failed, finite, solution)
            raise_if = jnp.array(False)
        else:
            fallback = jnp.array(False)
            raise_if = failed
        if policy != "nan":
            solution = eqx.branched_error_if(
                solution,
                raise_if,
                raise_index(precise, result),
                raise_messages(self.description),
            )
        if self.reports and state.transposed:
            data = one_solve(
                steps=stats.get("num_steps", 0),
                residual=residual,  # pyright: ignore
                relative=relative,  # pyright: ignore
                result=precise,
                fallback=fallback,
                dtype=dtype,
            )
            data = lax.stop_gradient(data)
            if self.callback is not None:
                solution = call_back(self.callback, data, solution)
            if slot_vector is not None:
                # optimistix's tangent is `-solve(...)` and the slot's residual is
                # `q - p`: the probe's cotangent is minus what is written here.
                slot_vector = -data
        if self.slot:
            solution = (solution, slot_vector)
        return solution, lx.RESULTS.successful, stats

    def transpose(self, state, options):
        inner, options = self.inner.transpose(state.inner, options)
        operator = None if state.operator is None else state.operator.transpose()
        return _BackwardState(inner, operator, not state.transposed), options

    def conj(self, state, options):
        inner, options = self.inner.conj(state.inner, options)
        operator = None if state.operator is None else lx.conj(state.operator)
        return _BackwardState(inner, operator, state.transposed), options

    def assume_full_rank(self):
        return self.inner.assume_full_rank()


#
# The NaN gate.
#


@jax.custom_vjp
def _nan_gate(dynamic, slot):
    return dynamic, slot


def _nan_gate_fwd(dynamic, slot):
    return (dynamic, slot), None


def _nan_gate_bwd(_, cotangents):
    dynamic_bar, slot_bar = cotangents
    failed = slot_bar[..., _FAILED] > 0
    dynamic_bar = jtu.tree_map(
        lambda g: jnp.where(failed, jnp.asarray(jnp.nan, g.dtype), g), dynamic_bar
    )
    return dynamic_bar, slot_bar


_nan_gate.defvjp(_nan_gate_fwd, _nan_gate_bwd)


def nan_gate(inputs: PyTree, slot: Array) -> tuple[PyTree, Array]:
    """Identity on `(inputs, slot)`; in reverse mode, the cotangents of the floating
    arrays of `inputs` become NaN when the slot's cotangent counts a failure."""
    dynamic, static = eqx.partition(inputs, eqx.is_inexact_array)
    dynamic, slot = _nan_gate(dynamic, slot)
    return eqx.combine(dynamic, static), slot


#
# The unrolled phantom gradient: no solve, so a tap.
#


@ft.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _unroll_tap(root, slot, steps):
    del steps
    return root, jtu.tree_map(jnp.zeros_like, root)


def _unroll_tap_fwd(root, slot, steps):
    return _unroll_tap(root, slot, steps), slot


def _unroll_tap_bwd(steps, slot, cotangents):
    dtype = slot.dtype
    root_bar, zero_bar = cotangents
    # The output is `y_k - zero`, so `zero`'s cotangent is `-ȳ`; `root`'s is the
    # cotangent that reached the start, `ȳ_0 = Mᵀ ⋯ Mᵀ ȳ`.
    norm_in = two_norm(zero_bar, dtype)
    norm_out = two_norm(root_bar, dtype)
    finite_in = tree_allfinite(zero_bar)
    diverged = (norm_out > norm_in) | jnp.logical_not(tree_allfinite(root_bar))
    success = RESULTS.successful
    result = RESULTS.where(diverged, RESULTS.backward_diverged, success)  # pyright: ignore
    result = RESULTS.where(finite_in, result, RESULTS.backward_nonfinite_cotangent)
    relative = jnp.where(norm_in > 0, norm_out / jnp.where(norm_in > 0, norm_in, 1), 0)
    data = one_solve(
        steps=steps,
        residual=norm_out,
        relative=relative,
        result=result,
        fallback=False,
        dtype=dtype,
    )
    return root_bar, data


_unroll_tap.defvjp(_unroll_tap_fwd, _unroll_tap_bwd)


def unroll_tap(root: PyTree, slot: Array, steps: int) -> tuple[PyTree, PyTree]:
    """`(root, zeros like root)`. Subtract the zeros from the end point of the
    unrolled steps: in reverse mode the cotangent of `slot` is then the
    `BackwardStats` of the unrolled backward pass (its input `ȳ`, and the remainder
    `ȳ_0` that reached `root`). Its inputs carry no tangent in forward mode (`root`
    is stopped), so `jax.jvp` still works."""
    return _unroll_tap(root, slot, steps)
