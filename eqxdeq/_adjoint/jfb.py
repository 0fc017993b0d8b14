from collections.abc import Callable
from typing import Any

import equinox as eqx
import optimistix as optx

from .._linear_solver import Neumann
from ._backward import BackwardStats, check_callback, check_probe, Report
from ._core import implicit_apply, require_fixed_point_rewrite


class JFB(optx.AbstractAdjoint):
    r"""Jacobian-free backpropagation: replace $(I - \partial_y f)^{-1}$ by the
    identity.

    The gradient is that of one application of $f$ at the fixed point,
    $(\partial_\theta f)^\top \bar y$: one vector-Jacobian product, no linear solve,
    and no evaluation of $f$ beyond those of the forward solve (the VJP linearises
    $f$ at $y^\star$). It is a descent direction for the training loss when $f$ is
    sufficiently contractive, and is the `k = 0` member of
    [`eqxdeq.PhantomAdjoint`][].

    There is no solve to fail: only a non-finite cotangent (a bug downstream of the
    DEQ) raises, with `RESULTS.backward_nonfinite_cotangent`. With a `probe` or a
    `callback`, the reported residual $\|(I - \partial_y f)^\top \bar y - \bar y\|_2
    = \|\partial_y f^\top \bar y\|_2$ says how far the identity is from the inverse
    (it costs one more vector-Jacobian product, only when reporting).

    ??? cite "References"

        ```bibtex
        @inproceedings{fung2022jfb,
            author = {Fung, Samy Wu and Heaton, Howard and Li, Qiuwei and
                      McKenzie, Daniel and Osher, Stanley and Yin, Wotao},
            title = {{JFB}: Jacobian-Free Backpropagation for Implicit Networks},
            booktitle = {AAAI Conference on Artificial Intelligence},
            year = {2022},
        }
        ```
    """

    callback: Callable[[BackwardStats], Any] | None = eqx.field(
        default=None, static=True, kw_only=True
    )
    probe: BackwardStats | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        check_callback(self.callback, "JFB")
        check_probe(self.probe, "JFB")

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        require_fixed_point_rewrite(rewrite_fn, "eqxdeq.JFB")
        report = Report("eqxdeq.JFB()", "raise", self.callback, self.probe)
        return implicit_apply(
            primal_fn, inputs, tags, Neumann(steps=0), precondition=False, report=report
        )


JFB.__init__.__doc__ = """**Arguments:**

- `callback`: `None` (default), or a function called on the host with the
    [`eqxdeq.BackwardStats`][] of every backward pass. Keyword only.
- `probe`: `None` (default), or a zero [`eqxdeq.BackwardStats`][] whose gradient
    becomes the statistics. Keyword only.
"""
