import optimistix as optx

from .._linear_solver import Neumann
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

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        require_fixed_point_rewrite(rewrite_fn, "eqxdeq.JFB")
        return implicit_apply(
            primal_fn, inputs, tags, Neumann(steps=0), precondition=False
        )
