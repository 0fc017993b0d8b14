"""The benchmark suite in one command: markdown tables and PNG plots for the docs.

    python -m benchmarks                      # full run into docs/_benchmarks/
    python -m benchmarks --quick --out DIR    # smoke run: tiny sizes and repeats

Runs the functions of the `bench_*.py` scripts and writes, into `--out`:

| file | what |
| --- | --- |
| `solvers.md`, `solvers.png` | forward solvers against a bare `lax.while_loop` Picard, `optx.FixedPointIteration`, jaxopt (and banax where importable) |
| `adjoints.md`, `adjoints.png` | (forward + backward) / forward time and gradient error of each adjoint |
| `memory.md` | compiled temporary memory against `max_steps`: implicit adjoints against BPTT |
| `nonconvex.md`, `nonconvex.png` | a non-contractive layer: convergence and residual against evaluations |
| `batching.md` | per-sample (`jax.vmap`) against whole-batch Anderson on inputs of varying difficulty |
| `index.md` | the list of files, the machine, the date |

Each markdown file starts with a line saying how, where and when it was generated, so
the docs pages that include it (`--8<-- "docs/_benchmarks/solvers.md"`) say so too.
The files hold no headings, so that they can be included anywhere in a page.
"""  # noqa: E501

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import sys
import time
import types
from collections.abc import Callable

import jax


if __package__:
    from . import (
        _plots,
        bench_adjoints,
        bench_batching,
        bench_memory,
        bench_nonconvex,
        bench_solvers,
    )
    from ._common import cpu_name, fmt_ratio, fmt_time, markdown_table
else:  # run as a script: benchmarks/ is on sys.path
    import _plots  # pyright: ignore[reportMissingImports]
    import bench_adjoints  # pyright: ignore[reportMissingImports]
    import bench_batching  # pyright: ignore[reportMissingImports]
    import bench_memory  # pyright: ignore[reportMissingImports]
    import bench_nonconvex  # pyright: ignore[reportMissingImports]
    import bench_solvers  # pyright: ignore[reportMissingImports]
    from _common import (  # pyright: ignore[reportMissingImports]
        cpu_name,
        fmt_ratio,
        fmt_time,
        markdown_table,
    )


DEFAULT_OUT = pathlib.Path("docs") / "_benchmarks"
_FASTEST = (
    "Time: the fastest of ≥ {k} solves, interleaved round-robin over the rows (on "
    "a shared machine the fastest is the least disturbed by other processes)."
)


@dataclasses.dataclass
class Context:
    quick: bool
    out: pathlib.Path
    provenance: str  # the first line of every markdown file

    def write(self, name: str, *parts: str) -> None:
        text = "\n\n".join([self.provenance, *parts]).rstrip() + "\n"
        (self.out / name).write_text(text, encoding="utf-8")


@dataclasses.dataclass
class Section:
    files: list[str]
    summary: str
    seconds: float = 0.0


def machine() -> str:
    """`Linux x86_64 (AMD EPYC …), 2 CPUs, jax 0.10.2 on cpu`."""
    return (
        f"{platform.system()} {platform.machine()} ({cpu_name()}), "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()}"
    )


def _label(spec) -> str:
    """`n = 256, batch 32, ‖W‖₂ = 0.99`."""
    return f"n = {spec.n}, batch {spec.batch}, ‖W‖₂ = {spec.radius:g}"


def _sci(x: float) -> str:
    """`1e-5` rather than Python's `1e-05`."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def _plot_note(drawn: bool, name: str) -> str:
    return name if drawn else f"{name} (not drawn: matplotlib is not installed)"


# ------------------------------------------------------------------------ solvers


def solvers_section(ctx: Context) -> Section:
    problems = ("64x8@0.99",) if ctx.quick else ("256x32@0.99", "2048x8@0.9")
    argv = ["--problems", *problems]
    argv += ["--repeats", "3", "--min-time", "0.3"] if ctx.quick else []
    argv += [] if ctx.quick else ["--repeats", "5", "--min-time", "2"]
    args = bench_solvers.parse_args(argv)
    rows = bench_solvers.run_benchmark(args)
    fpi = "optx.FixedPointIteration"
    tables = []
    for problem in dict.fromkeys(row.problem for row in rows):
        sub = [row for row in rows if row.problem == problem]
        by_name = {row.solver: row for row in sub}
        bare, optx_fpi = by_name[bench_solvers.BARE], by_name[fpi]
        picard = by_name[bench_solvers.PICARD]
        floor = bench_solvers.FLOORS.get(problem, -1) + 1
        body = [
            [
                row.solver,
                row.f_evals,
                f"{row.rel_residual:.1e}",
                row.result,
                fmt_time(row.time_min),
                fmt_ratio(row.time_min / bare.time_min),
                fmt_ratio(row.time_min / optx_fpi.time_min),
                fmt_ratio(row.f_evals / picard.f_evals),
                fmt_ratio(row.f_evals / floor) if floor > 0 else "—",
            ]
            for row in sub
        ]
        headers = [
            "solver",
            "f-evals",
            "rel. residual",
            "result",
            "fastest solve",
            "vs bare loop",
            "vs optx FPI",
            "f-evals vs Picard",
            "vs Krylov floor",
        ]
        label = problem.replace("×", " × ").replace(", r=", ", ‖W‖₂ = ")
        floor_note = f"Krylov floor: {floor} evaluations." if floor > 0 else ""
        tables.append(
            f"**{label}**\n\n"
            + markdown_table(headers, body, "lrrlrrrrr")
            + (f"\n\n{floor_note}" if floor_note else "")
        )
    intro = (
        "Forward solves of float32 tanh layers `z ↦ tanh(z W + x U + b)` (state "
        "`batch × n`, symmetric `W` of spectral norm ‖W‖₂, inputs small enough that "
        "the layer's Jacobian is near-critical), from `z = 0` to rtol = atol = 1e-5 "
        "(optimistix's elementwise test), each solve jit-compiled. "
        f"{_FASTEST.format(k=args.repeats)} *vs bare loop* and "
        "*vs optx FPI*: that time over the same for a hand-written `lax.while_loop` "
        f"Picard iteration and of `{fpi}` on the same problem. *rel. residual*: "
        "`‖f(z) − z‖₂ / ‖f(z)‖₂` at the returned `z`. *vs Krylov floor*: f-evals over "
        "the Krylov floor, the matrix-vector products full-memory GMRES needs on the "
        "layer linearised at its fixed point (float64) to pass the same test from "
        "`z = 0`, plus one for the evaluation at `z = 0`. The *bare lax.while_loop "
        "Anderson(m=8)* and *Broyden(m=8)* rows are eqxdeq's Anderson and Broyden "
        "arithmetic written by hand with the same test and nothing else: the cost of "
        "the algorithms themselves."
    )
    notes = "\n\n".join(f"_{note}_" for note in bench_solvers.library_notes(args))
    drawn = _plots.solvers_plot(rows, ctx.out / "solvers.png", bench_solvers.BARE)
    ctx.write("solvers.md", intro, *tables, notes)
    best = min(
        (row for row in rows if row.result == "successful"),
        key=lambda row: row.time_min / _bare_time(rows, row.problem),
    )
    return Section(
        ["solvers.md", _plot_note(drawn, "solvers.png")],
        f"forward solvers on {_plural(len(tables), 'tanh layer')}; fastest against "
        "the bare "
        f"loop: {best.solver} "
        f"({fmt_ratio(best.time_min / _bare_time(rows, best.problem))}"
        f", {best.problem})",
    )


def _bare_time(rows, problem: str) -> float:
    return next(
        r.time_min
        for r in rows
        if r.problem == problem and r.solver == bench_solvers.BARE
    )


# ----------------------------------------------------------------------- adjoints


QUICK_ADJOINTS = (
    "eqxdeq.ImplicitAdjoint() [eqxdeq.GMRES, default]",
    "eqxdeq.JFB()",
    "eqxdeq.ShineAdjoint() [Broyden]",
    "optx.RecursiveCheckpointAdjoint() [BPTT]",
)


def adjoints_section(ctx: Context) -> Section:
    tol = 1e-5
    all_names = list(bench_adjoints.adjoints(tol))
    if ctx.quick:
        spec, names, repeats, min_time = (
            bench_adjoints.QUICK_SPECS[0],
            QUICK_ADJOINTS,
            3,
            0.3,
        )
        assert set(names) <= set(all_names), "unknown adjoint names"
    else:
        spec = bench_adjoints.ProblemSpec(256, 32, 0.99)
        names = [n for n in all_names if n != bench_adjoints.DENSE_DEFAULT]
        repeats, min_time = 5, 2.0
    rows = bench_adjoints.run_problem(
        spec, tol=tol, repeats=repeats, min_time=min_time, names=names
    )
    body = [
        [
            row["adjoint"],
            fmt_ratio(row["ratio_min"]),
            f"{row['grad_rel_error']:.1e}",
            fmt_time(row["forward_min"]),
            fmt_time(row["forward_backward_min"]),
        ]
        for row in rows
    ]
    headers = ["adjoint", "fwd+bwd / fwd", "grad rel. error", "forward", "fwd+bwd"]
    intro = (
        f"`jax.grad` of `mean(sin(z*))` with respect to `W` and the input injection, "
        f"through the fixed point `z*` of the tanh layer {_label(spec)} (float32), "
        f"forward solver `eqxdeq.Anderson({_sci(tol)}, {_sci(tol)})` (or Broyden, "
        "as named: SHINE's backward reuses the forward solver's inverse-Jacobian "
        "estimate). "
        f"{_FASTEST.format(k=repeats).replace('solves', 'calls')} *fwd+bwd / fwd*: "
        "the time of forward + backward over that of the forward solve alone. "
        "*grad rel. error*: relative ℓ2 error "
        "against the exact implicit gradient at the same returned point "
        "(`(I − ∂f/∂z)⁻ᵀ` formed densely per sample and solved in float64)."
    )
    notes = []
    if bench_adjoints.DENSE_DEFAULT not in names:
        notes.append(
            "_optimistix's default `ImplicitAdjoint()` is left out: it materialises "
            f"the dense ({spec.batch * spec.n})² Jacobian of the whole state; "
            "`python benchmarks/bench_adjoints.py` times it._"
        )
    drawn = _plots.adjoints_plot(rows, ctx.out / "adjoints.png")
    ctx.write("adjoints.md", intro, markdown_table(headers, body), *notes)
    return Section(
        ["adjoints.md", _plot_note(drawn, "adjoints.png")],
        f"{len(rows)} adjoints on {_label(spec)}: cost against gradient error "
        "(plot: error vs cost)",
    )


# ------------------------------------------------------------------------- memory


def memory_section(ctx: Context) -> Section:
    if ctx.quick:
        spec, max_steps = bench_memory.QUICK_SPEC, bench_memory.QUICK_MAX_STEPS
        names = ["eqxdeq.ImplicitAdjoint()", bench_memory.BPTT]
    else:
        spec, max_steps, names = (
            bench_memory.FULL_SPEC,
            bench_memory.FULL_MAX_STEPS,
            None,
        )
    rows = bench_memory.run(spec, max_steps, names)
    state = bench_memory.fmt_bytes(spec.n * spec.batch * 4)
    intro = (
        "Temporary memory XLA allocates for `jax.grad` of `sum(z*)` with respect to "
        f"the input injection, for the tanh layer {_label(spec)} (float32; one state "
        f"is {state}) with forward solver `eqxdeq.Anderson(1e-5, 1e-5)`, by "
        "`max_steps`: `jax.jit(...).lower(...).compile().memory_analysis()"
        ".temp_size_in_bytes`. The compiled program's needs, whatever the number of "
        "steps a solve then takes."
    )
    if any(row["adjoint"] == bench_memory.FORWARD for row in rows):
        intro += f" *{bench_memory.FORWARD}*: the solve alone, for comparison."
    ctx.write("memory.md", intro, bench_memory.table(rows))
    return Section(
        ["memory.md"], f"compiled temporary bytes for max_steps {list(max_steps)}"
    )


# ---------------------------------------------------------------------- nonconvex


def nonconvex_section(ctx: Context) -> Section:
    if ctx.quick:
        opts = types.SimpleNamespace(n=64, batch=4, max_steps=200, repeats=1)
        names = bench_nonconvex.KEY_SOLVERS[:2] + (bench_nonconvex.KEY_SOLVERS[3],)
    else:
        opts = types.SimpleNamespace(n=256, batch=16, max_steps=500, repeats=3)
        names = bench_nonconvex.KEY_SOLVERS
    opts.norm, opts.input_scale, opts.rtol = 1.3, 0.1, 1e-5
    rows = bench_nonconvex.run_solvers(opts, names, history=True)
    intro = (
        f"A tanh layer that is not a contraction: `W` symmetric with ‖W‖₂ = "
        f"{opts.norm:g}, n = {opts.n}, {opts.batch} samples, input RMS "
        f"{opts.input_scale:g}, float32. Every solver runs per sample (`jax.vmap`), "
        f"to `‖f(z) − z‖₂ ≤ {_sci(opts.rtol)} ‖f(z)‖₂` per sample, at most "
        f"{opts.max_steps} steps. *converged*: samples meeting that test. "
        "*max jvps*: Jacobian-vector products (for `optx.Newton`, its dense Jacobian "
        "counted as n per step). Time: "
        + (
            "one solve"
            if opts.repeats == 1
            else f"the fastest of {opts.repeats} solves"
        )
        + " of the batch (with the residual history recorded)."
    )
    drawn = _plots.nonconvex_plot(rows, ctx.out / "nonconvex.png", opts.rtol)
    plot_note = (
        "_The plot (`nonconvex.png`) shows `‖f(z) − z‖₂` against evaluations of f "
        "for the solvers that record a residual history (all but `optx.Newton`; "
        "Fallback's is its stages' one after the other)._"
    )
    ctx.write(
        "nonconvex.md", intro, bench_nonconvex.table(rows, "key", "time_min"), plot_note
    )
    converged = [r["solver"] for r in rows if r["converged"] == r["batch"]]
    return Section(
        ["nonconvex.md", _plot_note(drawn, "nonconvex.png")],
        f"‖W‖₂ = {opts.norm:g}: every sample converged with "
        + (", ".join(converged) or "none of the solvers"),
    )


# ----------------------------------------------------------------------- batching


def batching_section(ctx: Context) -> Section:
    if ctx.quick:
        spec, names, repeats, min_time = (
            bench_batching.QUICK_SPEC,
            ["eqxdeq.Anderson(m=5)"],
            3,
            0.3,
        )
    else:
        spec, names, repeats, min_time = bench_batching.FULL_SPEC, None, 5, 2.0
    rows = bench_batching.run(spec, repeats=repeats, min_time=min_time, names=names)
    low, high = bench_batching.SCALES
    intro = (
        f"The tanh layer {_label(spec)} (float32) with each sample's input injection "
        f"rescaled to its own RMS, log-spaced from {low:g} (tanh' ≈ 1: a slow, "
        f"near-critical sample) to {high:g} (saturated: a fast one), solved to "
        "rtol = atol = 1e-5 (elementwise test) either *per sample* (`jax.vmap` of "
        "`optx.fixed_point`: each sample with its own history, test and mixing "
        "coefficients) or as *one state* of shape `(batch, n)` (one test, one set of "
        "coefficients for all samples). *steps*: per sample, max / mean. "
        "*f-evals (Σ samples)*: evaluations each sample needed, summed. *f-evals "
        "computed*: batch × the loop's iterations (the batched `while_loop` keeps "
        "evaluating f for finished samples until the slowest is done). *converged*: "
        f"samples meeting the elementwise test. {_FASTEST.format(k=repeats)}"
    )
    ctx.write("batching.md", intro, bench_batching.table(rows, "time_min"))
    anderson = {r["mode"]: r for r in rows if r["solver"] == "eqxdeq.Anderson(m=5)"}
    per, whole = anderson[bench_batching.PER_SAMPLE], anderson[bench_batching.WHOLE]
    return Section(
        ["batching.md"],
        f"Anderson per sample: steps {per['max_steps']} max / "
        f"{per['mean_steps']:.0f} mean against {whole['max_steps']} for the whole "
        "batch as one state",
    )


SECTIONS: dict[str, Callable[[Context], Section]] = {
    "solvers": solvers_section,
    "adjoints": adjoints_section,
    "memory": memory_section,
    "nonconvex": nonconvex_section,
    "batching": batching_section,
}


def software() -> list[list[str]]:
    import importlib.metadata

    rows = [["Python", platform.python_version()]]
    for name in ("jax", "jaxlib", "equinox", "optimistix", "lineax", "diffrax"):
        rows.append([name, importlib.metadata.version(name)])
    for name in ("jaxopt", "banax", "matplotlib"):
        try:
            rows.append([name, importlib.metadata.version(name)])
        except importlib.metadata.PackageNotFoundError:
            rows.append([name, "not installed"])
    if bench_solvers.banax is None and rows[-2][1] != "not installed":
        rows[-2][1] += " (not importable)"
    return rows


def write_index(
    ctx: Context, sections: dict[str, Section], total: float, date: str
) -> None:
    command = "python -m benchmarks" + (" --quick" if ctx.quick else "")
    machine_rows = [
        ["platform", platform.platform()],
        ["CPU", f"{cpu_name()}, {os.cpu_count()} CPUs"],
        ["JAX backend", f"{jax.default_backend()} ({jax.devices()[0].device_kind})"],
        *software(),
        ["date", date],
        ["run time", f"{total / 60:.1f} min ({command})"],
    ]
    files = [
        [", ".join(f"`{f}`" for f in section.files), section.summary]
        + [f"{section.seconds:.0f} s"]
        for section in sections.values()
    ]
    include = (
        "Each `.md` file is meant to be included in a docs page as a snippet, e.g. "
        '`--8<-- "docs/_benchmarks/solvers.md"`; its first line says how, where and '
        "when it was generated."
    )
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        load = "?"
    load_note = (
        f"_Timings are wall-clock times on this machine (1-minute load average "
        f"{load} at the end of the run): ratios of a few percent are within noise; "
        "evaluation counts, residuals and memory sizes are deterministic._"
    )
    ctx.write(
        "index.md",
        include,
        markdown_table(["machine and software", "this run"], machine_rows, "ll"),
        markdown_table(["files", "what", "time"], files, "llr"),
        load_note,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the eqxdeq benchmark suite and write markdown tables and "
        "PNG plots for the docs.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and repeats (a smoke run, for CI)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=DEFAULT_OUT,
        help=f"output folder (default: {DEFAULT_OUT}/)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SECTIONS),
        help="run only these sections (index.md is then not rewritten)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, Section]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    ctx = Context(
        quick=args.quick,
        out=args.out,
        provenance=f"_Generated by `{command}` on {machine()}, {date}._",
    )
    start = time.perf_counter()
    sections: dict[str, Section] = {}
    for name in args.only or SECTIONS:
        print(f"[benchmarks] {name} …", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        section = SECTIONS[name](ctx)
        section.seconds = time.perf_counter() - t0
        sections[name] = section
        print(
            f"[benchmarks] {name}: {section.seconds:.0f} s, wrote "
            + ", ".join(section.files),
            file=sys.stderr,
            flush=True,
        )
    total = time.perf_counter() - start
    if not args.only:
        write_index(ctx, sections, total, date)
    print(
        f"[benchmarks] done in {total:.0f} s; files in {args.out}/",
        file=sys.stderr,
    )
    return sections


if __name__ == "__main__":
    main()
