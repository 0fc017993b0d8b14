"""Plots of the benchmark suite (`python -m benchmarks`), one PNG per section.

matplotlib is optional (it comes with the `dev` and `examples` extras): each function
imports it itself and returns `False`, drawing nothing, when it is not installed.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np


DPI = 100


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: pathlib.Path, top: float = 1.0) -> None:
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=DPI)
    fig.clf()
    _pyplot().close(fig)


def solvers_plot(rows, path: pathlib.Path, bare: str) -> bool:
    """Two panels over the solvers (`bench_solvers.Row`s): f-evaluations, and the
    fastest solve's time relative to the bare loop's, a bar per problem."""
    plt = _pyplot()
    if plt is None:
        return False
    problems = list(dict.fromkeys(row.problem for row in rows))
    names = list(dict.fromkeys(row.solver for row in rows))
    by_key = {(row.problem, row.solver): row for row in rows}
    height = 0.8 / len(problems)
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.32 * len(names)), sharey=True)
    y = np.arange(len(names))
    for i, problem in enumerate(problems):
        base = by_key[(problem, bare)]
        evals = [
            by_key[(problem, n)].f_evals if (problem, n) in by_key else 0 for n in names
        ]
        ratio = [
            by_key[(problem, n)].time_min / base.time_min
            if (problem, n) in by_key
            else 0
            for n in names
        ]
        offset = y - 0.4 + height * (i + 0.5)
        axes[0].barh(offset, evals, height, label=problem)
        axes[1].barh(offset, ratio, height, label=problem)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("evaluations of f")
    axes[1].set_xlabel("time (fastest solve) ÷ bare lax.while_loop Picard's")
    axes[1].axvline(1.0, color="k", lw=0.8, ls="--")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=len(problems), fontsize="small"
    )
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    _save(fig, path, top=1 - 0.45 / fig.get_figheight())
    return True


def adjoints_plot(rows: list[dict], path: pathlib.Path, floor: float = 1e-8) -> bool:
    """Gradient error against cost ((forward + backward) / forward, fastest calls),
    one marker per adjoint (and problem), named in the legend; errors below `floor`
    are drawn at `floor`."""
    plt = _pyplot()
    if plt is None:
        return False
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(9, 4.8))
    problems = list(dict.fromkeys(row["problem"] for row in rows))
    markers = "oosD^v<>pPX*h"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, row in enumerate(rows):
        label = row["adjoint"]
        if len(problems) > 1:
            label += f" ({row['problem']})"
        ax.scatter(
            row["ratio_min"],
            max(row["grad_rel_error"], floor),
            marker=markers[k % len(markers)],
            color=colours[k % len(colours)],
            s=50,
            label=label,
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000]
    low, high = ax.get_xlim()
    ax.set_xticks([t for t in ticks if low <= t <= high])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g×"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("cost: time of forward + backward ÷ forward alone (fastest calls)")
    ax.set_ylabel(
        "relative error of the gradient\n(against the exact implicit gradient)"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    _save(fig, path)
    return True


def nonconvex_plot(rows: list[dict], path: pathlib.Path, rtol: float) -> bool:
    """`‖f(z) − z‖₂` against evaluations of `f` for each solver with a residual
    history: median over the samples (a finished sample keeps its last residual),
    the interquartile range shaded."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.8))
    f_norm = None
    for row in rows:
        history = row.get("history")
        if history is None or history.shape[1] == 0:
            continue
        f_norm = np.median(row["f_norm"])
        filled = _forward_fill(history)
        evals = np.arange(1, filled.shape[1] + 1)
        # ~120 points, log-spaced (the axis is logarithmic): a small file.
        keep = np.unique(np.geomspace(1, len(evals), 120).astype(int)) - 1
        filled, evals = filled[:, keep], evals[keep]
        low, median, high = np.nanpercentile(filled, [25, 50, 75], axis=0)
        (line,) = ax.plot(evals, median, label=row["solver"])
        ax.fill_between(evals, low, high, color=line.get_color(), alpha=0.15, lw=0)
    if f_norm is not None:
        ax.axhline(rtol * f_norm, color="k", lw=0.8, ls="--", label="target (median)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("evaluations of f (Newton–Krylov's JVPs not counted)")
    ax.set_ylabel("‖f(z) − z‖₂: median over samples\n(interquartile range shaded)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, path)
    return True


def _forward_fill(history: np.ndarray) -> np.ndarray:
    """Replace each row's trailing NaNs (after the sample stopped) by its last value."""
    out = history.copy()
    for row in out:
        finite = np.flatnonzero(np.isfinite(row))
        if finite.size:
            row[finite[-1] + 1 :] = row[finite[-1]]
    return out
