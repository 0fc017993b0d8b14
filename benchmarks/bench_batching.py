"""Per-sample (`jax.vmap`) against whole-batch solves, on inputs of varying difficulty.

A DEQ layer solves one fixed point per sample. Two ways to run a batch:

- per sample: `jax.vmap` of `optx.fixed_point` over the batch. Each sample has its
  own iterate history, convergence test and (for Anderson) mixing coefficients; the
  batched `while_loop` runs until the slowest sample has converged, the finished
  samples frozen (their `f` still evaluated, the result discarded);
- whole batch: one `optx.fixed_point` on the `(batch, n)` state, as if it were one
  big vector: one test and, for Anderson, one set of coefficients for all samples.

The layer is the tanh layer of `bench_solvers.py` (default n = 256, batch 32,
‖W‖₂ = 0.95, float32), with each sample's input injection rescaled to its own RMS,
log-spaced from 0.02 (tanh' ≈ 1: the layer's Jacobian near-critical, a slow sample)
to 2 (saturated, contractive: a fast one). Solvers `eqxdeq.Anderson(1e-5, 1e-5)`
and, for reference, `eqxdeq.Picard(1e-5, 1e-5)` (defaults: elementwise test, max
norm, which on the whole state means every sample passes the per-sample test).

    PYTHONPATH=. python benchmarks/bench_batching.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import jax
import numpy as np
import optimistix as optx


if __package__:  # imported as `benchmarks.bench_batching` (`python -m benchmarks`)
    from ._common import (
        environment,
        fmt_time,
        load_average,
        make_tanh_problem,
        markdown_table,
        Problem,
        ProblemSpec,
        time_interleaved_all,
    )
else:  # run as a script: benchmarks/ is on sys.path
    from _common import (  # pyright: ignore[reportMissingImports]
        environment,
        fmt_time,
        load_average,
        make_tanh_problem,
        markdown_table,
        Problem,
        ProblemSpec,
        time_interleaved_all,
    )

import eqxdeq


FULL_SPEC = ProblemSpec(256, 32, 0.95)
QUICK_SPEC = ProblemSpec(64, 8, 0.95)
SCALES = (0.02, 2.0)
PER_SAMPLE = "per sample (vmap)"
WHOLE = "whole batch (one state)"


def make_problem(spec: ProblemSpec, scales=SCALES, seed: int = 0) -> Problem:
    """The tanh layer with sample `b`'s injection rescaled to RMS `scales[0] ·
    (scales[1] / scales[0])^(b / (batch − 1))`."""
    problem = make_tanh_problem(spec, seed=seed, input_scale=1.0)
    weight, injection = problem.args
    c = np.asarray(injection, np.float64)
    target = np.geomspace(scales[0], scales[1], spec.batch)
    c *= (target / np.sqrt(np.mean(c**2, axis=1)))[:, None]
    problem.args = (weight, jax.numpy.asarray(c, injection.dtype))
    return problem


def solvers(rtol: float, atol: float) -> dict[str, optx.AbstractFixedPointSolver]:
    return {
        "eqxdeq.Anderson(m=5)": eqxdeq.Anderson(rtol, atol, memory=5),
        "eqxdeq.Picard": eqxdeq.Picard(rtol, atol),
    }


def run(
    spec: ProblemSpec,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 5000,
    repeats: int = 5,
    min_time: float = 2.0,
    names: Sequence[str] | None = None,
) -> list[dict]:
    problem = make_problem(spec)
    weight, injection = problem.args
    fns = {}
    for name, solver in solvers(rtol, atol).items():
        if names is not None and name not in names:
            continue

        def whole(y0, c, solver=solver):
            sol = optx.fixed_point(
                problem.fn, solver, y0, (weight, c), max_steps=max_steps, throw=False
            )
            return sol.value, sol.stats["num_steps"], sol.stats["num_fn_evals"]

        fns[(PER_SAMPLE, name)] = jax.jit(jax.vmap(whole))
        fns[(WHOLE, name)] = jax.jit(whole)
    print(f"timing batching, {spec.name} (load {load_average()})", file=sys.stderr)
    keyed = {f"{mode} | {name}": fn for (mode, name), fn in fns.items()}
    all_times = time_interleaved_all(
        keyed, problem.y0, injection, repeats=repeats, min_time=min_time
    )
    rows = []
    for (mode, name), fn in fns.items():
        z, steps, evals = fn(problem.y0, injection)
        fz = np.asarray(problem.fn(z, problem.args), np.float64)
        z = np.asarray(z, np.float64)
        steps = np.broadcast_to(np.asarray(steps), (spec.batch,))
        evals = np.broadcast_to(np.asarray(evals), (spec.batch,))
        test = np.max(np.abs(fz - z) / (atol + rtol * np.abs(fz)), axis=1)
        rel = np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1)
        rows.append(
            dict(
                mode=mode,
                solver=name,
                batch=spec.batch,
                max_steps=int(np.max(steps)),
                mean_steps=float(np.mean(steps)),
                min_steps=int(np.min(steps)),
                # The batched loop evaluates f for every sample at every iteration.
                f_evals_computed=int(np.max(evals)) * spec.batch,
                f_evals_needed=int(np.sum(evals)),
                converged=int(np.sum(test < 1)),
                max_rel_residual=float(np.max(rel)),
                time=statistics.median(all_times[f"{mode} | {name}"]),
                time_min=min(all_times[f"{mode} | {name}"]),
            )
        )
    return rows


def table(rows: list[dict], time: str = "time") -> str:
    """`time="time_min"`: the fastest solves rather than the medians."""
    body = [
        [
            row["solver"],
            row["mode"],
            f"{row['max_steps']} / {row['mean_steps']:.0f}",
            row["f_evals_needed"],
            row["f_evals_computed"],
            f"{row['converged']}/{row['batch']}",
            fmt_time(row[time]),
        ]
        for row in rows
    ]
    headers = [
        "solver",
        "batching",
        "steps (max / mean)",
        "f-evals (Σ samples)",
        "f-evals computed",
        "converged",
        "time / solve" if time == "time" else "fastest solve",
    ]
    return markdown_table(headers, body, align="llrrrrr")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    spec = QUICK_SPEC if args.quick else FULL_SPEC
    rows = run(spec, repeats=args.repeats)
    print(environment())
    print(f"\n{spec.name}, float32, input RMS {SCALES[0]:g} … {SCALES[1]:g}\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
