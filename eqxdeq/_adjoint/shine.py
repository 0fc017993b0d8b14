from collections.abc import Callable
from typing import Any

import equinox as eqx
import lineax as lx
import optimistix as optx

from .._linear_solver import Neumann
from .._validation import check_linear_solver
from ._backward import (
    BackwardStats,
    check_callback,
    check_on_failure,
    check_probe,
    describe_solver,
    Report,
)
from ._core import (
    has_inverse_jacobian,
    implicit_apply,
    require_fixed_point_rewrite,
    split_inputs,
)


class ShineAdjoint(optx.AbstractAdjoint):
    r"""Gradients that reuse the forward solver's inverse-Jacobian estimate (SHINE).

    Quasi-Newton solvers end with an estimate $H \approx (\partial_y f - I)^{-1}$:
    [`eqxdeq.Broyden`][] its low-rank factors, [`eqxdeq.Anderson`][] the multisecant
    matrix its history implies. Writing $P = -H \approx (I - \partial_y f)^{-1}$, the
    fixed point also solves the *preconditioned* equation $P\,(y - f(y)) = 0$, whose
    Jacobian $P\,(I - \partial_y f)$ is close to the identity. The backward pass
    solves that system with `linear_solver`:

    - `linear_solver=eqxdeq.Neumann(0)` (the default, "SHINE" / GDEQ): the identity in
        place of that Jacobian, so the gradient is $P$ applied once
        (a preconditioned [`eqxdeq.JFB`][]); cheap, biased by how far $P$ is from
        the true inverse.
    - an iterative solver, e.g. `eqxdeq.Richardson(rtol, atol)` ("refine"):
        preconditioned iterations converging to the exact implicit gradient, in
        fewer steps than without the preconditioner.

    !!! warning "How good is the estimate?"

        A quasi-Newton estimate is accurate on the directions the forward solve
        explored, not necessarily on the direction of the incoming gradient. In
        eqxdeq's tests Anderson's multisecant estimate consistently beats the identity
        (JFB), and Broyden's does on nonlinear layers, but on nearly linear layers
        of a few dozen dimensions Broyden's can be *worse* than JFB. The estimate
        differs from the identity only on the span of the last `memory` steps: a
        batch solved as one state shares those few directions between all its
        samples, while solved per sample (`jax.vmap`, as `eqxdeq.nn.DEQ` does) each
        sample has its own. Refining with an iterative `linear_solver` removes the
        bias either way (see the gradient guide for what it costs).

    With a solver that keeps no estimate (e.g. [`eqxdeq.Picard`][] or
    `optimistix.FixedPointIteration`) $P = I$ and this is exactly [`eqxdeq.JFB`][]
    (default) or [`eqxdeq.ImplicitAdjoint`][] with the same linear solver.

    ??? cite "References"

        ```bibtex
        @inproceedings{ramzi2022shine,
            author = {Ramzi, Zaccharie and Mannel, Florian and Bai, Shaojie and
                      Starck, Jean-Luc and Ciuciu, Philippe and Moreau, Thomas},
            title = {{SHINE}: SHaring the INverse Estimate from the forward pass for
                     bi-level optimization and implicit models},
            booktitle = {International Conference on Learning Representations},
            year = {2022},
        }

        @article{geng2023gdeq,
            author = {Geng, Zhengyang and Kolter, J. Zico},
            title = {TorchDEQ: A Library for Deep Equilibrium Models},
            journal = {arXiv:2310.18605},
            year = {2023},
        }
        ```
    """

    linear_solver: lx.AbstractLinearSolver = Neumann(steps=0)
    # Annotated `str` (not a `Literal`) so that `__check_init__` can
    # reject other values with a helpful message.
    on_failure: str = eqx.field(default="raise", static=True, kw_only=True)
    callback: Callable[[BackwardStats], Any] | None = eqx.field(
        default=None, static=True, kw_only=True
    )
    probe: BackwardStats | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        check_linear_solver(
            "ShineAdjoint", "linear_solver", self.linear_solver, allow_none=False
        )
        check_on_failure(self.on_failure, "ShineAdjoint")
        check_callback(self.callback, "ShineAdjoint")
        check_probe(self.probe, "ShineAdjoint")

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        require_fixed_point_rewrite(rewrite_fn, "eqxdeq.ShineAdjoint")
        _, solver, _ = split_inputs(inputs)
        description = f"eqxdeq.ShineAdjoint({describe_solver(self.linear_solver)})"
        report = Report(description, self.on_failure, self.callback, self.probe)
        return implicit_apply(
            primal_fn,
            inputs,
            tags,
            self.linear_solver,
            precondition=has_inverse_jacobian(solver),
            report=report,
        )


ShineAdjoint.__init__.__doc__ = """**Arguments:**

- `linear_solver`: the lineax solver for the preconditioned system; `Neumann(0)`
    (default) applies the estimate once, an iterative solver refines it to the exact
    gradient.
- `on_failure`: what a failed backward solve does (only an iterative
    `linear_solver` can fail): `"raise"` (default), `"nan"` (NaN gradients; reverse
    mode only) or `"jfb"` (the unrefined SHINE gradient: the estimate applied
    once; JFB after a solver without an estimate). Keyword only.
- `callback`, `probe`: report the backward solves, as for
    [`eqxdeq.ImplicitAdjoint`][]. The statistics are those of the preconditioned
    system. Keyword only.
"""
