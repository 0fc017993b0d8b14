"""Shared helpers for the eqxdeq benchmarks: timing, problem builders, formatting.

Used by `bench_solvers.py` (forward solves) and meant to be reused by the adjoint
benchmark, so everything here is independent of any particular solver.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------- timing


def block(tree: Any) -> Any:
    """`jax.block_until_ready` on every array leaf of `tree` (non-arrays pass)."""
    return jax.block_until_ready(tree)


def time_fn_all(
    fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1
) -> list[float]:
    """Wall times (seconds) of `repeats` calls `fn(*args)`, each waited on with
    `block_until_ready`. The first `warmup` calls (compilation included) are run and
    discarded."""
    if repeats < 1:
        raise ValueError("`repeats` must be >= 1.")
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def time_fn(
    fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1
) -> float:
    """Median wall time (seconds) of `fn(*args)` over `repeats` calls, after `warmup`
    discarded calls (which include the compilation of a jitted `fn`)."""
    return statistics.median(time_fn_all(fn, *args, repeats=repeats, warmup=warmup))


# ------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """A tanh DEQ layer `z ↦ tanh(z W + x U + b)`: hidden size `n`, `batch` rows,
    `radius` the spectral norm of the symmetric `W`."""

    n: int
    batch: int
    radius: float

    @property
    def name(self) -> str:
        return f"n={self.n}, batch={self.batch}, ‖W‖₂={self.radius:g}"

    @classmethod
    def parse(cls, text: str) -> ProblemSpec:
        """`"256x32@0.99"` → `ProblemSpec(n=256, batch=32, radius=0.99)`."""
        try:
            size, radius = text.split("@")
            n, batch = size.lower().split("x")
            return cls(int(n), int(batch), float(radius))
        except ValueError as e:
            raise ValueError(
                f"Problem spec {text!r} must look like 'NxBATCH@RADIUS', e.g. "
                "'256x32@0.99'."
            ) from e


@dataclasses.dataclass
class Problem:
    spec: ProblemSpec
    fn: Callable  # fn(z, args) -> f(z), the optimistix convention
    args: Any
    y0: jax.Array

    @property
    def name(self) -> str:
        return self.spec.name


def tanh_layer(z: jax.Array, args: tuple[jax.Array, jax.Array]) -> jax.Array:
    """`f(z) = tanh(z W + c)` with the input injection `c = x U + b` precomputed
    (as a DEQ layer does: the injection does not depend on `z`)."""
    weight, injection = args
    return jnp.tanh(z @ weight + injection)


def make_tanh_problem(
    spec: ProblemSpec,
    *,
    seed: int = 0,
    n_in: int = 64,
    input_scale: float = 0.1,
    dtype: Any = jnp.float32,
) -> Problem:
    """A near-critical tanh DEQ layer, float32 by default.

    - `W` is a symmetrised Gaussian matrix, rescaled so that its spectral norm
      (= largest |eigenvalue|, computed in float64) is `spec.radius`;
    - `x U + b` (x: `batch × n_in`, U: `n_in × n`, b: `n`) is rescaled to RMS
      `input_scale` (~0.1), so that `tanh' ≈ 1` near the fixed point and the
      Jacobian `diag(tanh') Wᵀ` of the layer has spectral radius close to `radius`;
    - `y0 = 0`.
    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((spec.n, spec.n))
    w = 0.5 * (a + a.T)
    w *= spec.radius / np.max(np.abs(np.linalg.eigvalsh(w)))
    x = rng.standard_normal((spec.batch, n_in))
    u = rng.standard_normal((n_in, spec.n)) / np.sqrt(n_in)
    b = rng.standard_normal(spec.n)
    injection = x @ u + b
    injection *= input_scale / np.sqrt(np.mean(injection**2))
    args = (jnp.asarray(w, dtype), jnp.asarray(injection, dtype))
    y0 = jnp.zeros((spec.batch, spec.n), dtype)
    return Problem(spec, tanh_layer, args, y0)


def relative_residual(problem: Problem, z: jax.Array) -> float:
    """`‖f(z) − z‖₂ / ‖f(z)‖₂` at the returned `z`, identically for every solver
    (`f` in the problem's dtype, the difference and norms in float64 on the host)."""
    fz = np.asarray(problem.fn(z, problem.args), np.float64)
    z64 = np.asarray(z, np.float64)
    return float(np.linalg.norm(fz - z64) / np.linalg.norm(fz))


def elementwise_error(
    problem: Problem, z: jax.Array, rtol: float, atol: float
) -> float:
    """optimistix's elementwise test at `z`: `max|f(z) − z| / (atol + rtol |f(z)|)`
    (converged when < 1)."""
    fz = np.asarray(problem.fn(z, problem.args), np.float64)
    z64 = np.asarray(z, np.float64)
    return float(np.max(np.abs(fz - z64) / (atol + rtol * np.abs(fz))))


# ----------------------------------------------------------------------- reporting


def load_average() -> str:
    """The 1-minute load average, or '?' where the OS does not report it."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "?"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def environment() -> str:
    """One line describing the machine and the software versions."""
    import equinox
    import optimistix

    device = jax.devices()[0]
    cpu = cpu_name()
    parts = [
        f"{device.platform.upper()} ({device.device_kind})",
        f"{os.cpu_count()} cores: {cpu}",
        f"Python {platform.python_version()}",
        f"jax {jax.__version__}",
        f"equinox {equinox.__version__}",
        f"optimistix {optimistix.__version__}",
    ]
    try:
        import importlib.metadata

        parts.append(f"jaxopt {importlib.metadata.version('jaxopt')}")
    except Exception:  # noqa: BLE001
        pass
    return ", ".join(parts)


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None
) -> str:
    """A GitHub markdown table. `align`: one of `l`/`r` per column (default: first
    column left, the rest right)."""
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row):
        out = []
        for cell, width, a in zip(row, widths, align, strict=True):
            out.append(cell.ljust(width) if a == "l" else cell.rjust(width))
        return "| " + " | ".join(out) + " |"

    rule = []
    for width, a in zip(widths, align, strict=True):
        rule.append("-" * (width - 1) + ":" if a == "r" else "-" * width)
    lines = [fmt(cells[0]), "| " + " | ".join(rule) + " |"]
    lines += [fmt(row) for row in cells[1:]]
    return "\n".join(lines)


def fmt_time(seconds: float) -> str:
    """`1.23 ms`, `45.6 µs`, `2.10 s`."""
    if seconds != seconds:  # NaN
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_ratio(x: float) -> str:
    return "—" if x != x else f"{x:.2f}×"


def time_interleaved_all(
    fns: dict[str, Callable[..., Any]],
    *args: Any,
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    max_repeats: int = 200,
) -> dict[str, list[float]]:
    """Wall times (seconds) of calls of each `fns[name](*args)`, taken round-robin (one
    call of each function per round) so that drifts of the machine (thermal, other
    processes) affect every function alike. At least `repeats` rounds, and more (up to
    `max_repeats`) until the rounds have taken `min_time` seconds in all: cheap
    functions then get many samples, which steadies their median. `warmup` discarded
    calls of each function first (compilation included)."""
    for fn in fns.values():
        for _ in range(warmup):
            block(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    total = 0.0
    rounds = 0
    while rounds < repeats or (total < min_time and rounds < max_repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            block(fn(*args))
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            total += elapsed
        rounds += 1
    return times


def time_interleaved(
    fns: dict[str, Callable[..., Any]],
    *args: Any,
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
) -> dict[str, float]:
    """Median of `time_interleaved_all`, per function."""
    times = time_interleaved_all(
        fns, *args, repeats=repeats, warmup=warmup, min_time=min_time
    )
    return {name: statistics.median(ts) for name, ts in times.items()}
