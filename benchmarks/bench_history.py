"""How deep a history Anderson and Broyden should keep: evaluations of f against the
Krylov floor, the cost of a step, and the time to the tolerance, by `memory`; and
Broyden's restart against keeping the most recent secant pairs.

Problems: the tanh layers of `bench_solvers.py` (float32, rtol = atol = 1e-5,
optimistix's elementwise test), the issue's three and two longer solves.

- *Krylov floor*: `bench_solvers.krylov_floor`, full-memory GMRES on the layer
  linearised at its fixed point (float64), plus the evaluation at `y0`: what a
  solver that extracted everything from its evaluations would need.
- *step*: the cost of one step, from solves of exactly K steps (`rtol = atol = 0`,
  K = 2, 12, 42): the slope of the fastest time against K, so that the per-solve
  constant (dispatch, initialisation) is not spread over the steps.
- *time to tolerance*: the fastest of the interleaved solves to the tolerance.
- *Broyden variants*: float32 NumPy reference implementations of the good Broyden
  update from H = -I with three memory policies: *restart* (clear when `memory`
  terms are stored: eqxdeq's), *ring* (drop the oldest rank-one term, torchdeq's
  `LBFGS_thres` and banax's `history_size`), *compact* (H rebuilt from the most
  recent `memory` secant pairs, the limited-memory compact form of Byrd, Nocedal
  and Schnabel 1994). Their evaluation counts are what eqxdeq's Broyden would
  need with each policy (the restart column reproduces eqxdeq's own).

    PYTHONPATH=. python benchmarks/bench_history.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import jax
import numpy as np
import optimistix as optx


if __package__:
    from . import bench_solvers
    from ._common import (
        environment,
        load_average,
        make_tanh_problem,
        markdown_table,
        ProblemSpec,
    )
else:  # run as a script: benchmarks/ is on sys.path
    import bench_solvers  # pyright: ignore[reportMissingImports]
    from _common import (  # pyright: ignore[reportMissingImports]
        environment,
        load_average,
        make_tanh_problem,
        markdown_table,
        ProblemSpec,
    )

import eqxdeq


FULL_PROBLEMS = (
    "256x32@0.9",
    "256x32@0.99",
    "2048x8@0.9",
    "256x32@0.999",
    "2048x8@0.99",
)
QUICK_PROBLEMS = ("64x8@0.99",)
ANDERSON_MEMORIES = (4, 5, 6, 8, 10, 12)
BROYDEN_MEMORIES = (4, 6, 8, 12, 16)
POLICIES = ("restart", "ring", "compact")
STEP_COUNTS = (2, 12, 42)
TOL = 1e-5


def _solver(kind: str, memory: int, rtol: float, atol: float):
    return getattr(eqxdeq, kind)(rtol, atol, memory=memory)


def f_evals(problem, kind: str, memory: int) -> tuple[int, bool]:
    solver = _solver(kind, memory, TOL, TOL)

    @jax.jit
    def solve(y0, args):
        sol = optx.fixed_point(
            problem.fn, solver, y0, args, max_steps=5000, throw=False
        )
        return sol.stats["num_fn_evals"], sol.result == optx.RESULTS.successful

    evals, ok = solve(problem.y0, problem.args)
    return int(evals), bool(ok)


def step_costs(problem, solvers: dict, rounds: int) -> dict[str, float]:
    """name -> seconds per step: the slope of the fastest solve of exactly K steps
    against K (solves interleaved round-robin)."""
    fns = {}
    for i, (name, make) in enumerate(solvers.items()):
        # (rtol = 0 and a tiny atol: never converges. Distinct atols keep
        # optimistix's compilation caches apart.)
        solver = make(0.0, 1e-30 * (1 + i))
        for k in STEP_COUNTS:

            def solve(y0, args, solver=solver, k=k):
                return optx.fixed_point(
                    problem.fn, solver, y0, args, max_steps=k, throw=False
                ).value

            fns[(name, k)] = jax.jit(solve)
            with warnings.catch_warnings():
                # (The tolerance is unreachable on purpose.)
                warnings.simplefilter("ignore", eqxdeq.ToleranceWarning)
                jax.block_until_ready(fns[(name, k)](problem.y0, problem.args))
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(problem.y0, problem.args))
            times[key].append(time.perf_counter() - start)
    out = {}
    for name in solvers:
        fastest = [min(times[(name, k)]) for k in STEP_COUNTS]
        out[name] = float(np.polyfit(STEP_COUNTS, fastest, 1)[0])
    return out


def solve_times(problem, solvers: dict, rounds: int) -> dict[str, float]:
    """name -> the fastest of `rounds` interleaved solves to the tolerance."""
    fns = {}
    for name, make in solvers.items():
        solver = make(TOL, TOL)

        def solve(y0, args, solver=solver):
            return optx.fixed_point(
                problem.fn, solver, y0, args, max_steps=5000, throw=False
            ).value

        fns[name] = jax.jit(solve)
        jax.block_until_ready(fns[name](problem.y0, problem.args))
    best = dict.fromkeys(fns, np.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(problem.y0, problem.args))
            best[name] = min(best[name], time.perf_counter() - start)
    return best


# ------------------------------------------------------------- Broyden variants


def broyden_reference(problem, policy: str, memory: int, max_evals: int = 1000):
    """Evaluations of f for good Broyden (H₀ = -I, unit steps, updates skipped when
    |Δyᵀ H Δg| ≤ 1e-6 ‖Δy‖ ‖H Δg‖) with the memory `policy`, in float32 NumPy;
    negative if it did not converge within `max_evals`."""
    dtype = np.float32
    weight, injection = (np.asarray(a, dtype) for a in problem.args)
    shape = injection.shape

    def f(y):
        return np.tanh(y.reshape(shape) @ weight + injection).ravel()

    us, vs = [], []  # restart / ring: H = -I + Σ u vᵀ
    steps, diffs = [], []  # compact: the secant pairs (Δy, Δg), oldest first

    def apply(x):
        if policy != "compact":
            out = -x
            for u, v in zip(us, vs, strict=True):
                out = out + u * (v @ x)
            return out
        if not steps:
            return -x
        s, y = np.stack(steps), np.stack(diffs)
        middle = s @ y.T + np.tril(s @ s.T, -1)  # H = -I + (S + Y) M⁻¹ Sᵀ
        coeffs = np.linalg.solve(middle.astype(np.float64), (s @ x).astype(np.float64))
        return -x + (s + y).T @ coeffs.astype(dtype)

    def apply_t(x):
        out = -x
        for u, v in zip(us, vs, strict=True):
            out = out + v * (u @ x)
        return out

    with np.errstate(all="ignore"):
        y = np.zeros(injection.size, dtype)
        fy = f(y)
        g = fy - y
        previous = None
        for evals in range(1, max_evals + 1):
            if np.max(np.abs(g) / (TOL + TOL * np.abs(fy))) < 1:
                return evals
            if not np.all(np.isfinite(g)):
                break
            if previous is not None:
                s, dg = y - previous[0], g - previous[1]
                if policy == "restart" and len(us) >= memory:
                    us.clear(), vs.clear()
                if policy == "ring" and len(us) >= memory:
                    del us[0], vs[0]
                if policy == "compact" and len(steps) >= memory:
                    del steps[0], diffs[0]
                h_dg = apply(dg)
                denom = s @ h_dg
                if abs(denom) > 1e-6 * np.linalg.norm(s) * np.linalg.norm(h_dg):
                    if policy == "compact":
                        steps.append(s), diffs.append(dg)
                    else:
                        v = apply_t(s)
                        us.append((s - h_dg) / denom), vs.append(v)
            previous = (y, g)
            y = (y - apply(g)).astype(dtype)
            fy = f(y)
            g = fy - y
    return -max_evals


# ----------------------------------------------------------------------- report


def _cell(evals: int, ok: bool, floor: int) -> str:
    return f"{evals} ({evals / floor:.2f}×)" + ("" if ok else " (failed)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args(argv)
    problems = QUICK_PROBLEMS if args.quick else FULL_PROBLEMS
    rounds = 3 if args.quick else args.rounds
    cfg = bench_solvers.Config(rtol=TOL, atol=TOL, max_steps=5000)
    start = time.perf_counter()
    print(f"## History depth of Anderson and Broyden\n\nMachine: {environment()}\n")
    print(f"Load average {load_average()} at the start.\n")

    built = {text: make_tanh_problem(ProblemSpec.parse(text)) for text in problems}
    floors = {t: bench_solvers.krylov_floor(p, cfg) + 1 for t, p in built.items()}
    configs = [("Anderson", m) for m in ANDERSON_MEMORIES]
    configs += [("Broyden", m) for m in BROYDEN_MEMORIES]
    evals = {}
    for kind, m in configs:
        for t, p in built.items():
            evals[(kind, m, t)] = f_evals(p, kind, m)
    headers = ["solver"] + list(problems)
    body = [["Krylov floor (GMRES + 1)"] + [str(floors[t]) for t in problems]]
    for kind, m in configs:
        body.append(
            [f"{kind}(memory={m})"]
            + [_cell(*evals[(kind, m, t)], floors[t]) for t in problems]
        )
    print("Evaluations of f to the tolerance (× the Krylov floor):\n")
    print(markdown_table(headers, body))

    # Cost of a step and time to the tolerance, on the first near-critical layer.
    timed = next((t for t in problems if t.endswith("0.99")), problems[0])
    problem = built[timed]
    solvers = {"Picard": lambda rtol, atol: eqxdeq.Picard(rtol, atol)}
    for kind, m in configs:
        solvers[f"{kind}(memory={m})"] = lambda rtol, atol, kind=kind, m=m: _solver(
            kind, m, rtol, atol
        )
    steps = step_costs(problem, solvers, rounds)
    to_tol = solve_times(problem, solvers, rounds)
    picard = steps["Picard"]
    body = [
        [
            name,
            f"{steps[name] * 1e6:.1f} µs",
            f"{steps[name] / picard - 1:+.0%}",
            f"{to_tol[name] * 1e3:.2f} ms",
            f"{to_tol[name] / to_tol['Picard']:.2f}×",
        ]
        for name in solvers
    ]
    print(
        f"\nCost of a step ({timed}; slope of the fastest of {rounds} solves of "
        f"exactly {STEP_COUNTS} steps) and time to the tolerance (fastest of "
        f"{rounds}); load average {load_average()}:\n"
    )
    print(
        markdown_table(
            ["solver", "step", "over Picard's", "time to tol", "vs Picard"], body
        )
    )

    variants = {
        (policy, m, t): broyden_reference(p, policy, m)
        for policy in POLICIES
        for m in BROYDEN_MEMORIES
        for t, p in built.items()
    }
    body = []
    for policy in POLICIES:
        for m in BROYDEN_MEMORIES:
            cells = []
            for t in problems:
                n = variants[(policy, m, t)]
                cells.append(_cell(abs(n), n > 0, floors[t]))
            body.append([f"{policy}, memory={m}"] + cells)
    print("\nBroyden's memory policies (NumPy float32 reference; f-evals):\n")
    print(markdown_table(["policy"] + list(problems), body))
    print(f"\n_total wall time {time.perf_counter() - start:.0f} s_", file=sys.stderr)
    return dict(
        floors=floors, evals=evals, steps=steps, times=to_tol, variants=variants
    )


if __name__ == "__main__":
    main()
