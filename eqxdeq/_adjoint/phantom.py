from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._linear_solver import Neumann
from .._misc import stats_dtype
from .._validation import check_int, check_real
from ._backward import (
    BackwardStats,
    check_callback,
    check_on_failure,
    check_probe,
    Report,
    unroll_tap,
)
from ._core import (
    implicit_apply,
    INPUT_Y0,
    lax_while,
    require_fixed_point_rewrite,
    split_inputs,
    stop_gradient_inputs,
)


class PhantomAdjoint(optx.AbstractAdjoint):
    r"""Phantom gradients: a cheap, damped truncation of the exact gradient.

    With damping $\tau$ and $k$ steps there are two variants:

    - `mode="neumann"`: apply $\tau\sum_{i=0}^{k}(I - \tau(I - \partial_y f))^i$
        in place of $(I - \partial_y f)^{-1}$, all Jacobians taken at $y^\star$
        (a $k$-step [`eqxdeq.Neumann`][] backward solve). The returned value is
        $y^\star$ itself.
    - `mode="unroll"` (torchdeq's `grad=k, tau=τ`): after the solve, take $k$
        damped steps $y \leftarrow (1-\tau) y + \tau f(y)$ from $y^\star$ with
        derivatives flowing through them, and return their end point. This costs $k$
        extra evaluations of $f$ in the forward pass, and is differentiable in
        forward and reverse mode.

    For $\tau = 1$, $k = 0$ (Neumann) or $k = 1$ (unroll) coincide with
    [`eqxdeq.JFB`][];
    as $k \to \infty$ both approach the exact implicit gradient, with error
    decaying like $\rho^{k}$ for $\rho$ the spectral radius of
    $I - \tau(I - \partial_y f)$.

    **Failures.** A Neumann series with $\rho \ge 1$ diverges: in
    `mode="neumann"` that is detected (the terms grew, see [`eqxdeq.Neumann`][]) and
    handled by `on_failure`, as a failed backward solve of
    [`eqxdeq.ImplicitAdjoint`][] is: by default it raises. `mode="unroll"` has no
    solve: its gradient is the exact derivative of the $k$ steps, which cannot fail
    to converge. There the cotangent that reaches $y^\star$ through the steps,
    $\bar y_0 = M^\top \cdots M^\top \bar y$, is the remainder of the series
    that the truncation drops; a `probe` reports its norm as `residual`, and
    `RESULTS.backward_diverged` when it is larger than $\|\bar y\|_2$ (the
    cotangent grew over the steps). `on_failure` and `callback` are not available
    in that mode (they would need a `custom_vjp`, which would lose `jax.jvp`).

    ??? cite "References"

        ```bibtex
        @inproceedings{geng2021training,
            author = {Geng, Zhengyang and Zhang, Xin-Yu and Bai, Shaojie and
                      Wang, Yisen and Lin, Zhouchen},
            title = {On Training Implicit Models},
            booktitle = {Advances in Neural Information Processing Systems},
            year = {2021},
        }
        ```
    """

    steps: int = 5
    damping: float = 1.0
    mode: Literal["neumann", "unroll"] = eqx.field(default="neumann", static=True)
    # Annotated `str` (not a `Literal`) so that `__check_init__` can
    # reject other values with a helpful message.
    on_failure: str = eqx.field(default="raise", static=True, kw_only=True)
    callback: Callable[[BackwardStats], Any] | None = eqx.field(
        default=None, static=True, kw_only=True
    )
    probe: BackwardStats | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        check_int("PhantomAdjoint", "steps", self.steps, minimum=0)
        check_real(
            "PhantomAdjoint",
            "damping",
            self.damping,
            lower=0,
            lower_open=True,
            upper=1,
        )
        if self.mode not in ("neumann", "unroll"):
            raise ValueError(
                "`PhantomAdjoint(mode=...)` must be 'neumann' or 'unroll', got "
                f"{self.mode!r}."
            )
        if self.mode == "unroll" and self.steps < 1:
            raise ValueError("`PhantomAdjoint(steps=...)` must be >= 1 to unroll.")
        check_on_failure(self.on_failure, "PhantomAdjoint")
        check_callback(self.callback, "PhantomAdjoint")
        check_probe(self.probe, "PhantomAdjoint")
        if self.mode == "unroll" and (
            self.on_failure != "raise" or self.callback is not None
        ):
            raise ValueError(
                "`PhantomAdjoint(on_failure=...)` and `PhantomAdjoint(callback=...)` "
                "apply to `mode='neumann'` only: `mode='unroll'` differentiates its "
                "steps exactly and has no backward solve to fail. Report its "
                "statistics with `probe=eqxdeq.BackwardStats.probe()`."
            )

    def _description(self) -> str:
        damping = "" if self.damping == 1 else f", damping={self.damping}"
        return f"eqxdeq.PhantomAdjoint(steps={self.steps}{damping})"

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        require_fixed_point_rewrite(rewrite_fn, "eqxdeq.PhantomAdjoint")
        if self.mode == "neumann":
            solver = Neumann(steps=self.steps, damping=self.damping)
            report = Report(
                self._description(), self.on_failure, self.callback, self.probe
            )
            return implicit_apply(
                primal_fn, inputs, tags, solver, precondition=False, report=report
            )
        root, residual = primal_fn(lax_while(stop_gradient_inputs(inputs)))
        fn, _, args = split_inputs(inputs)
        tau = self.damping
        y = root
        if self.probe is not None:
            dtype = stats_dtype(inputs[INPUT_Y0])
            slot = jnp.asarray(self.probe.data).astype(dtype)
            y, zero = unroll_tap(root, slot, self.steps)
        for _ in range(self.steps):
            f_val, _ = fn(y, args)
            y = jtu.tree_map(
                lambda a, b: (1 - tau) * a + tau * b if tau != 1 else b, y, f_val
            )
        if self.probe is not None:
            # `y - (+0)` is `y` bit for bit; the tap sees `ȳ` as the cotangent of
            # `zero` (see `unroll_tap`).
            y = jtu.tree_map(lambda a, z: a - z, y, zero)  # pyright: ignore
        return y, residual


PhantomAdjoint.__init__.__doc__ = r"""**Arguments:**

- `steps`: the number $k$ of Neumann terms (`mode="neumann"`, $k \ge 0$) or of
    unrolled damped steps (`mode="unroll"`). Default 5.
- `damping`: the damping $\tau \in (0, 1]$. Default 1.
- `mode`: `"neumann"` (the default) or `"unroll"`; see above.
- `on_failure`: what a diverged series does (`mode="neumann"`): `"raise"`
    (default), `"nan"` (NaN gradients; reverse mode only) or `"jfb"` (the JFB
    gradient). Keyword only.
- `callback`, `probe`: report the backward pass as for
    [`eqxdeq.ImplicitAdjoint`][] (`mode="unroll"`: `probe` only). Keyword only.
"""
