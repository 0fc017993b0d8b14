from typing import Literal

import equinox as eqx
import jax.tree_util as jtu
import optimistix as optx

from .._linear_solver import Neumann
from .._misc import is_python_number
from ._core import (
    implicit_apply,
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

    def __check_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError("`PhantomAdjoint(steps=...)` must be a non-negative int.")
        if is_python_number(self.damping) and not 0 < self.damping <= 1:
            raise ValueError("`PhantomAdjoint(damping=...)` must be in (0, 1].")
        if self.mode not in ("neumann", "unroll"):
            raise ValueError(
                "`PhantomAdjoint(mode=...)` must be 'neumann' or 'unroll', got "
                f"{self.mode!r}."
            )
        if self.mode == "unroll" and self.steps < 1:
            raise ValueError("`PhantomAdjoint(steps=...)` must be >= 1 to unroll.")

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        require_fixed_point_rewrite(rewrite_fn, "eqxdeq.PhantomAdjoint")
        if self.mode == "neumann":
            solver = Neumann(steps=self.steps, damping=self.damping)
            return implicit_apply(primal_fn, inputs, tags, solver, precondition=False)
        root, residual = primal_fn(lax_while(stop_gradient_inputs(inputs)))
        fn, _, args = split_inputs(inputs)
        tau = self.damping
        y = root
        for _ in range(self.steps):
            f_val, _ = fn(y, args)
            y = jtu.tree_map(
                lambda a, b: (1 - tau) * a + tau * b if tau != 1 else b, y, f_val
            )
        return y, residual


PhantomAdjoint.__init__.__doc__ = r"""**Arguments:**

- `steps`: the number $k$ of Neumann terms (`mode="neumann"`, $k \ge 0$) or of
    unrolled damped steps (`mode="unroll"`). Default 5.
- `damping`: the damping $\tau \in (0, 1]$. Default 1.
- `mode`: `"neumann"` (the default) or `"unroll"`; see above.
"""
