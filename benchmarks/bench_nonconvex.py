"""Solvers on a tanh DEQ layer that is *not* a contraction.

`z ↦ tanh(z W + c)` with `W` symmetric of spectral norm 1.3 (default n = 256,
batch 32, float32) and a small input injection `c`: near the fixed points
`tanh' ≈ 1`, so the layer's Jacobian has eigenvalues beyond ±1 for some samples.
Picard oscillates or diverges there and Anderson/Broyden stall; Newton-type
methods and the ODE steady state still converge.

Every solver runs per sample (`jax.vmap` over the batch, `W` shared), which is how
a DEQ layer is solved: each sample has its own fixed point, convergence test and
(for the Newton methods) its own Krylov solve. Target: relative residual
`‖f(z) − z‖₂ / ‖f(z)‖₂ ≤ 1e-5` for every sample. Reported: samples converged,
evaluations of f (max and mean over samples), Jacobian-vector products, median
time, and the time relative to `optx.Newton` with its default dense linear solve
(also per sample; on the whole (32, 256) state it would materialise an
8192 × 8192 Jacobian: its compilation and first step took more than 14 minutes on
the 2-core CI machine, so it is only run with `--full-state-newton`).

Usage: python benchmarks/bench_nonconvex.py [--n 256] [--batch 32] [--norm 1.3]
       python benchmarks/bench_nonconvex.py --sweep   (Newton–Krylov's options over
                                                      ‖W‖₂ = 1.3, 1.6, 2)
"""

import argparse
import statistics
from collections.abc import Sequence

import jax
import numpy as np
import optimistix as optx


if __package__:  # imported as `benchmarks.bench_nonconvex` (`python -m benchmarks`)
    from ._common import (
        environment,
        fmt_ratio,
        fmt_time,
        make_tanh_problem,
        markdown_table,
        ProblemSpec,
        time_fn_all,
    )
else:  # run as a script: benchmarks/ is on sys.path
    from _common import (  # pyright: ignore[reportMissingImports]
        environment,
        fmt_ratio,
        fmt_time,
        make_tanh_problem,
        markdown_table,
        ProblemSpec,
        time_fn_all,
    )

import eqxdeq


NEWTON = "optx.Newton (dense)"
# The rows of the docs' table (`python -m benchmarks`): the slow, failing
# "Newton + line search" and the cautious dt0 = 0.1 variant are left out.
KEY_SOLVERS = (
    "Picard",
    "Anderson(m=5)",
    "Broyden + line search",
    "NewtonKrylov (default: pseudo-transient, dt0=1)",
    "Fallback(Anderson ≤ 60 steps → NewtonKrylov)",
    "SteadyState (Tsit5)",
    NEWTON,
)


def solvers(
    rtol: float, history_length: int = 0
) -> dict[str, optx.AbstractFixedPointSolver]:
    """`history_length > 0` makes eqxdeq's solvers record `‖f(z) − z‖₂` at each
    evaluation (`sol.stats["residual_history"]`)."""
    # The DEQ convention: ‖f(z) − z‖₂ ≤ rtol ‖f(z)‖₂ per sample.
    term = eqxdeq.Termination(criterion="norm")
    stall = eqxdeq.Termination(criterion="norm", stall_patience=10)
    kw = dict(norm=optx.two_norm, termination=term, history_length=history_length)
    out: dict[str, optx.AbstractFixedPointSolver] = {
        "Picard": eqxdeq.Picard(rtol, 0.0, **kw),
        "Anderson(m=5)": eqxdeq.Anderson(rtol, 0.0, memory=5, **kw),
        "Broyden + line search": eqxdeq.Broyden(rtol, 0.0, line_search=True, **kw),
        "NewtonKrylov (default: pseudo-transient, dt0=1)": eqxdeq.NewtonKrylov(
            rtol, 0.0, **kw
        ),
        "NewtonKrylov (pseudo-transient, dt0=0.1)": eqxdeq.NewtonKrylov(
            rtol, 0.0, pseudo_time_step=0.1, **kw
        ),
        "NewtonKrylov (Newton + line search)": eqxdeq.NewtonKrylov(
            rtol, 0.0, pseudo_time_step=None, line_search=True, **kw
        ),
        "Fallback(Anderson ≤ 60 steps → NewtonKrylov)": eqxdeq.Fallback(
            eqxdeq.Anderson(
                rtol,
                0.0,
                norm=optx.two_norm,
                termination=stall,
                history_length=history_length,
            ),
            eqxdeq.NewtonKrylov(rtol, 0.0, **kw),
            stage_steps=(60, None),
        ),
    }
    if hasattr(eqxdeq, "SteadyState"):
        out["SteadyState (Tsit5)"] = eqxdeq.SteadyState(rtol, 0.0, **kw)
    # optimistix's Newton with its default (dense, materialised Jacobian) solve; its
    # criterion is on the step, so ask for more and check the residual afterwards.
    out[NEWTON] = optx.Newton(rtol=rtol / 10, atol=rtol / 10)
    return out


def sweep_solvers(rtol: float) -> dict[str, optx.AbstractFixedPointSolver]:
    """Newton–Krylov's globalisation options: how the default was chosen."""
    term = eqxdeq.Termination(criterion="norm")
    kw = dict(norm=optx.two_norm, termination=term)
    out: dict[str, optx.AbstractFixedPointSolver] = {}
    for dt0 in (0.3, 1.0, 3.0):
        for forcing_max in (0.9, 0.5):
            descent = eqxdeq.NewtonKrylovDescent(
                forcing_max=forcing_max, pseudo_time_step=dt0
            )
            out[f"ΨTC dt0={dt0}, forcing_max={forcing_max}"] = (
                eqxdeq.DescentSearchSolver(
                    rtol, 0.0, descent=descent, search=optx.LearningRate(1.0), **kw
                )
            )
    out["Newton + line search"] = eqxdeq.NewtonKrylov(
        rtol, 0.0, pseudo_time_step=None, line_search=True, **kw
    )
    return out


def run_per_sample(problem, solver, opts):
    """Solve every sample (vmap); returns the solution, the relative residuals
    (float64), the median time and the fastest (both NaN if `opts.repeats < 1`)."""
    weight, injection = problem.args

    def solve_one(y0, c):
        return optx.fixed_point(
            problem.fn, solver, y0, (weight, c), max_steps=opts.max_steps, throw=False
        )

    run = jax.jit(jax.vmap(solve_one))
    sol = run(problem.y0, injection)
    z = np.asarray(sol.value, np.float64)
    fz = np.asarray(problem.fn(sol.value, problem.args), np.float64)
    rel = np.linalg.norm(fz - z, axis=-1) / np.linalg.norm(fz, axis=-1)
    if opts.repeats < 1:  # not timed
        return sol, rel, float("nan"), float("nan")
    times = time_fn_all(run, problem.y0, injection, repeats=opts.repeats, warmup=0)
    return sol, rel, statistics.median(times), min(times)


def sweep(opts):
    norms = (1.3, 1.6, 2.0)
    problems = {
        norm: make_tanh_problem(
            ProblemSpec(opts.n, opts.batch, norm), input_scale=opts.input_scale
        )
        for norm in norms
    }
    print(environment())
    print(
        f"\nSweep: n={opts.n}, batch={opts.batch}, input RMS {opts.input_scale}, "
        "float32; per ‖W‖₂: samples converged, max f-evals, median time\n"
    )
    rows = []
    for name, solver in sweep_solvers(opts.rtol).items():
        row = [name]
        for norm in norms:
            sol, rel, t, _ = run_per_sample(problems[norm], solver, opts)
            converged = int(np.sum(rel <= opts.rtol))
            evals = int(np.max(np.asarray(sol.stats["num_fn_evals"])))
            row.append(f"{converged}/{opts.batch}, {evals}, {fmt_time(t)}")
        rows.append(row)
    print(markdown_table(["solver"] + [f"‖W‖₂ = {n}" for n in norms], rows))


def run_solvers(
    opts, names: Sequence[str] | None = None, history: bool = False
) -> list[dict]:
    """One row per solver (those in `names`, default all) on the layer of `opts`
    (`n`, `batch`, `norm`, `input_scale`, `rtol`, `max_steps`, `repeats`).

    With `history=True`, eqxdeq's solvers also record `‖f(z) − z‖₂` at each
    evaluation (a small per-step cost): the row's `history` is then a
    `(batch, evaluations)` array, NaN after a sample stopped (`None` for optimistix's
    Newton, which records none; Fallback's is its stages' histories one after the
    other). `f_norm` is `‖f(z)‖₂` per sample at the returned points."""
    spec = ProblemSpec(opts.n, opts.batch, opts.norm)
    problem = make_tanh_problem(spec, input_scale=opts.input_scale)
    weight, injection = problem.args
    # SteadyState makes ~6 evaluations per step.
    history_length = 6 * opts.max_steps + 8 if history else 0
    rows = []
    for name, solver in solvers(opts.rtol, history_length).items():
        if names is not None and name not in names:
            continue
        sol, rel, t, t_min = run_per_sample(problem, solver, opts)
        z = np.asarray(sol.value, np.float64)
        # The Jacobian's spectral radius at each returned point.
        slope = (
            1
            - np.tanh(
                z @ np.asarray(weight, np.float64) + np.asarray(injection, np.float64)
            )
            ** 2
        )
        jac = slope[:, :, None] * np.asarray(weight, np.float64).T[None]
        radius = np.max(np.abs(np.linalg.eigvals(jac)), axis=-1)
        stats = sol.stats
        evals = np.asarray(stats.get("num_fn_evals", stats["num_steps"]))
        jvps = np.asarray(stats.get("num_jvps", np.zeros_like(evals)))
        if name == NEWTON:
            # One evaluation and a full Jacobian (n jvps, batched) per step.
            jvps = evals * opts.n
        trace = None
        if history and name != NEWTON:
            trace = np.asarray(stats["residual_history"], np.float64)
            trace = trace[:, : np.max(np.sum(np.isfinite(trace), axis=1))]
        fz = np.asarray(problem.fn(sol.value, problem.args), np.float64)
        rows.append(
            dict(
                solver=name,
                converged=int(np.sum(rel <= opts.rtol)),
                batch=opts.batch,
                max_rel_residual=float(np.max(rel)),
                max_f_evals=int(np.max(evals)),
                mean_f_evals=float(np.mean(evals)),
                max_jvps=int(np.max(jvps)),
                unstable=int(np.sum(radius > 1)),
                time=t,
                time_min=t_min,
                history=trace,
                f_norm=np.linalg.norm(fz, axis=-1),
            )
        )
    return rows


def table(rows: list[dict], columns: str = "all", time: str = "time") -> str:
    """`columns="key"`: without the spectral-radius column (the docs' table).
    `time="time_min"`: the fastest solves rather than the medians."""
    ref = next((row[time] for row in rows if row["solver"] == NEWTON), None)
    body = []
    for row in rows:
        cells = [
            row["solver"],
            f"{row['converged']}/{row['batch']}",
            f"{row['max_rel_residual']:.1e}",
            row["max_f_evals"],
            f"{row['mean_f_evals']:.0f}",
            row["max_jvps"],
        ]
        if columns == "all":
            cells.append(row["unstable"])
        cells.append(fmt_time(row[time]))
        cells.append(fmt_ratio(row[time] / ref) if ref else "—")
        body.append(cells)
    headers = [
        "solver",
        "converged",
        "max rel. residual",
        "max f-evals",
        "mean f-evals",
        "max jvps",
    ]
    if columns == "all":
        headers.append("samples with ρ(∂f/∂z) > 1")
    headers += [
        "median time" if time == "time" else "fastest time",
        "time / optx.Newton",
    ]
    return markdown_table(headers, body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--norm", type=float, default=1.3)
    parser.add_argument("--input-scale", type=float, default=0.1)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-state-newton", action="store_true")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="compare Newton–Krylov's globalisation options over ‖W‖₂ = 1.3, 1.6, 2",
    )
    opts = parser.parse_args()
    if opts.sweep:
        sweep(opts)
        return

    spec = ProblemSpec(opts.n, opts.batch, opts.norm)
    problem = make_tanh_problem(spec, input_scale=opts.input_scale)
    print(environment())
    print(f"\nProblem: {spec.name}, input RMS {opts.input_scale}, float32\n")
    print(table(run_solvers(opts)))

    if opts.full_state_newton:
        solver = optx.Newton(rtol=opts.rtol / 10, atol=opts.rtol / 10)
        run = jax.jit(
            lambda y0: optx.fixed_point(
                problem.fn,
                solver,
                y0,
                problem.args,
                max_steps=opts.max_steps,
                throw=False,
            )
        )
        ts = time_fn_all(run, problem.y0, repeats=1, warmup=0)
        print(f"\noptx.Newton on the whole state (compile + run): {fmt_time(ts[0])}")


if __name__ == "__main__":
    main()
