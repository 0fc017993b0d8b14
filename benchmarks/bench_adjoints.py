"""Backward-pass cost of each gradient method through a DEQ fixed point.

For each adjoint this prints, from one run: the median time of a forward solve, of a
forward + backward (`jax.grad` of a loss of the fixed point w.r.t. W and the
injection), their ratio, the backward/forward ratio, and the gradient's relative error
against the exact implicit gradient at the same returned point: `(I − ∂f/∂z)⁻ᵀ`
formed densely and solved per sample in float64 on the host (the tanh layer acts
row by row, so its Jacobian is block diagonal over the batch).

Problems: the tanh layers of `bench_solvers.py` (n = 256, batch 32, radius 0.9 and
0.99), forward solver `eqxdeq.Anderson(1e-5, 1e-5)` (and Broyden for SHINE).

    PYTHONPATH=. python benchmarks/bench_adjoints.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx


if __package__:  # imported as `benchmarks.bench_adjoints` (`python -m benchmarks`)
    from ._common import (
        environment,
        fmt_ratio,
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
        fmt_ratio,
        fmt_time,
        load_average,
        make_tanh_problem,
        markdown_table,
        Problem,
        ProblemSpec,
        time_interleaved_all,
    )

import eqxdeq


try:  # banax (Python >= 3.12) is optional: without it its comparison is skipped.
    import banax.adjoint
    import banax.solver

    BANAX_ERROR = None
except Exception as e:  # noqa: BLE001 (ImportError, or a SyntaxError on old Pythons)
    banax = None
    BANAX_ERROR = f"{type(e).__name__}: {e}"
BANAX_MEMORY = 8  # Broyden's memory on both sides (eqxdeq's default)


DENSE_DEFAULT = "optx.ImplicitAdjoint() [default, dense]"
EPS50 = 50 * float(jnp.finfo(jnp.float32).eps)
QUICK_SPECS = (ProblemSpec(64, 8, 0.9),)
FULL_SPECS = (ProblemSpec(256, 32, 0.9), ProblemSpec(256, 32, 0.99))


def adjoints(tol: float) -> dict[str, tuple[optx.AbstractAdjoint, str]]:
    """name -> (adjoint, forward solver name)."""
    return {
        "eqxdeq.ImplicitAdjoint() [eqxdeq.GMRES, default]": (
            eqxdeq.ImplicitAdjoint(),
            "A",
        ),
        "eqxdeq.ImplicitAdjoint(lx.GMRES(50ε)) [default until 2026-12]": (
            eqxdeq.ImplicitAdjoint(
                lx.GMRES(rtol=EPS50, atol=EPS50, restart=20, stagnation_iters=20)
            ),
            "A",
        ),
        "eqxdeq.ImplicitAdjoint(Richardson)": (
            eqxdeq.ImplicitAdjoint(eqxdeq.Richardson(tol, tol, max_steps=5000)),
            "A",
        ),
        "eqxdeq.JFB()": (eqxdeq.JFB(), "A"),
        "eqxdeq.PhantomAdjoint(5)": (eqxdeq.PhantomAdjoint(5), "A"),
        "eqxdeq.PhantomAdjoint(5, unroll)": (
            eqxdeq.PhantomAdjoint(5, mode="unroll"),
            "A",
        ),
        "eqxdeq.ShineAdjoint() [Anderson]": (eqxdeq.ShineAdjoint(), "A"),
        "eqxdeq.ShineAdjoint(GMRES) [Anderson]": (
            eqxdeq.ShineAdjoint(eqxdeq.GMRES(rtol=1e-5, atol=0.0)),
            "A",
        ),
        "eqxdeq.ShineAdjoint() [Broyden]": (eqxdeq.ShineAdjoint(), "B"),
        "eqxdeq.ShineAdjoint(Richardson) [Broyden]": (
            eqxdeq.ShineAdjoint(eqxdeq.Richardson(tol, tol, max_steps=5000)),
            "B",
        ),
        DENSE_DEFAULT: (optx.ImplicitAdjoint(), "A"),
        "optx.ImplicitAdjoint(GMRES)": (
            optx.ImplicitAdjoint(lx.GMRES(rtol=tol, atol=tol)),
            "A",
        ),
        "optx.RecursiveCheckpointAdjoint() [BPTT]": (
            optx.RecursiveCheckpointAdjoint(),
            "A",
        ),
    }


def loss_of_fixed_point(z):
    return jnp.mean(jnp.sin(z))


def exact_gradient(problem: Problem, z) -> tuple[np.ndarray, np.ndarray]:
    """The implicit-function-theorem gradient of `mean(sin(z*))` w.r.t. `(W, c)` at
    the point `z`, in float64: with `s = tanh'(z W + c)`, each sample's adjoint `λ`
    solves `(I − W diag(s)) λ = ∂loss/∂z` densely; then `∂/∂c = s ⊙ λ` and
    `∂/∂W = zᵀ (s ⊙ λ)`."""
    weight, injection = (np.asarray(a, np.float64) for a in problem.args)
    z = np.asarray(z, np.float64)
    slope = 1 - np.tanh(z @ weight + injection) ** 2
    cotangent = np.cos(z) / z.size
    eye = np.eye(weight.shape[0])
    systems = eye[None] - weight[None] * slope[:, None, :]
    adjoint = np.linalg.solve(systems, cotangent[..., None])[..., 0]
    mu = slope * adjoint
    return z.T @ mu, mu


def relative_error(grad, reference) -> float:
    leaves = [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grad)]
    num = sum(np.sum((a - b) ** 2) for a, b in zip(leaves, reference, strict=True))
    return float(np.sqrt(num / sum(np.sum(b**2) for b in reference)))


def run_problem(
    spec: ProblemSpec,
    *,
    tol: float = 1e-5,
    repeats: int = 5,
    min_time: float = 2.0,
    names: Sequence[str] | None = None,
) -> list[dict]:
    """One row per adjoint (those in `names`, default all) on one problem."""
    problem = make_tanh_problem(spec)
    fn, y0 = problem.fn, problem.y0
    solvers = {"A": eqxdeq.Anderson(tol, tol), "B": eqxdeq.Broyden(tol, tol)}

    def make(adjoint, solver):
        @eqx.filter_jit
        def forward(params):
            sol = optx.fixed_point(
                fn, solver, y0, params, adjoint=adjoint, max_steps=5000
            )
            return sol.value, sol.stats["num_steps"]

        @eqx.filter_jit
        def forward_backward(params):
            def loss(params):
                sol = optx.fixed_point(
                    fn, solver, y0, params, adjoint=adjoint, max_steps=5000
                )
                return loss_of_fixed_point(sol.value)

            return jax.grad(loss)(params)

        return forward, forward_backward

    table = {k: v for k, v in adjoints(tol).items() if names is None or k in names}
    fns = {}
    for name, (adjoint, solver_name) in table.items():
        forward, forward_backward = make(adjoint, solvers[solver_name])
        fns[name + " fwd"] = forward
        fns[name + " fwd+bwd"] = forward_backward
    print(f"timing adjoints, {spec.name} (load {load_average()})", file=sys.stderr)
    all_times = time_interleaved_all(
        fns, problem.args, repeats=repeats, min_time=min_time
    )
    times = {k: statistics.median(v) for k, v in all_times.items()}
    rows = []
    for name in table:
        fwd, both = times[name + " fwd"], times[name + " fwd+bwd"]
        fwd_min = min(all_times[name + " fwd"])
        both_min = min(all_times[name + " fwd+bwd"])
        z, steps = fns[name + " fwd"](problem.args)
        grad = fns[name + " fwd+bwd"](problem.args)
        rows.append(
            dict(
                problem=spec.name,
                adjoint=name,
                forward_steps=int(steps),
                forward=fwd,
                forward_backward=both,
                ratio=both / fwd,
                # The fastest calls: the least disturbed by other processes.
                forward_min=fwd_min,
                forward_backward_min=both_min,
                ratio_min=both_min / fwd_min,
                backward_over_forward=(both - fwd) / fwd,
                grad_rel_error=relative_error(grad, exact_gradient(problem, z)),
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    body = [
        [
            row["adjoint"],
            str(row["forward_steps"]),
            fmt_time(row["forward"]),
            fmt_time(row["forward_backward"]),
            fmt_ratio(row["ratio"]),
            fmt_ratio(row["backward_over_forward"]),
            f"{row['grad_rel_error']:.1e}",
        ]
        for row in rows
    ]
    headers = [
        "adjoint",
        "fwd steps",
        "forward",
        "fwd+bwd",
        "fwd+bwd / fwd",
        "bwd / fwd",
        "grad rel. error",
    ]
    return markdown_table(headers, body)


def banax_pairs(tol: float, max_steps: int = 5000) -> dict:
    """name -> (eqxdeq (adjoint, solver), banax adjoint): the same forward method and
    the same absolute ℓ2 test `‖f(z) − z‖₂ ≤ tol` on both sides."""
    ours = dict(norm=optx.two_norm, termination=eqxdeq.Termination(criterion="norm"))
    theirs = dict(atol=tol, rtol=0.0, max_steps=max_steps)
    picard = eqxdeq.Picard(0.0, tol, **ours)
    broyden = eqxdeq.Broyden(0.0, tol, memory=BANAX_MEMORY, **ours)
    b_picard = banax.solver.Picard(**theirs)  # pyright: ignore
    b_broyden = banax.solver.Broyden(  # pyright: ignore
        history_size=BANAX_MEMORY, **theirs
    )
    return {
        "JFB [Picard]": (
            (eqxdeq.JFB(), picard),
            banax.adjoint.JFB(solver=b_picard),  # pyright: ignore
        ),
        f"SHINE / GDEQ [Broyden(memory={BANAX_MEMORY})]": (
            (eqxdeq.ShineAdjoint(), broyden),
            banax.adjoint.GDEQ(solver=b_broyden),  # pyright: ignore
        ),
        "implicit, fixed-point backward [Picard]": (
            (
                eqxdeq.ImplicitAdjoint(
                    eqxdeq.Richardson(0.0, tol, max_steps=max_steps, norm=optx.two_norm)
                ),
                picard,
            ),
            banax.adjoint.Implicit(  # pyright: ignore
                solver=b_picard,
                b_solver=banax.solver.Picard(**theirs),  # pyright: ignore
            ),
        ),
    }


def run_banax(
    spec: ProblemSpec, *, repeats: int = 5, min_time: float = 2.0
) -> list[dict]:
    """eqxdeq against banax, forward + backward, for each of `banax_pairs`. The ℓ2
    tolerance is 1e-5 ‖z*‖₂ (a relative residual of 1e-5)."""
    problem = make_tanh_problem(spec)
    fn, y0 = problem.fn, problem.y0
    z_star = optx.fixed_point(fn, eqxdeq.Anderson(1e-6, 1e-6), y0, problem.args).value
    tol = 1e-5 * float(jnp.linalg.norm(z_star))
    fns, forwards = {}, {}
    for name, ((adjoint, solver), b_adjoint) in banax_pairs(tol).items():

        def loss_ours(params, adjoint=adjoint, solver=solver):
            sol = optx.fixed_point(
                fn, solver, y0, params, adjoint=adjoint, max_steps=5000, throw=False
            )
            return loss_of_fixed_point(sol.value), (sol.value, sol.stats["num_steps"])

        def loss_theirs(params, b_adjoint=b_adjoint):
            sol = b_adjoint((fn, (params,)), y0)
            # (banax evaluates f once in `init` and once per step.)
            return loss_of_fixed_point(sol.value), (sol.value, sol.stats.steps + 1)

        for side, loss in (("eqxdeq", loss_ours), ("banax", loss_theirs)):
            grad = eqx.filter_jit(jax.grad(loss, has_aux=True))
            fns[(name, side)] = grad
            forwards[(name, side)] = grad(problem.args)
    print(
        f"timing eqxdeq vs banax, {spec.name} (load {load_average()})", file=sys.stderr
    )
    times = time_interleaved_all(fns, problem.args, repeats=repeats, min_time=min_time)
    rows = []
    for name in banax_pairs(tol):
        row = dict(problem=spec.name, method=name)
        for side in ("eqxdeq", "banax"):
            grad, (z, steps) = forwards[(name, side)]
            row[side] = min(times[(name, side)])
            row[side + "_steps"] = int(steps)
            row[side + "_error"] = relative_error(grad, exact_gradient(problem, z))
        row["ratio"] = row["eqxdeq"] / row["banax"]
        rows.append(row)
    return rows


def banax_table(rows: list[dict]) -> str:
    body = [
        [
            row["method"],
            str(row["eqxdeq_steps"]),
            str(row["banax_steps"]),
            fmt_time(row["eqxdeq"]),
            fmt_time(row["banax"]),
            fmt_ratio(row["ratio"]),
            f"{row['eqxdeq_error']:.1e}",
            f"{row['banax_error']:.1e}",
        ]
        for row in rows
    ]
    headers = [
        "method [forward solver]",
        "eqxdeq fwd f-evals",
        "banax fwd f-evals",
        "eqxdeq fwd+bwd",
        "banax fwd+bwd",
        "eqxdeq / banax",
        "eqxdeq grad error",
        "banax grad error",
    ]
    return markdown_table(headers, body)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    specs = QUICK_SPECS if args.quick else FULL_SPECS
    print(environment())
    print()
    rows = []
    for spec in specs:
        problem_rows = run_problem(spec, tol=args.tol, repeats=args.repeats)
        rows += problem_rows
        print(f"### {spec.name}, float32, forward tol {args.tol:g}")
        print()
        print(table(problem_rows))
        print()
    if banax is None:
        print(f"_banax is not importable here (`{BANAX_ERROR}`): no comparison._")
    else:
        for spec in specs:
            print(f"### eqxdeq against banax, {spec.name}: fwd+bwd, fastest calls")
            print()
            print(banax_table(run_banax(spec, repeats=args.repeats)))
            print()
    return rows


if __name__ == "__main__":
    main()
