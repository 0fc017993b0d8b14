"""Memory of the backward pass against `max_steps`: implicit adjoints against BPTT.

For a tanh DEQ layer (default n = 256, batch 32, float32, ‖W‖₂ = 0.9) and forward
solver `eqxdeq.Anderson(1e-5, 1e-5)`, compiles `jax.grad` of `sum(z*)` for each
adjoint and each `max_steps` and reads the temporary buffer size XLA reserves,
`compiled.memory_analysis().temp_size_in_bytes` (as `tests/test_adjoint.py` does).
Nothing is run: these are the compiled program's needs, independent of how many steps
a solve then takes. Implicit adjoints keep no trajectory, so their memory does not
depend on `max_steps`; backpropagating through the loop
(`optx.RecursiveCheckpointAdjoint`, checkpointed BPTT) grows with it.

    PYTHONPATH=. python benchmarks/bench_memory.py [--quick] [--max-steps 16 256 ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optimistix as optx


if __package__:  # imported as `benchmarks.bench_memory` (`python -m benchmarks`)
    from ._common import environment, make_tanh_problem, markdown_table, ProblemSpec
else:  # run as a script: benchmarks/ is on sys.path
    from _common import (  # pyright: ignore[reportMissingImports]
        environment,
        make_tanh_problem,
        markdown_table,
        ProblemSpec,
    )

import eqxdeq


FULL_MAX_STEPS = (16, 64, 256, 1024, 4096)
QUICK_MAX_STEPS = (16, 64)
FULL_SPEC = ProblemSpec(256, 32, 0.9)
QUICK_SPEC = ProblemSpec(64, 8, 0.9)
FORWARD = "forward only (no gradient)"
BPTT = "optx.RecursiveCheckpointAdjoint() [BPTT]"


def adjoints() -> dict[str, optx.AbstractAdjoint | None]:
    """name -> adjoint (`None`: the forward solve alone, no gradient)."""
    return {
        FORWARD: None,
        "eqxdeq.ImplicitAdjoint()": eqxdeq.ImplicitAdjoint(),
        "eqxdeq.JFB()": eqxdeq.JFB(),
        BPTT: optx.RecursiveCheckpointAdjoint(),
    }


def temp_bytes(spec: ProblemSpec, adjoint, max_steps: int) -> int:
    """XLA's temporary buffer size for `jax.grad` of `sum(z*)` w.r.t. the injection
    (or for the forward solve alone if `adjoint is None`)."""
    problem = make_tanh_problem(spec)
    weight, injection = problem.args
    solver = eqxdeq.Anderson(1e-5, 1e-5)

    def solve(c, adjoint):
        sol = optx.fixed_point(
            problem.fn,
            solver,
            problem.y0,
            (weight, c),
            adjoint=adjoint,
            max_steps=max_steps,
            throw=False,
        )
        return jnp.sum(sol.value)

    if adjoint is None:
        fn = jax.jit(lambda c: solve(c, optx.ImplicitAdjoint()))
    else:
        fn = jax.jit(jax.grad(lambda c: solve(c, adjoint)))
    compiled = fn.lower(injection).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)  # pyright: ignore


def run(
    spec: ProblemSpec, max_steps: Sequence[int], names: Sequence[str] | None = None
) -> list[dict]:
    """One row per adjoint (those in `names`, default all) and `max_steps`."""
    rows = []
    for name, adjoint in adjoints().items():
        if names is not None and name not in names:
            continue
        for steps in max_steps:
            print(f"  compiling {name}, max_steps={steps}", file=sys.stderr)
            rows.append(
                dict(
                    adjoint=name,
                    max_steps=steps,
                    temp_bytes=temp_bytes(spec, adjoint, steps),
                )
            )
    return rows


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def table(rows: list[dict]) -> str:
    """One row per `max_steps`, one column per adjoint."""
    names = list(dict.fromkeys(row["adjoint"] for row in rows))
    steps = sorted({row["max_steps"] for row in rows})
    size = {(row["adjoint"], row["max_steps"]): row["temp_bytes"] for row in rows}
    body = [[s] + [fmt_bytes(size[name, s]) for name in names] for s in steps]
    return markdown_table(["max_steps"] + names, body)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-steps", type=int, nargs="+")
    args = parser.parse_args(argv)
    spec = QUICK_SPEC if args.quick else FULL_SPEC
    max_steps = args.max_steps or (QUICK_MAX_STEPS if args.quick else FULL_MAX_STEPS)
    rows = run(spec, max_steps)
    state = spec.n * spec.batch * 4
    print(environment())
    print(f"\n{spec.name}, float32 (one state: {fmt_bytes(state)})\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
