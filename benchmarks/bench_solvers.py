"""Forward-solve benchmark of eqxdeq's fixed-point solvers against baselines.

Problems: tanh DEQ layers `z ↦ tanh(z W + x U + b)` in float32, with a symmetric `W` of
spectral norm `radius` and small inputs (so the layer's Jacobian is near-critical).
For each problem and solver it measures the number of evaluations of `f`, the final
relative residual, and the median wall time of a jit-compiled solve, and compares with
a hand-written `lax.while_loop` Picard iteration doing the same arithmetic and the same
stopping test.

    PYTHONPATH=. python benchmarks/bench_solvers.py            # the full issue sizes
    PYTHONPATH=. python benchmarks/bench_solvers.py --quick    # smoke run, < 1 minute

See benchmarks/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import optimistix as optx


if __package__:  # imported as `benchmarks.bench_solvers` (`python -m benchmarks`)
    from ._common import (
        elementwise_error,
        environment,
        fmt_ratio,
        fmt_time,
        load_average,
        make_tanh_problem,
        markdown_table,
        Problem,
        ProblemSpec,
        relative_residual,
        time_interleaved_all,
    )
else:  # run as a script: benchmarks/ is on sys.path
    from _common import (  # pyright: ignore[reportMissingImports]
        elementwise_error,
        environment,
        fmt_ratio,
        fmt_time,
        load_average,
        make_tanh_problem,
        markdown_table,
        Problem,
        ProblemSpec,
        relative_residual,
        time_interleaved_all,
    )

import eqxdeq


try:
    import jaxopt
except ImportError:  # jaxopt is optional: its rows are skipped.
    jaxopt = None

# banax (another JAX DEQ library) is optional too. It requires Python >= 3.12, so on
# 3.11 it is not importable and its row is skipped, with the reason in the report.
try:
    import banax.adjoint
    import banax.solver

    BANAX_ERROR = None
except Exception as e:  # noqa: BLE001 (ImportError, or a SyntaxError on old Pythons)
    banax = None
    BANAX_ERROR = f"{type(e).__name__}: {e}"
BANAX_FAILURES: list[str] = []  # problems on which banax's row failed to run
FLOORS: dict[str, int] = {}  # problem label -> GMRES matvecs (`krylov_floor`)


FULL_PROBLEMS = ("256x32@0.9", "256x32@0.99", "2048x8@0.9")
QUICK_PROBLEMS = ("64x8@0.99",)

BARE = "bare lax.while_loop Picard"
OPTX_FPI = "optx.FixedPointIteration"
BARE_ANDERSON = "bare lax.while_loop Anderson(m=8)"
BARE_BROYDEN = "bare lax.while_loop Broyden(m=8)"
PICARD = "eqxdeq.Picard"
ANDERSON5 = "eqxdeq.Anderson(m=5)"
ANDERSON_DEFAULT = "eqxdeq.Anderson (default m=8)"
BROYDEN = "eqxdeq.Broyden (default m=8)"
BROYDEN16 = "eqxdeq.Broyden(memory=16)"
BROYDEN_LS = "eqxdeq.Broyden(line_search=True)"
ACCELERATED = (ANDERSON5, ANDERSON_DEFAULT, BROYDEN, BROYDEN16, BROYDEN_LS)
FLOOR_FACTOR = 1.25  # the target: f-evals within 1.25x the Krylov floor

# banax rows (where banax imports) and the eqxdeq rows they are compared with, both
# stopping on the same absolute l2 test (see `run_problem`).
L2_TEST = " [l2 test]"
BANAX_PAIRS = {
    "banax.solver.Picard": PICARD + L2_TEST,
    "banax.solver.Anderson(depth=5)": ANDERSON5 + L2_TEST,
    "banax.solver.Broyden(history_size=8)": "eqxdeq.Broyden(memory=8)" + L2_TEST,
}
BANAX_TARGET = 0.9  # the target: eqxdeq's time at most 0.9x banax's


@dataclasses.dataclass
class Config:
    rtol: float
    atol: float
    max_steps: int


@dataclasses.dataclass
class Row:
    problem: str
    radius: float
    n: int
    solver: str
    f_evals: int
    rel_residual: float
    criterion: float  # max|f(z)-z| / (atol + rtol |f(z)|) at the returned z
    result: str
    time: float  # median seconds per solve
    time_min: float  # fastest solve (least disturbed by other processes)
    diagnostic: bool = False

    @property
    def time_per_eval(self) -> float:
        return self.time / self.f_evals if self.f_evals > 0 else math.nan

    @property
    def time_min_per_eval(self) -> float:
        return self.time_min / self.f_evals if self.f_evals > 0 else math.nan


# A solver entry: (problem, config) -> jit-compiled `solve(y0, args)` returning
# `(z, f_evals, result_code)`, and a function decoding `result_code` to a string.
SolveFn = Callable[[jax.Array, Any], tuple[jax.Array, jax.Array, jax.Array]]
Entry = Callable[[Problem, Config], tuple[SolveFn, Callable[[Any], str]]]


def _enum_names(enumeration) -> dict[int, str]:
    return {
        int(item._value): name
        for name, item in enumeration._name_to_item.items()  # pyright: ignore
    }


_EQXDEQ_RESULTS = _enum_names(eqxdeq.RESULTS)
_OPTX_RESULTS = _enum_names(optx.RESULTS)


def bare_picard(problem: Problem, cfg: Config):
    """The reference: `z ← f(z)` until `max|f(z) − z| / (atol + rtol |f(z)|) < 1`."""
    fn = problem.fn

    def solve(y0, args):
        def cond(carry):
            _, err, k = carry
            return (err >= 1) & (k < cfg.max_steps)

        def body(carry):
            z, _, k = carry
            fz = fn(z, args)
            err = _bare_elementwise_error(fz, z, cfg)
            return fz, err, k + 1

        init = (y0, jnp.array(jnp.inf, y0.dtype), jnp.array(0))
        z, err, k = lax.while_loop(cond, body, init)
        return z, k, (err < 1).astype(int)

    return jax.jit(solve), _converged_name


def bare_picard_bookkeeping(problem: Problem, cfg: Config):
    """The bare loop doing, by hand, what `eqxdeq.Picard` does besides the
    arithmetic of `bare_picard`: the trial `y + 1·g` from the carried residual (as a
    descent does), the ℓ2 residual, the best iterate and the divergence test. Its
    time over the bare loop's is the cost of those features without optimistix's
    loop (diagnostic row of `--picard-variants`)."""
    fn = problem.fn

    def solve(y0, args):
        def cond(carry):
            err, k = carry[2], carry[3]
            return (err >= 1) & (k < cfg.max_steps)

        def body(carry):
            y, g, _, k, best, best_norm, initial = carry
            z = y + 1.0 * g
            fz = fn(z, args)
            g = fz - z
            norm = jnp.sqrt(jnp.sum(g * g))
            improved = norm < best_norm
            initial = jnp.where(jnp.isinf(initial), norm, initial)
            diverged = (norm > 1e4 * initial) | jnp.invert(jnp.isfinite(norm))
            err = jnp.where(diverged, 0, _bare_elementwise_error(fz, z, cfg))
            best = jnp.where(improved, z, best)
            best_norm = jnp.where(improved, norm, best_norm)
            return z, g, err, k + 1, best, best_norm, initial

        inf = jnp.array(jnp.inf, y0.dtype)
        init = (y0, jnp.zeros_like(y0), inf, jnp.array(0), y0, inf, inf)
        z, _, err, k, *_ = lax.while_loop(cond, body, init)
        return z, k, (err < 1).astype(int)

    return jax.jit(solve), _converged_name


def _bare_elementwise_error(fz, z, cfg: Config):
    return jnp.max(jnp.abs(fz - z) / (cfg.atol + cfg.rtol * jnp.abs(fz)))


def _bare_loop(problem: Problem, cfg: Config, step, state0):
    """A bare `lax.while_loop` with the bare Picard loop's stopping test: each
    iteration evaluates `f` at `y` and, until the test passes, proposes the next `y`
    by `step(y_flat, g_flat, k, state) -> (y_next_flat, state)`. Returns the last
    evaluated point, the number of evaluations and whether the test passed."""
    fn = problem.fn

    def solve(y0, args):
        def cond(carry):
            err, k = carry[1], carry[2]
            return (err >= 1) & (k < cfg.max_steps)

        def body(carry):
            y, _, k, _, state = carry
            fy = fn(y, args)
            err = _bare_elementwise_error(fy, y, cfg)
            y_next, state = step(y.reshape(-1), (fy - y).reshape(-1), k, state)
            return y_next.reshape(y.shape), err, k + 1, y, state

        init = (y0, jnp.array(jnp.inf, y0.dtype), jnp.array(0), y0, state0(y0))
        _, err, k, z, _ = lax.while_loop(cond, body, init)
        return z, k, (err < 1).astype(int)

    return jax.jit(solve), _converged_name


def bare_anderson(memory: int, regularisation: float = 1e-8) -> Entry:
    """A hand-written `lax.while_loop` Anderson mixing (type II, difference form, unit
    relaxation): eqxdeq's arithmetic (the Gram matrix updated by one row and column
    per step, a Cholesky solve of the ridge-regularised `memory × memory` system, two
    products with the `(memory, size)` history per step) and the same stopping test,
    without anything else: no safeguard, no statistics, no best iterate, no
    divergence test. Its time per step over the bare Picard loop's is the floor of
    Anderson's per-step overhead under XLA on this machine."""
    m = memory
    slots = jnp.arange(m)

    def state0(y0):
        zeros, history = jnp.zeros(y0.size, y0.dtype), jnp.zeros((m, y0.size), y0.dtype)
        gram, rhs = jnp.zeros((m, m), y0.dtype), jnp.zeros(m, y0.dtype)
        return zeros, zeros, history, history, gram, rhs, jnp.array(0)

    def step(y_flat, g, k, state):
        y_prev, g_prev, dg, mixed, gram, rhs_prev, count = state
        slot = k % m  # (step 0 writes junk into slot 0: never counted)
        dg_new = g - g_prev
        dg = lax.dynamic_update_index_in_dim(dg, dg_new, slot, 0)
        row = (y_flat - y_prev) + dg_new
        mixed = lax.dynamic_update_index_in_dim(mixed, row, slot, 0)
        rhs = dg @ g
        column = jnp.where(slots == slot, dg_new @ dg_new, rhs - rhs_prev)
        gram = jnp.where(slots[:, None] == slot, column[None, :], gram)
        gram = jnp.where(slots[None, :] == slot, column[:, None], gram)
        count = jnp.where(k > 0, jnp.minimum(count + 1, m), 0)
        valid = slots < count
        both = valid[:, None] & valid[None, :]
        diagonal = jnp.where(valid, jnp.diagonal(gram), 0)
        ridge = regularisation * jnp.sum(diagonal) / jnp.maximum(count, 1)
        ridge = ridge + jnp.finfo(g.dtype).tiny
        system = jnp.where(both, gram, 0) + jnp.diag(jnp.where(valid, ridge, 1))
        factor = jnp.linalg.cholesky(system)
        gamma = jax.scipy.linalg.cho_solve((factor, True), jnp.where(valid, rhs, 0))
        y_next = y_flat + g - gamma @ mixed
        return y_next, (y_flat, g, dg, mixed, gram, rhs, count)

    return lambda problem, cfg: _bare_loop(problem, cfg, step, state0)


def bare_broyden(memory: int, conditioning: float = 1e-6) -> Entry:
    """A hand-written `lax.while_loop` limited-memory good Broyden: eqxdeq's
    arithmetic (`H = -I + Σ u_i v_iᵀ` in `(memory, size)` buffers, reset to `-I` when
    full, four products with the buffers per step, `H g_prev` remembered, the
    conditioning test on the update) and the same stopping test, without anything
    else. Its time per step over the bare Picard loop's is the floor of Broyden's
    per-step overhead under XLA on this machine."""
    m = memory

    def mv(a, b, count, x):  # (-I + Σ_{i<count} a_i b_iᵀ) x
        coeffs = jnp.where(jnp.arange(m) < count, b @ x, 0)
        return coeffs @ a - x

    def state0(y0):
        zeros, buffer = jnp.zeros(y0.size, y0.dtype), jnp.zeros((m, y0.size), y0.dtype)
        return zeros, zeros, buffer, buffer, jnp.array(0), zeros

    def step(y_flat, g, k, state):
        y_prev, g_prev, u, v, count, h_g_prev = state
        s = y_flat - y_prev
        full = count >= m
        count = jnp.where(full, 0, count)
        h_g = mv(u, v, count, g)
        h_dg = h_g - jnp.where(full, -g_prev, h_g_prev)
        v_new = mv(v, u, count, s)
        denom = s @ h_dg
        ok = (k > 0) & (denom**2 > conditioning**2 * (s @ s) * (h_dg @ h_dg))
        u_new = jnp.where(ok, (s - h_dg) / jnp.where(ok, denom, 1), 0)
        v_new = jnp.where(ok, v_new, 0)
        u = lax.dynamic_update_index_in_dim(u, u_new, count, 0)
        v = lax.dynamic_update_index_in_dim(v, v_new, count, 0)
        h_g = h_g + (v_new @ g) * u_new
        count = count + ok.astype(int)
        return y_flat - h_g, (y_flat, g, u, v, count, h_g)

    return lambda problem, cfg: _bare_loop(problem, cfg, step, state0)


def _converged_name(code) -> str:
    # optimistix's names, for one column across all solvers.
    return "successful" if code else "nonlinear_max_steps_reached"


def eqxdeq_entry(make_solver: Callable[[Config], Any]) -> Entry:
    def entry(problem: Problem, cfg: Config):
        solver = make_solver(cfg)

        def solve(y0, args):
            sol = optx.fixed_point(
                problem.fn,
                solver,
                y0,
                args,
                max_steps=cfg.max_steps,
                throw=False,
                # optimistix's `has_aux` convention: `fn` returns just `f(z)`.
            )
            return sol.value, sol.stats["num_fn_evals"], sol.stats["result"]._value

        return jax.jit(solve), lambda code: _EQXDEQ_RESULTS[int(code)]

    return entry


def optx_fpi(problem: Problem, cfg: Config):
    solver = optx.FixedPointIteration(cfg.rtol, cfg.atol, norm=optx.max_norm)

    def solve(y0, args):
        sol = optx.fixed_point(
            problem.fn, solver, y0, args, max_steps=cfg.max_steps, throw=False
        )
        return sol.value, sol.stats["num_steps"], sol.result._value

    return jax.jit(solve), lambda code: _OPTX_RESULTS[int(code)]


def jaxopt_entry(kind: str, tol: float) -> Entry:
    """jaxopt only has an absolute ℓ2 test `‖T(z) − z‖₂ ≤ tol`; `tol` is calibrated
    per problem (see `main`)."""

    def entry(problem: Problem, cfg: Config):
        fn = problem.fn
        if kind == "fpi":
            solver = jaxopt.FixedPointIteration(  # pyright: ignore
                fixed_point_fun=fn, maxiter=cfg.max_steps, tol=tol
            )
        else:
            solver = jaxopt.AndersonAcceleration(  # pyright: ignore
                fixed_point_fun=fn, history_size=5, maxiter=cfg.max_steps, tol=tol
            )

        def solve(y0, args):
            params, state = solver.run(y0, args)
            return params, state.num_fun_eval, (state.error <= tol).astype(int)

        return jax.jit(solve), _converged_name

    return entry


def banax_entry(kind: str, tol: float) -> Entry:
    """A banax solver (forward only: its `JFB` wrapper), stopping on the same absolute
    ℓ2 test as jaxopt, `‖f(z) − z‖₂ ≤ tol` (`atol = tol`, `rtol = 0`)."""

    def entry(problem: Problem, cfg: Config):
        common = dict(atol=tol, rtol=0.0, max_steps=cfg.max_steps)
        if kind == "picard":
            solver = banax.solver.Picard(**common)  # pyright: ignore
        elif kind == "anderson":
            solver = banax.solver.Anderson(depth=5, **common)  # pyright: ignore
        else:
            solver = banax.solver.Broyden(history_size=8, **common)  # pyright: ignore
        adjoint = banax.adjoint.JFB(solver=solver)  # pyright: ignore

        def solve(y0, args):
            sol = adjoint((problem.fn, (args,)), y0)
            # One evaluation in `init` plus one per step.
            converged = (sol.stats.abs_err <= tol).astype(int)
            return sol.value, sol.stats.steps + 1, converged

        return jax.jit(solve), _converged_name

    return entry


def l2_test_entries(tol: float) -> dict[str, Entry]:
    """eqxdeq's rows with banax's (and jaxopt's) stopping test `‖f(z) − z‖₂ ≤ tol`:
    `Termination(criterion="norm")`, `norm=optx.two_norm`, `atol = tol`, `rtol = 0`."""
    kw = dict(norm=optx.two_norm, termination=eqxdeq.Termination(criterion="norm"))
    return {
        PICARD + L2_TEST: eqxdeq_entry(lambda c: eqxdeq.Picard(0.0, tol, **kw)),
        ANDERSON5 + L2_TEST: eqxdeq_entry(
            lambda c: eqxdeq.Anderson(0.0, tol, memory=5, **kw)
        ),
        "eqxdeq.Broyden(memory=8)" + L2_TEST: eqxdeq_entry(
            lambda c: eqxdeq.Broyden(0.0, tol, memory=8, **kw)
        ),
    }


def krylov_floor(problem: Problem, cfg: Config, max_iters: int = 400) -> int:
    """The Krylov floor: how many matrix-vector products full-memory GMRES needs on
    the layer linearised at its fixed point, in float64, to pass the solvers' test.

    With `z*` the fixed point (Picard iteration in float64 to machine precision) and
    `J v = (v W) ⊙ tanh'(z* W + c)` the layer's Jacobian there, GMRES solves
    `(I − J) z = f(z*) − J z*` from `z = 0` (the whole `batch × n` state as one
    vector, as the solvers treat it) and stops at the first iterate whose linearised
    residual `g = f_lin(z) − z` passes `max|g| / (atol + rtol |f_lin(z)|) < 1`.
    Counting the evaluation at `z = 0` that gives the initial residual, a solver
    that matched GMRES would need one more evaluation of `f` than this."""
    weight, injection = (np.asarray(a, np.float64) for a in problem.args)
    z = np.zeros_like(injection)
    for _ in range(1_000_000):
        z_new = np.tanh(z @ weight + injection)
        if np.array_equal(z_new, z) or np.max(np.abs(z_new - z)) < 1e-15:
            break
        z = z_new
    f_star = np.tanh(z @ weight + injection)
    slope = 1 - f_star**2

    def f_lin(x):
        return f_star + ((x - z) @ weight) * slope

    residual = f_lin(np.zeros_like(z)).ravel()  # b - A·0
    beta = np.linalg.norm(residual)
    basis = [residual / beta]
    hessenberg = np.zeros((max_iters + 1, max_iters))
    for k in range(1, max_iters + 1):
        v = basis[-1].reshape(z.shape)
        w = (v - (v @ weight) * slope).ravel()  # (I − J) v
        for _ in range(2):  # Gram–Schmidt, twice
            for i, b in enumerate(basis):
                h = b @ w
                hessenberg[i, k - 1] += h
                w = w - h * b
        hessenberg[k, k - 1] = np.linalg.norm(w)
        basis.append(w / hessenberg[k, k - 1])
        rhs = np.zeros(k + 1)
        rhs[0] = beta
        coeffs = np.linalg.lstsq(hessenberg[: k + 1, :k], rhs, rcond=None)[0]
        x = (np.stack(basis[:k], axis=1) @ coeffs).reshape(z.shape)
        fx = f_lin(x)
        if np.max(np.abs(fx - x) / (cfg.atol + cfg.rtol * np.abs(fx))) < 1:
            return k
    return -1


def solver_entries(args) -> dict[str, tuple[Entry, bool]]:
    """name -> (entry, is_diagnostic). The bare loop comes first."""
    entries: dict[str, tuple[Entry, bool]] = {
        BARE: (bare_picard, False),
        PICARD: (eqxdeq_entry(lambda c: eqxdeq.Picard(c.rtol, c.atol)), False),
        ANDERSON5: (
            eqxdeq_entry(lambda c: eqxdeq.Anderson(c.rtol, c.atol, memory=5)),
            False,
        ),
        ANDERSON_DEFAULT: (
            eqxdeq_entry(lambda c: eqxdeq.Anderson(c.rtol, c.atol)),
            False,
        ),
        BROYDEN: (eqxdeq_entry(lambda c: eqxdeq.Broyden(c.rtol, c.atol)), False),
        BROYDEN16: (
            eqxdeq_entry(lambda c: eqxdeq.Broyden(c.rtol, c.atol, memory=16)),
            False,
        ),
        BROYDEN_LS: (
            eqxdeq_entry(lambda c: eqxdeq.Broyden(c.rtol, c.atol, line_search=True)),
            False,
        ),
        OPTX_FPI: (optx_fpi, False),
        BARE_ANDERSON: (bare_anderson(8), False),
        BARE_BROYDEN: (bare_broyden(8), False),
    }
    if args.picard_variants:
        entries["  bare loop + eqxdeq's per-step bookkeeping"] = (
            bare_picard_bookkeeping,
            True,
        )
        no_div = eqxdeq.Termination(divergence_factor=None)
        entries["  Picard(return_best=False)"] = (
            eqxdeq_entry(lambda c: eqxdeq.Picard(c.rtol, c.atol, return_best=False)),
            True,
        )
        entries["  Picard(return_best=False, divergence_factor=None)"] = (
            eqxdeq_entry(
                lambda c: eqxdeq.Picard(
                    c.rtol, c.atol, return_best=False, termination=no_div
                )
            ),
            True,
        )
    return entries


def run_problem(problem: Problem, cfg: Config, args) -> list[Row]:
    entries = solver_entries(args)
    compiled: dict[str, SolveFn] = {}
    decoders: dict[str, Callable[[Any], str]] = {}
    diagnostic: dict[str, bool] = {}
    for name, (entry, is_diag) in entries.items():
        compiled[name], decoders[name] = entry(problem, cfg)
        diagnostic[name] = is_diag

    # The bare loop first: it calibrates jaxopt's absolute ℓ2 tolerance to the ℓ2
    # residual at which the elementwise test first passes.
    z_bare, k_bare, _ = compiled[BARE](problem.y0, problem.args)
    jax.block_until_ready(z_bare)
    use_jaxopt = jaxopt is not None and not args.no_jaxopt
    use_banax = banax is not None and not args.no_banax
    if use_jaxopt or use_banax:
        k_bare = int(k_bare)
        z_prev = _picard_iterate(problem, k_bare - 1)
        tol = float(jnp.linalg.norm(problem.fn(z_prev, problem.args) - z_prev))
    if use_jaxopt:
        for kind, name in (
            ("fpi", "jaxopt.FixedPointIteration"),
            ("anderson", "jaxopt.AndersonAcceleration(m=5)"),
        ):
            compiled[name], decoders[name] = jaxopt_entry(kind, tol)(problem, cfg)
            diagnostic[name] = False
    if use_banax:
        for name, fn_entry in l2_test_entries(tol).items():
            compiled[name], decoders[name] = fn_entry(problem, cfg)
            diagnostic[name] = False
        for name, kind in zip(BANAX_PAIRS, ("picard", "anderson", "broyden")):
            # A failure drops the row with a note rather than ending the benchmark.
            try:
                fn, decoder = banax_entry(kind, tol)(problem, cfg)
                jax.block_until_ready(fn(problem.y0, problem.args))
            except Exception as e:  # noqa: BLE001
                failure = f"{problem.name}, {name}: {type(e).__name__}: {e}"
                BANAX_FAILURES.append(failure)
            else:
                compiled[name], decoders[name], diagnostic[name] = fn, decoder, False

    start = time.perf_counter()
    outputs = {}
    for name, fn in compiled.items():
        outputs[name] = jax.block_until_ready(fn(problem.y0, problem.args))
    compile_time = time.perf_counter() - start
    load_before = load_average()
    all_times = time_interleaved_all(
        compiled,
        problem.y0,
        problem.args,
        repeats=args.repeats,
        warmup=0,
        min_time=args.min_time,
    )
    times = {name: statistics.median(ts) for name, ts in all_times.items()}
    print(
        f"  {problem.name}: compiled {len(compiled)} solvers in {compile_time:.1f} s, "
        f"timed {len(next(iter(all_times.values())))} rounds in "
        f"{sum(sum(ts) for ts in all_times.values()):.1f} s, load average "
        f"{load_before} → {load_average()}",
        file=sys.stderr,
        flush=True,
    )
    rows = []
    spec = problem.spec
    label = f"{spec.n}×{spec.batch}, r={spec.radius:g}"
    FLOORS[label] = krylov_floor(problem, cfg)
    for name, (z, evals, code) in outputs.items():
        rows.append(
            Row(
                problem=label,
                radius=problem.spec.radius,
                n=problem.spec.n,
                solver=name,
                f_evals=int(evals),
                rel_residual=relative_residual(problem, z),
                criterion=elementwise_error(problem, z, cfg.rtol, cfg.atol),
                result=decoders[name](code),
                time=times[name],
                time_min=min(all_times[name]),
                diagnostic=diagnostic[name],
            )
        )
    return rows


def _picard_iterate(problem: Problem, k: int) -> jax.Array:
    """`f^k(y0)`, to calibrate jaxopt's tolerance."""
    fn = jax.jit(lambda y, a: lax.fori_loop(0, k, lambda _, z: problem.fn(z, a), y))
    return fn(problem.y0, problem.args)


def _get(rows: list[Row], problem: str, solver: str) -> Row | None:
    for row in rows:
        if row.problem == problem and row.solver == solver:
            return row
    return None


def results_table(rows: list[Row]) -> str:
    headers = [
        "problem",
        "solver",
        "f-evals",
        "rel. residual",
        "result",
        "time / solve",
        "time / f-eval",
        "time vs loop",
        "per-eval vs loop",
        "f-evals vs Picard",
    ]
    body = []
    for row in rows:
        bare = _get(rows, row.problem, BARE)
        picard = _get(rows, row.problem, PICARD)
        assert bare is not None
        body.append(
            [
                row.problem,
                row.solver,
                row.f_evals,
                f"{row.rel_residual:.2e}",
                row.result,
                fmt_time(row.time),
                fmt_time(row.time_per_eval),
                fmt_ratio(row.time / bare.time),
                fmt_ratio(row.time_per_eval / bare.time_per_eval),
                fmt_ratio(row.f_evals / picard.f_evals) if picard else "—",
            ]
        )
    return markdown_table(headers, body, align="llrrlrrrrr")


def _overhead(row: Row, picard: Row) -> tuple[float, float]:
    """Per-step overhead over Picard's time per evaluation: (fastest solves,
    medians)."""
    fastest = row.time_min_per_eval / picard.time_min_per_eval - 1
    return fastest, row.time_per_eval / picard.time_per_eval - 1


def overhead_lines(rows: list[Row]) -> list[str]:
    """Per-step overhead of Anderson and Broyden relative to Picard's cost per
    evaluation (and to the bare loop's, ≈ the cost of one `f`), on the fastest solves
    (the least disturbed by other processes) and on the medians."""
    lines = []
    problems = dict.fromkeys(r.problem for r in rows)
    for problem in problems:
        picard = _get(rows, problem, PICARD)
        bare = _get(rows, problem, BARE)
        if picard is None or bare is None:
            continue
        parts = []
        for name in (ANDERSON5, ANDERSON_DEFAULT, BROYDEN, BROYDEN16):
            row = _get(rows, problem, name)
            if row is None:
                continue
            fastest, median = _overhead(row, picard)
            over_bare = row.time_min_per_eval / bare.time_min_per_eval - 1
            extra = row.time_min_per_eval - picard.time_min_per_eval
            parts.append(
                f"{name}: {fastest:+.0%} of Picard's time/eval "
                f"({fmt_time(extra)}/step; medians {median:+.0%}; {over_bare:+.0%} "
                "vs the bare loop's)"
            )
        lines.append(f"- per-step overhead, {problem}: " + "; ".join(parts))
        # The floor: the same algorithms written by hand, with nothing else.
        parts = []
        for name, ref in ((ANDERSON_DEFAULT, BARE_ANDERSON), (BROYDEN, BARE_BROYDEN)):
            row, ref_row = _get(rows, problem, name), _get(rows, problem, ref)
            if row is None or ref_row is None:
                continue
            floor = ref_row.time_min_per_eval / bare.time_min_per_eval - 1
            floor_median = ref_row.time_per_eval / bare.time_per_eval - 1
            ratio = row.time_min_per_eval / ref_row.time_min_per_eval
            ratio_median = row.time_per_eval / ref_row.time_per_eval
            parts.append(
                f"{ref}: {floor:+.0%} of the bare Picard loop's time/eval (medians "
                f"{floor_median:+.0%}); {name} {ratio:.2f}× its time/eval (medians "
                f"{ratio_median:.2f}×)"
            )
        if parts:
            lines.append(
                f"- the algorithms' own per-step cost, {problem}: " + "; ".join(parts)
            )
    return lines


def floor_lines(rows: list[Row]) -> list[str]:
    """The Krylov floor of each problem and each accelerated solver's f-evals over
    it (`krylov_floor`, plus the evaluation at `y0`)."""
    lines = []
    for problem in dict.fromkeys(r.problem for r in rows):
        floor = FLOORS.get(problem)
        if floor is None or floor < 0:
            continue
        parts = []
        for name in (ANDERSON5, ANDERSON_DEFAULT, BROYDEN, BROYDEN16):
            row = _get(rows, problem, name)
            if row is not None:
                parts.append(f"{name} {row.f_evals} ({row.f_evals / (floor + 1):.2f}×)")
        lines.append(
            f"- {problem}: GMRES {floor} matvecs, i.e. {floor + 1} evaluations with "
            "f(y0); " + ", ".join(parts)
        )
    return lines


def banax_lines(rows: list[Row]) -> list[str]:
    """eqxdeq's time over banax's for the same method and the same ℓ2 test."""
    lines = []
    for problem in dict.fromkeys(r.problem for r in rows):
        for banax_name, ours in BANAX_PAIRS.items():
            theirs, mine = _get(rows, problem, banax_name), _get(rows, problem, ours)
            if theirs is None or mine is None:
                continue
            solve = mine.time_min / theirs.time_min
            per_eval = mine.time_min_per_eval / theirs.time_min_per_eval
            lines.append(
                f"- {problem}, {ours} / {banax_name}: {solve:.2f}× the time per solve "
                f"(medians {mine.time / theirs.time:.2f}×), {per_eval:.2f}× per "
                f"f-eval; f-evals {mine.f_evals} vs {theirs.f_evals} — "
                + ("met" if solve <= BANAX_TARGET else "**MISSED**")
                + f" (≤ {BANAX_TARGET}×)"
            )
    return lines


def target_lines(rows: list[Row], overhead_threshold: float) -> list[str]:
    """The issue's targets, each marked met / MISSED."""

    def mark(ok: bool) -> str:
        return "met" if ok else "**MISSED**"

    lines = []
    problems = dict.fromkeys(r.problem for r in rows)
    for problem in problems:
        picard, bare = _get(rows, problem, PICARD), _get(rows, problem, BARE)
        if picard is None or bare is None:
            continue
        ratio = picard.time_per_eval / bare.time_per_eval
        ratio_min = picard.time_min_per_eval / bare.time_min_per_eval
        lines.append(
            f"- Picard per f-eval ≤ 1.05× bare loop, {problem}: {ratio:.2f}× "
            f"(fastest solves: {ratio_min:.2f}×) — {mark(ratio <= 1.05)}"
        )
        fpi = _get(rows, problem, OPTX_FPI)
        if fpi is not None:
            ratio = picard.time_per_eval / fpi.time_per_eval
            ratio_min = picard.time_min_per_eval / fpi.time_min_per_eval
            lines.append(
                f"- Picard per f-eval ≤ optx.FixedPointIteration's, {problem}: "
                f"{ratio:.2f}× (fastest solves: {ratio_min:.2f}×) — "
                f"{mark(ratio_min <= 1)}"
            )
    for problem in problems:
        picard = _get(rows, problem, PICARD)
        row0 = _get(rows, problem, BARE)
        if picard is None or row0 is None or row0.radius < 0.99:
            continue
        for name in ACCELERATED:
            row = _get(rows, problem, name)
            if row is None:
                continue
            ratio = row.f_evals / picard.f_evals
            lines.append(
                f"- {name} f-evals ≤ 0.25× Picard's, {problem}: {ratio:.3f}× — "
                f"{mark(ratio <= 0.25 and row.result == 'successful')}"
            )
    for problem in problems:
        picard = _get(rows, problem, PICARD)
        if picard is None or picard.n < 256:
            continue
        for name in (ANDERSON_DEFAULT, BROYDEN):
            row = _get(rows, problem, name)
            if row is None:
                continue
            fastest, median = _overhead(row, picard)
            lines.append(
                f"- {name} per-step overhead ≤ {overhead_threshold:.0%} of one Picard "
                f"step, {problem}: {fastest:+.0%} (fastest solves; medians "
                f"{median:+.0%}) — {mark(fastest <= overhead_threshold)}"
            )
    for problem in problems:
        floor = FLOORS.get(problem)
        if floor is None or floor < 0:
            continue
        for name in (ANDERSON_DEFAULT, BROYDEN):
            row = _get(rows, problem, name)
            if row is None:
                continue
            ratio = row.f_evals / (floor + 1)
            lines.append(
                f"- {name} f-evals ≤ {FLOOR_FACTOR}× the Krylov floor ({floor + 1}), "
                f"{problem}: {row.f_evals} ({ratio:.2f}×) — "
                f"{mark(ratio <= FLOOR_FACTOR and row.result == 'successful')}"
            )
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: problems {', '.join(QUICK_PROBLEMS)} (under a minute)",
    )
    parser.add_argument(
        "--problems",
        nargs="+",
        metavar="NxBATCH@RADIUS",
        help=f"problems to run (default: {' '.join(FULL_PROBLEMS)})",
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed solves per solver (median; ≥ 5)"
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=5.0,
        help="keep timing rounds (up to 200) until they took this many seconds per "
        "problem: more samples for cheap solves",
    )
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-jaxopt", action="store_true", help="skip jaxopt rows")
    parser.add_argument("--no-banax", action="store_true", help="skip banax's rows")
    parser.add_argument(
        "--picard-variants",
        action="store_true",
        help="also time diagnostic variants of eqxdeq.Picard (indented rows)",
    )
    parser.add_argument(
        "--overhead-threshold",
        type=float,
        default=0.25,
        help="per-step overhead counted as 'small' next to one f evaluation",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.problems is None:
        args.problems = QUICK_PROBLEMS if args.quick else FULL_PROBLEMS
    if args.repeats < 1:
        parser.error("--repeats must be ≥ 1")
    return args


def run_benchmark(args) -> list[Row]:
    """Every problem of `args` (from `parse_args`), every solver: the rows."""
    cfg = Config(rtol=args.rtol, atol=args.atol, max_steps=args.max_steps)
    rows: list[Row] = []
    for problem_text in args.problems:
        problem = make_tanh_problem(ProblemSpec.parse(problem_text), seed=args.seed)
        rows += run_problem(problem, cfg, args)
    return rows


def library_notes(args) -> list[str]:
    """One line each on jaxopt's and banax's rows: how they stop, or why skipped."""
    notes = []
    if jaxopt is None:
        notes.append("jaxopt is not installed: its rows are skipped.")
    elif args.no_jaxopt:
        notes.append("jaxopt rows skipped (--no-jaxopt).")
    else:
        notes.append(
            "jaxopt stops on an absolute ℓ2 test `‖T(z) − z‖₂ ≤ tol`; tol is set per "
            "problem to the ℓ2 residual at which the bare loop's elementwise test "
            "first passes. jaxopt's f-evals are `state.num_fun_eval`."
        )
    if banax is None:
        notes.append(
            f"banax is not importable here (Python {sys.version.split()[0]}; banax "
            f"requires Python ≥ 3.12; `{BANAX_ERROR}`): its row is skipped."
        )
    elif args.no_banax:
        notes.append("banax's row skipped (--no-banax).")
    else:
        notes.append(
            "banax's solvers stop on the same absolute ℓ2 test as jaxopt (`atol` = "
            "that tol, `rtol = 0`), and so do the rows marked"
            f'{L2_TEST} (eqxdeq with `Termination(criterion="norm")`, '
            "`norm=optx.two_norm`, `rtol = 0`); banax's f-evals are "
            "`sol.stats.steps + 1`."
        )
        notes += [f"banax's row failed and is left out ({f})." for f in BANAX_FAILURES]
    return notes


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    cfg = Config(rtol=args.rtol, atol=args.atol, max_steps=args.max_steps)
    start = time.perf_counter()
    load_start = load_average()
    rows = run_benchmark(args)

    print(f"## eqxdeq solver benchmark\n\nMachine: {environment()}\n")
    print(
        f"float32 tanh layers `z ↦ tanh(z W + x U + b)`; rtol = {cfg.rtol:g}, "
        f"atol = {cfg.atol:g} (elementwise test, max norm), max_steps = "
        f"{cfg.max_steps}, median of ≥ {args.repeats} solves. Load average "
        f"{load_start} at the start, {load_average()} at the end.\n"
    )
    print(results_table(rows))
    print()
    for note in library_notes(args):
        print(f"_{note}_\n")
    print("Per-step overhead (time per f-eval minus Picard's, over Picard's):\n")
    print("\n".join(overhead_lines(rows)))
    print(
        "\nKrylov floor (full GMRES on the layer linearised at z*, float64, same "
        "test; `krylov_floor`):\n"
    )
    print("\n".join(floor_lines(rows)))
    if any(_get(rows, r.problem, n) for r in rows for n in BANAX_PAIRS):
        print("\neqxdeq against banax (same method, same ℓ2 test; fastest solves):\n")
        print("\n".join(banax_lines(rows)))
    print("\nTargets:\n")
    print("\n".join(target_lines(rows, args.overhead_threshold)))
    print(f"\n_total wall time {time.perf_counter() - start:.0f} s_")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
