"""Backward-pass cost of each gradient method through a DEQ fixed point.

For each adjoint this prints, from one run: the median time of a forward solve, of a
forward + backward (`jax.grad` of a loss of the fixed point w.r.t. W and the
injection), their ratio, the backward/forward ratio, and the gradient's relative error
against optimistix's `ImplicitAdjoint` with a dense LU solve (float32 problems, the
reference in float64 is not needed: LU at these sizes is accurate to ~1e-6).

Problems: the tanh layers of `bench_solvers.py` (n = 256, batch 32, radius 0.9 and
0.99), forward solver `eqxdeq.Anderson(1e-5, 1e-5)` (and Broyden for SHINE).

    PYTHONPATH=. python benchmarks/bench_adjoints.py [--quick]
"""

from __future__ import annotations

import argparse
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from _common import (  # pyright: ignore[reportMissingImports]
    environment,
    fmt_ratio,
    fmt_time,
    load_average,
    make_tanh_problem,
    markdown_table,
    ProblemSpec,
    time_interleaved,
)

import eqxdeq


def adjoints(tol: float) -> dict[str, tuple[optx.AbstractAdjoint, str]]:
    """name -> (adjoint, forward solver name)."""
    return {
        "eqxdeq.ImplicitAdjoint() [GMRES, default]": (eqxdeq.ImplicitAdjoint(), "A"),
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
        "eqxdeq.ShineAdjoint() [Broyden]": (eqxdeq.ShineAdjoint(), "B"),
        "eqxdeq.ShineAdjoint(Richardson) [Broyden]": (
            eqxdeq.ShineAdjoint(eqxdeq.Richardson(tol, tol, max_steps=5000)),
            "B",
        ),
        "optx.ImplicitAdjoint() [default, dense]": (optx.ImplicitAdjoint(), "A"),
        "optx.ImplicitAdjoint(GMRES)": (
            optx.ImplicitAdjoint(lx.GMRES(rtol=tol, atol=tol)),
            "A",
        ),
        "optx.RecursiveCheckpointAdjoint() [BPTT]": (
            optx.RecursiveCheckpointAdjoint(),
            "A",
        ),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    specs = (
        [ProblemSpec(64, 8, 0.9)]
        if args.quick
        else [ProblemSpec(256, 32, 0.9), ProblemSpec(256, 32, 0.99)]
    )
    tol = args.tol
    solvers = {"A": eqxdeq.Anderson(tol, tol), "B": eqxdeq.Broyden(tol, tol)}
    print(environment())
    print()
    rows = []
    for spec in specs:
        problem = make_tanh_problem(spec)
        fn, y0 = problem.fn, problem.y0

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
                    return jnp.mean(jnp.sin(sol.value))

                return jax.grad(loss)(params)

            return forward, forward_backward

        table = adjoints(tol)
        reference = make(optx.ImplicitAdjoint(lx.LU()), solvers["A"])[1](problem.args)
        fns = {}
        for name, (adjoint, solver_name) in table.items():
            forward, forward_backward = make(adjoint, solvers[solver_name])
            fns[name + " fwd"] = forward
            fns[name + " fwd+bwd"] = forward_backward
        print(f"timing {spec.name} (load {load_average()})", file=sys.stderr)
        times = time_interleaved(fns, problem.args, repeats=args.repeats, min_time=2)
        body = []
        for name, (adjoint, solver_name) in table.items():
            fwd, both = times[name + " fwd"], times[name + " fwd+bwd"]
            grad = fns[name + " fwd+bwd"](problem.args)
            err = float(
                jnp.sqrt(
                    sum(
                        jnp.sum((a - b) ** 2)
                        for a, b in zip(
                            jax.tree_util.tree_leaves(grad),
                            jax.tree_util.tree_leaves(reference),
                        )
                    )
                    / sum(jnp.sum(b**2) for b in jax.tree_util.tree_leaves(reference))
                )
            )
            steps = int(fns[name + " fwd"](problem.args)[1])
            row = dict(
                problem=spec.name,
                adjoint=name,
                forward_steps=steps,
                forward=fwd,
                forward_backward=both,
                ratio=both / fwd,
                backward_over_forward=(both - fwd) / fwd,
                grad_rel_error=err,
            )
            rows.append(row)
            body.append(
                [
                    name,
                    str(steps),
                    fmt_time(fwd),
                    fmt_time(both),
                    fmt_ratio(both / fwd),
                    fmt_ratio((both - fwd) / fwd),
                    f"{err:.1e}",
                ]
            )
        print(f"### {spec.name}, float32, forward tol {tol:g}")
        print()
        print(
            markdown_table(
                [
                    "adjoint",
                    "fwd steps",
                    "forward",
                    "fwd+bwd",
                    "fwd+bwd / fwd",
                    "bwd / fwd",
                    "grad rel. error",
                ],
                body,
            )
        )
        print()
    return rows


if __name__ == "__main__":
    main()
