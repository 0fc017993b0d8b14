"""What a user sees for each common mistake: one table of bad inputs, each row the
call that makes the mistake, the exception (or warning) type, and a regex on the
message that names the argument.

Every row is a check that did not exist, or said something unhelpful, before
`eqxdeq._validation` and `eqxdeq.fixed_point`; the comment on a row says what was seen
before (so each row fails without its check).

The test-suite runs eqxdeq under jaxtyping's import hook, which type-checks
constructor arguments before eqxdeq's own checks can run and raises its own
`TypeCheckError`. A user does not run that hook, so these tests switch it off
(`jaxtyping_disable`) to see eqxdeq's messages, as a user does.
"""

import subprocess
import sys
import textwrap
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import lineax as lx
import optimistix as optx
import pytest

import eqxdeq


@pytest.fixture(autouse=True)
def _as_a_user():
    old = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", old)


def _halve(y, args):
    del args
    return 0.5 * y + 1


def _grow(y, args):
    del args
    return 2 * y + 1


def _cell(z, x, key=None):
    del key
    return jnp.tanh(0.5 * z + x)


Y0 = jnp.zeros(3)
PICARD = eqxdeq.Picard(1e-6, 1e-6)
STALLING = eqxdeq.Picard(
    1e-8,
    1e-8,
    termination=eqxdeq.Termination(stall_patience=5, divergence_factor=None),
)


def _solve(fn: Any, solver: Any = PICARD, y0: Any = Y0, **kwargs: Any):
    return lambda: eqxdeq.fixed_point(fn, solver, y0, **kwargs)


def _optx(fn: Any, solver: Any = PICARD, y0: Any = Y0, **kwargs: Any):
    return lambda: optx.fixed_point(fn, solver, y0, **kwargs)


def _jitted(fn, solver, **kwargs):
    """A solve inside `jax.jit`, raising eqxdeq's precise reason at run time."""
    return lambda: jax.jit(lambda y: eqxdeq.fixed_point(fn, solver, y, **kwargs).value)(
        Y0
    )


def _filter_jitted(fn, solver, **kwargs):
    return lambda: eqx.filter_jit(
        lambda y: eqxdeq.fixed_point(fn, solver, y, **kwargs).value
    )(Y0)


def _deq(cell=_cell, **kwargs):
    return eqxdeq.nn.DEQ(cell, (3,), PICARD, **kwargs)


T = eqxdeq.Termination
W = eqxdeq.ToleranceWarning

# (make, exception type, regex on the message)
ROWS = [
    # --- The table of the issue "never fail silently". ---
    # Silently ignored before `check_options`.
    pytest.param(
        _optx(_halve, options={"step_budjet": 3}),
        ValueError,
        r"`Picard` got unknown `options` key\(s\) \['step_budjet'\]",
        id="options-typo",
    ),
    # 0, -1, 2.5 steps: silently 0/0/3 steps before `check_options`.
    pytest.param(
        _optx(_halve, options={"step_budget": 0}),
        ValueError,
        r"options\['step_budget'\]` must be at least 1, got 0",
        id="step_budget-0",
    ),
    pytest.param(
        _optx(_halve, options={"step_budget": -1}),
        ValueError,
        r"options\['step_budget'\]` must be at least 1, got -1",
        id="step_budget-negative",
    ),
    pytest.param(
        _optx(_halve, options={"step_budget": 2.5}),
        ValueError,
        r"options\['step_budget'\]` must be an int .*got 2.5",
        id="step_budget-float",
    ),
    # Was "too many values to unpack (expected 2)".
    pytest.param(
        _solve(_halve, has_aux=True),
        ValueError,
        r"With `has_aux=True`, `fn\(y, args\)` must return a pair .*single array of "
        r"shape \(3,\).*did you mean has_aux=False\?",
        id="has_aux-but-array",
    ),
    # Was optimistix's "must have the same structure", no hint.
    pytest.param(
        _solve(lambda y, args: (_halve(y, args), y.sum())),
        ValueError,
        r"pair whose first element has the structure of `y0`.*did you mean "
        r"has_aux=True\?",
        id="aux-without-has_aux",
    ),
    # Was "must have the same structure", not mentioning the dtype.
    pytest.param(
        _solve(lambda y, args: _halve(y, args).astype(jnp.float32)),
        ValueError,
        r"must return the dtypes of `y0`: at `y0` it returned float32, expected "
        r"float64",
        id="dtype-only",
    ),
    # Was "TypeError: 'float' object is not callable", at the first solve.
    pytest.param(
        lambda: eqxdeq.Picard(1e-5, 1e-5, 0.8),  # pyright: ignore
        ValueError,
        r"`Picard\(norm=\.\.\.\)` must be a callable.*got 0.8 \(a float\)\. `norm` is "
        r"the third positional argument .*`Picard\(1e-05, 1e-05, relaxation=0.8\)`",
        id="norm-positional-picard",
    ),
    # Was all `max_steps` without a word.
    pytest.param(
        _optx(
            lambda y, args: jnp.tanh(0.5 * y + 1).astype(jnp.bfloat16),
            eqxdeq.Picard(1e-5, 1e-5),
            jnp.zeros(3, jnp.bfloat16),
            throw=False,
        ),
        W,
        r"`Picard\(rtol=1e-05, atol=1e-05\)`: both tolerances are below the machine "
        r"epsilon of the bfloat16 state",
        id="bfloat16-rtol-1e-5",
    ),
    # With `optx.fixed_point`: optimistix's generic "nonlinear divergence" message.
    pytest.param(
        _jitted(_grow, PICARD),
        RuntimeError,
        r"The fixed-point iteration diverged",
        id="throw-diverged-jit",
    ),
    pytest.param(
        _filter_jitted(_grow, PICARD),
        RuntimeError,
        r"The fixed-point iteration diverged",
        id="throw-diverged-filter_jit",
    ),
    pytest.param(
        _jitted(lambda y, args: 2 * jnp.cos(3 * y), STALLING),
        RuntimeError,
        r"The fixed-point iteration stalled",
        id="throw-stalled-jit",
    ),
    pytest.param(
        _filter_jitted(lambda y, args: 2 * jnp.cos(3 * y), STALLING),
        RuntimeError,
        r"The fixed-point iteration stalled",
        id="throw-stalled-filter_jit",
    ),
    # --- eqxdeq.fixed_point: `fn` against `y0` (all were optimistix's generic
    # "must have the same structure"). ---
    pytest.param(
        _solve(
            lambda y, args: {"a": y["a"], "b": jnp.concatenate([y["b"], y["b"]])},
            y0={"a": Y0, "b": Y0},
        ),
        ValueError,
        r"must return the shapes of `y0`: at `y0\['b'\]` it returned shape \(6,\), "
        r"expected \(3,\)",
        id="shape-leaf-path",
    ),
    pytest.param(
        _solve(lambda y, args: {"a": y["a"]}, y0={"a": Y0, "b": Y0}),
        ValueError,
        r"structure of `y0`: expected .* Missing from the output: \['b'\]",
        id="structure-missing-key",
    ),
    pytest.param(
        _solve(
            lambda y, args: (y[0], y[1].astype(jnp.float32)),
            y0=(Y0, Y0),
        ),
        ValueError,
        r"at `y0\[1\]` it returned float32, expected float64",
        id="dtype-leaf-path",
    ),
    pytest.param(
        _solve(lambda y, args: (0.5 * y[0], 0.5 * y[1]), y0=(Y0, Y0), has_aux=True),
        ValueError,
        r"The whole output has the structure of `y0`: did you mean has_aux=False\?",
        id="has_aux-pair-state",
    ),
    pytest.param(
        _solve(
            lambda y, args: _halve(y, args).astype(jnp.float32),
            y0=jnp.zeros(3, jnp.int64),
        ),
        ValueError,
        r"`y0` there is int64, which optimistix casts to the default floating dtype "
        r"float64",
        id="integer-y0-cast-hint",
    ),
    # Silently cast to float64 by optimistix.
    pytest.param(
        _solve(_halve, y0=jnp.zeros(3, bool)),
        ValueError,
        r"`y0` must be floating \(or complex\): `y0` is boolean",
        id="boolean-y0",
    ),
    # Silently a non-finite solve (with throw=False).
    pytest.param(
        _solve(_halve, y0={"z": jnp.array([0.0, jnp.nan])}, throw=False),
        ValueError,
        r"`y0` must be finite: `y0\['z'\]` contains NaN or inf",
        id="nonfinite-y0",
    ),
    # --- eqxdeq.fixed_point: the other arguments. ---
    # Was "init() missing 1 required positional argument: 'tags'".
    pytest.param(
        _solve(_halve, eqxdeq.Anderson),
        ValueError,
        r"`solver` must be a fixed-point solver .*got the class Anderson\. Did you "
        r"mean `Anderson\(rtol, atol\)`",
        id="solver-class",
    ),
    # Was "'str' object has no attribute 'init'".
    pytest.param(
        _solve(_halve, "anderson"),
        ValueError,
        r"`solver` must be a fixed-point solver .*got 'anderson' \(a str\)",
        id="solver-string",
    ),
    # Was "apply() missing 1 required positional argument: 'tags'".
    pytest.param(
        _solve(_halve, adjoint=eqxdeq.JFB),
        ValueError,
        r"`adjoint` must be an `optimistix.AbstractAdjoint`.*Did you mean `JFB\(\)`",
        id="adjoint-class",
    ),
    pytest.param(
        _solve(_halve, adjoint=object()),
        ValueError,
        r"`adjoint` must be an `optimistix.AbstractAdjoint`.*\(an object\)",
        id="adjoint-object",
    ),
    # The adjoint's own check (not duplicated by eqxdeq.fixed_point).
    pytest.param(
        _solve(_halve, adjoint=eqxdeq.ReversibleAdjoint()),
        ValueError,
        r"requires `solver=eqxdeq.Reversible\(\.\.\.\)`, but got `Picard`",
        id="reversible-adjoint-needs-reversible",
    ),
    pytest.param(
        _solve(_halve, optx.Newton(1e-6, 1e-6), adjoint=eqxdeq.JFB()),
        ValueError,
        r"`eqxdeq.JFB` .*can only be used with `optimistix.fixed_point` and a "
        r"fixed-point solver",
        id="jfb-with-root-finder",
    ),
    # Silently no step.
    pytest.param(
        _solve(_halve, max_steps=0),
        ValueError,
        r"`max_steps` must be a positive int or None .*got 0",
        id="max_steps-0",
    ),
    pytest.param(
        _solve(_halve, max_steps=-1),
        ValueError,
        r"`max_steps` must be a positive int or None .*got -1",
        id="max_steps-negative",
    ),
    # Was "`max_steps` must be a Python integer" (True is one).
    pytest.param(
        _solve(_halve, max_steps=True),
        ValueError,
        r"`max_steps` must be a positive int or None .*got True \(a bool\)",
        id="max_steps-bool",
    ),
    # Silently truthy.
    pytest.param(
        _solve(_halve, throw="no"),
        ValueError,
        r"`throw` must be True or False .*got 'no' \(a str\)",
        id="throw-string",
    ),
    pytest.param(
        _solve(_halve, has_aux="yes"),
        ValueError,
        r"`has_aux` must be True or False .*got 'yes' \(a str\)",
        id="has_aux-string",
    ),
    # Was "unknown `options` key(s) [('step_budget', 3)]".
    pytest.param(
        _solve(_halve, options=[("step_budget", 3)]),
        ValueError,
        r"`options` must be a dict \(or None\)",
        id="options-list",
    ),
    pytest.param(
        _solve(_halve, tags={lx.symmetric_tag}),
        ValueError,
        r"`tags` must be a frozenset",
        id="tags-set",
    ),
    # --- Solver hyperparameters (each silently accepted, or Python's TypeError
    # at the first solve). ---
    pytest.param(
        lambda: eqxdeq.Anderson(1e-5, 1e-5, 5),  # pyright: ignore
        ValueError,
        r"`Anderson\(norm=\.\.\.\)`.*`Anderson\(1e-05, 1e-05, memory=5\)`",
        id="norm-positional-anderson",
    ),
    pytest.param(
        lambda: eqxdeq.NewtonKrylov(1e-5, 1e-5, 0.1),  # pyright: ignore
        ValueError,
        r"`NewtonKrylov\(norm=\.\.\.\)`.*pseudo_time_step=0.1\)`",
        id="norm-positional-newton-krylov",
    ),
    pytest.param(
        lambda: eqxdeq.Reversible(1e-5, 1e-5, 0.5),  # pyright: ignore
        ValueError,
        r"`Reversible\(norm=\.\.\.\)`.*`Reversible\(1e-05, 1e-05, relaxation=0.5\)`",
        id="norm-positional-reversible",
    ),
    pytest.param(
        lambda: eqxdeq.SteadyState(1e-5, 1e-5, 0.5),  # pyright: ignore
        ValueError,
        r"`SteadyState\(norm=\.\.\.\)`.*`SteadyState\(1e-05, 1e-05, dt0=0.5\)`",
        id="norm-positional-steady-state",
    ),
    pytest.param(
        lambda: eqxdeq.DescentSearchSolver(
            1e-5,
            1e-5,
            eqxdeq.PicardDescent(),
            optx.LearningRate(1.0),
            "max",  # pyright: ignore
        ),
        ValueError,
        r"`DescentSearchSolver\(norm=\.\.\.\)` must be a callable.*got 'max' \(a str\)"
        r".* fifth positional argument",
        id="norm-string-descent-search",
    ),
    pytest.param(
        lambda: eqxdeq.Picard(float("inf"), 1e-5),
        ValueError,
        r"`Picard\(rtol=\.\.\.\)` must be a finite number in \[0, inf\), got inf",
        id="rtol-inf",
    ),
    pytest.param(
        lambda: eqxdeq.Anderson("1e-5", 1e-5),  # pyright: ignore
        ValueError,
        r"`Anderson\(rtol=\.\.\.\)` must be a finite number .*got '1e-5' \(a str\)",
        id="rtol-string",
    ),
    pytest.param(
        lambda: eqxdeq.Broyden(1e-5, None),  # pyright: ignore
        ValueError,
        r"`Broyden\(atol=\.\.\.\)` must be a finite number .*got None",
        id="atol-none",
    ),
    # Was "Value '0.5' with dtype <U3 is not a valid JAX array type".
    pytest.param(
        lambda: eqxdeq.Picard(1e-5, 1e-5, relaxation="0.5"),  # pyright: ignore
        ValueError,
        r"`Picard\(relaxation=\.\.\.\)` must be a finite number in \(0, 1\], got "
        r"'0.5' \(a str\)",
        id="relaxation-string",
    ),
    pytest.param(
        lambda: eqxdeq.Picard(1e-5, 1e-5, return_best="yes"),  # pyright: ignore
        ValueError,
        r"`Picard\(return_best=\.\.\.\)` must be True or False",
        id="return_best-string",
    ),
    pytest.param(
        lambda: eqxdeq.Anderson(1e-5, 1e-5, history_length=True),
        ValueError,
        r"`Anderson\(history_length=\.\.\.\)` must be an int >= 0, got True \(a bool\)",
        id="history_length-bool",
    ),
    # A string `divergence_factor` failed deep inside the first solve.
    pytest.param(
        lambda: eqxdeq.Picard(1e-5, 1e-5, termination=T(divergence_factor="big")),  # pyright: ignore
        ValueError,
        r"`Termination\(divergence_factor=\.\.\.\)` must be a number in \(1, inf\)",
        id="termination-divergence_factor-string",
    ),
    pytest.param(
        lambda: eqxdeq.Anderson(1e-5, 1e-5, termination=T(stall_tol="x")),  # pyright: ignore
        ValueError,
        r"`Termination\(stall_tol=\.\.\.\)` must be a finite number in \[0, 1\)",
        id="termination-stall_tol-string",
    ),
    pytest.param(
        lambda: eqxdeq.Broyden(1e-5, 1e-5, termination=T(stall_patience=True)),
        ValueError,
        r"`Termination\(stall_patience=\.\.\.\)` must be an int >= 1 or None, got "
        r"True",
        id="termination-stall_patience-bool",
    ),
    # Was "'<' not supported between instances of 'int' and 'NoneType'".
    pytest.param(
        lambda: eqxdeq.NewtonKrylov(1e-5, 1e-5, forcing=None),  # pyright: ignore
        ValueError,
        r"`NewtonKrylov\(forcing=\.\.\.\)` must be 'eisenstat-walker' or a number in "
        r"\(0, 1\), got None",
        id="newton-krylov-forcing-none",
    ),
    # Was "'>' not supported between instances of 'str' and 'int'".
    pytest.param(
        lambda: eqxdeq.NewtonKrylov(1e-5, 1e-5, pseudo_time_step="1"),  # pyright: ignore
        ValueError,
        r"`NewtonKrylov\(pseudo_time_step=\.\.\.\)` must be a finite number in "
        r"\(0, inf\) or None, got '1' \(a str\)",
        id="newton-krylov-pseudo_time_step-string",
    ),
    pytest.param(
        lambda: eqxdeq.DerivativeFreeBacktracking(slope="x"),  # pyright: ignore
        ValueError,
        r"`DerivativeFreeBacktracking\(slope=\.\.\.\)` must be a finite number in "
        r"\[0, 1\), got 'x'",
        id="backtracking-slope-string",
    ),
    pytest.param(
        lambda: eqxdeq.DerivativeFreeBacktracking(max_backtracks=True),
        ValueError,
        r"`DerivativeFreeBacktracking\(max_backtracks=\.\.\.\)` must be an int >= 1, "
        r"got True",
        id="backtracking-max_backtracks-bool",
    ),
    # --- Linear solvers and adjoints: existing checks, under test here too. ---
    pytest.param(
        lambda: eqxdeq.Neumann(-1),
        ValueError,
        r"`Neumann\(steps=\.\.\.\)` must be a non-negative integer, got -1",
        id="neumann-steps-negative",
    ),
    pytest.param(
        lambda: eqxdeq.Neumann(3, damping=2.0),
        ValueError,
        r"`Neumann\(damping=\.\.\.\)` must be in \(0, 2\)",
        id="neumann-damping",
    ),
    pytest.param(
        lambda: eqxdeq.Richardson(1e-5, 1e-5, max_steps=0),
        ValueError,
        r"`Richardson\(max_steps=\.\.\.\)` must be a positive integer or None",
        id="richardson-max_steps-0",
    ),
    pytest.param(
        lambda: eqxdeq.PhantomAdjoint(damping=0.0),
        ValueError,
        r"`PhantomAdjoint\(damping=\.\.\.\)` must be a finite number in \(0, 1\], "
        r"got 0.0",
        id="phantom-damping-0",
    ),
    pytest.param(
        lambda: eqxdeq.ReversibleAdjoint(checkpoints=3),
        ValueError,
        r"`ReversibleAdjoint\(checkpoints=\.\.\.\)` must be a non-negative even int",
        id="reversible-adjoint-checkpoints-odd",
    ),
    # --- eqxdeq.nn. ---
    pytest.param(
        lambda: _deq(throw="yes"),
        ValueError,
        r"`DEQ\(throw=\.\.\.\)` must be True or False, got 'yes'",
        id="deq-throw-string",
    ),
    pytest.param(
        lambda: _deq(inference="yes"),
        ValueError,
        r"`DEQ\(inference=\.\.\.\)` must be True or False, got 'yes'",
        id="deq-inference-string",
    ),
    # Was optimistix's "must have the same structure".
    pytest.param(
        lambda: _deq(cell=lambda z, x, key=None: jnp.concatenate([z, z]))(Y0),
        ValueError,
        r"must return the shapes of `y0`: at `y0` it returned shape \(6,\), "
        r"expected \(3,\)",
        id="deq-cell-shape",
    ),
    pytest.param(
        lambda: _deq(cell=lambda z, x, key=None: _cell(z, x).astype(jnp.float32))(Y0),
        ValueError,
        r"must return the dtypes of `y0`: at `y0` it returned float32, expected "
        r"float64",
        id="deq-cell-dtype",
    ),
    pytest.param(
        lambda: eqxdeq.nn.HalfNormal(-1.0),
        ValueError,
        r"`HalfNormal\(scale=\.\.\.\)` must be a finite number in \[0, inf\), got -1.0",
        id="half-normal-negative",
    ),
    pytest.param(
        lambda: eqxdeq.nn.VariationalDropout("x"),  # pyright: ignore
        ValueError,
        r"`VariationalDropout\(p=\.\.\.\)` must be a probability in \[0, 1\); got "
        r"'x' \(a str\)",
        id="dropout-p-string",
    ),
    pytest.param(
        lambda: eqxdeq.nn.Predictor(3),  # pyright: ignore
        ValueError,
        r"`Predictor\(predictor=\.\.\.\)` must be callable",
        id="predictor-not-callable",
    ),
    # --- Hyperparameters of the linear solvers, adjoints, descents and the
    # termination (silently accepted before, or failing deep inside the solve). ---
    pytest.param(
        lambda: eqxdeq.Richardson(1e-5, 1e-5, norm=0.8),  # pyright: ignore
        ValueError,
        r"`Richardson\(norm=\.\.\.\)` must be a callable",
        id="richardson-norm",
    ),
    pytest.param(
        lambda: eqxdeq.Richardson("x", 1e-5),  # pyright: ignore
        ValueError,
        r"`Richardson\(rtol=\.\.\.\)` must be a finite number",
        id="richardson-rtol-string",
    ),
    pytest.param(
        lambda: eqxdeq.PhantomAdjoint(steps=True),
        ValueError,
        r"`PhantomAdjoint\(steps=\.\.\.\)` must be an int >= 0, got True",
        id="phantom-steps-bool",
    ),
    pytest.param(
        lambda: eqxdeq.PhantomAdjoint(damping="x"),  # pyright: ignore
        ValueError,
        r"`PhantomAdjoint\(damping=\.\.\.\)` must be a finite number in \(0, 1\]",
        id="phantom-damping-string",
    ),
    pytest.param(
        lambda: eqxdeq.ImplicitAdjoint(linear_solver="gmres"),  # pyright: ignore
        ValueError,
        r"`ImplicitAdjoint\(linear_solver=\.\.\.\)` must be a "
        r"`lineax.AbstractLinearSolver`",
        id="implicit-linear_solver-string",
    ),
    pytest.param(
        lambda: eqxdeq.ShineAdjoint(linear_solver=lx.GMRES),  # pyright: ignore
        ValueError,
        r"`ShineAdjoint\(linear_solver=\.\.\.\)`.*did you mean `GMRES\(\.\.\.\)`",
        id="shine-linear_solver-class",
    ),
    pytest.param(
        lambda: eqxdeq.Anderson(1e-5, 1e-5, memory=True),
        ValueError,
        r"`AndersonDescent\(memory=\.\.\.\)` must be an int >= 1, got True",
        id="anderson-memory-bool",
    ),
    pytest.param(
        lambda: eqxdeq.Anderson(1e-5, 1e-5, regularisation="x"),  # pyright: ignore
        ValueError,
        r"`AndersonDescent\(regularisation=\.\.\.\)` must be a finite number",
        id="anderson-regularisation-string",
    ),
    pytest.param(
        lambda: eqxdeq.Termination(divergence_factor="big"),  # pyright: ignore
        ValueError,
        r"`Termination\(divergence_factor=\.\.\.\)`",
        id="termination-alone-divergence_factor-string",
    ),
    pytest.param(
        _optx(
            lambda y, args: jnp.tanh(0.5 * y + 1).astype(jnp.bfloat16),
            eqxdeq.Reversible(1e-5, 1e-5),
            jnp.zeros(3, jnp.bfloat16),
            throw=False,
        ),
        W,
        r"`Reversible\(rtol=1e-05, atol=1e-05\)`: both tolerances are below",
        id="reversible-bfloat16-rtol-1e-5",
    ),
    pytest.param(
        _optx(
            lambda y, args: jnp.tanh(0.5 * y + 1).astype(jnp.bfloat16),
            eqxdeq.SteadyState(1e-5, 1e-5),
            jnp.zeros(3, jnp.bfloat16),
            throw=False,
            max_steps=4,
        ),
        W,
        r"`SteadyState\(rtol=1e-05, atol=1e-05\)`: both tolerances are below",
        id="steady-state-bfloat16-rtol-1e-5",
    ),
]


@pytest.mark.parametrize("make,error,match", ROWS)
def test_bad_input(make, error, match):
    if issubclass(error, Warning):
        with pytest.warns(error, match=match):
            make()
    else:
        with pytest.raises(error, match=match):
            make()


def test_enough_rows():
    live = [row for row in ROWS if not row.marks]
    assert len(live) >= 40, len(live)


#
# The same mistakes, done right, pass: the checks do not reject valid input.
#


def test_good_input_passes():
    sol = eqxdeq.fixed_point(
        lambda y, args: (_halve(y, args), {"n": y.sum()}),
        eqxdeq.Picard(1e-10, 1e-10, optx.rms_norm, 0.8),
        Y0,
        has_aux=True,
        max_steps=None,
        options={"step_budget": jnp.asarray(500)},
    )
    assert jnp.allclose(sol.value, 2.0)
    assert set(sol.aux) == {"n"}
    # An integer `y0` is cast to the default floating dtype, as by optimistix.
    sol = eqxdeq.fixed_point(_halve, PICARD, jnp.zeros(3, int))
    assert sol.value.dtype == jnp.float64
    # A bfloat16 state with tolerances it can reach: no warning (the suite turns
    # warnings into errors).
    sol = optx.fixed_point(
        lambda y, args: jnp.tanh(0.5 * y + 1).astype(jnp.bfloat16),
        eqxdeq.Anderson(1e-2, 1e-2, termination=T(criterion="norm")),
        jnp.zeros(3, jnp.bfloat16),
    )
    assert sol.result == optx.RESULTS.successful
    # Zero tolerances ask for a fixed number of steps: no warning either.
    sol = optx.fixed_point(
        _halve, eqxdeq.Picard(0.0, 0.0), Y0, max_steps=5, throw=False
    )
    assert sol.stats["num_steps"] == 5


def test_traced_arguments_pass():
    # Tolerances and relaxation as traced arrays are not inspected.
    @jax.jit
    def solve(rtol, relaxation):
        solver = eqxdeq.Picard(rtol, rtol, relaxation=relaxation)
        return optx.fixed_point(_halve, solver, Y0, max_steps=500).value

    assert jnp.allclose(solve(jnp.asarray(1e-10), jnp.asarray(0.9)), 2.0)


def test_same_as_optimistix_without_throw():
    # With throw=False the solution is that of optx.fixed_point, to the bit.
    solver = eqxdeq.Anderson(1e-8, 1e-8)
    ours = eqxdeq.fixed_point(_halve, solver, Y0, throw=False)
    theirs = optx.fixed_point(
        _halve, solver, Y0, throw=False, adjoint=eqxdeq.ImplicitAdjoint()
    )
    assert jnp.array_equal(ours.value, theirs.value)
    assert ours.result == theirs.result
    assert ours.stats["num_steps"] == theirs.stats["num_steps"]
    # A failed solve too, including its precise reason.
    ours = eqxdeq.fixed_point(_grow, PICARD, Y0, throw=False)
    theirs = optx.fixed_point(_grow, PICARD, Y0, throw=False)
    assert ours.result == theirs.result == optx.RESULTS.nonlinear_divergence
    assert ours.stats["result"] == eqxdeq.RESULTS.diverged


def test_optimistix_raises_only_its_generic_message():
    # What eqxdeq.fixed_point improves on: optx.fixed_point cannot tell a stall
    # from a divergence when it raises.
    stall = lambda y, args: 2 * jnp.cos(3 * y)
    with pytest.raises(RuntimeError) as info:
        optx.fixed_point(stall, STALLING, Y0)
    assert "stalled" not in str(info.value)
    assert "nonlinear" in str(info.value).lower() or "diverge" in str(info.value)
    with pytest.raises(RuntimeError, match="The fixed-point iteration stalled"):
        eqxdeq.fixed_point(stall, STALLING, Y0)


def test_throw_max_steps_under_jit():
    # (Not a row of the table: optimistix raises the same message.)
    with pytest.raises(RuntimeError, match="The maximum number of steps was reached"):
        _jitted(_halve, PICARD, max_steps=3)()


def test_vmap_raises_if_any_sample_fails():
    y0s = jnp.stack([jnp.zeros(3), jnp.zeros(3)])
    fn = lambda y, scale: scale * y + 1
    ok = jax.vmap(lambda y, s: eqxdeq.fixed_point(fn, PICARD, y, s).value)
    assert jnp.allclose(ok(y0s, jnp.array([0.5, 0.5])), 2.0)
    with pytest.raises(RuntimeError, match="diverged"):
        ok(y0s, jnp.array([0.5, 2.0]))


def test_eqx_on_error_nan():
    # EQX_ON_ERROR is read when equinox is imported, so in a fresh process.
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, eqxdeq
        sol = jax.jit(lambda y: eqxdeq.fixed_point(
            lambda y, a: 2 * y + 1, eqxdeq.Picard(1e-6, 1e-6), y).value)(jnp.zeros(3))
        print(bool(jnp.all(jnp.isnan(sol))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"EQX_ON_ERROR": "nan", "JAX_PLATFORMS": "cpu", "PATH": ""},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
