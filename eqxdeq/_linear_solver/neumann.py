from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, PyTree, Real

from .._misc import (
    is_python_number,
    stats_dtype,
    tree_allfinite,
    tree_scale,
    two_norm,
    ω,
)
from .._results import RESULTS


SquareState: TypeAlias = lx.AbstractLinearOperator
# Python, NumPy or JAX real scalars. Deliberately wider than the valid values (e.g.
# `steps=1.5`), so that `__check_init__` can reject those with a helpful message.
RealScalarLike: TypeAlias = (
    int | float | np.integer | np.floating | Real[Array, ""] | Real[np.ndarray, ""]
)


def _strip_weak_dtype(struct: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), struct
    )


def linearise_square(name: str, operator: lx.AbstractLinearOperator) -> SquareState:
    """The state shared by eqxdeq's linear solvers: the linearised operator, after
    checking (at trace time) that it maps a space to itself.

    Iterating $x \\mapsto x + \\tau (b - A x)$ adds an output of $A$ to an input of $A$,
    so the two structures must agree exactly (pytree, shapes and dtypes), not just in
    size.
    """
    if not isinstance(operator, lx.AbstractLinearOperator):
        raise ValueError(f"`{name}` expects a `lineax.AbstractLinearOperator`.")
    in_structure = _strip_weak_dtype(operator.in_structure())
    out_structure = _strip_weak_dtype(operator.out_structure())
    if eqx.tree_equal(in_structure, out_structure) is not True:
        raise ValueError(
            f"`{name}` may only be used for square linear operators, whose input and "
            "output have the same pytree structure, shapes and dtypes. Got input "
            f"structure {in_structure} and output structure {out_structure}. For a "
            "non-square or structure-changing operator use e.g. "
            "`lineax.AutoLinearSolver(well_posed=False)` or `lineax.Normal(...)`."
        )
    return lx.linearise(operator)


def nonfinite_result(vector: PyTree[Array]) -> lx.RESULTS:
    """The failure reported when an iterate is non-finite: `nonfinite_input` when the
    right-hand side already was, else `breakdown` (the iteration diverged)."""
    return lx.RESULTS.where(
        tree_allfinite(vector), lx.RESULTS.breakdown, lx.RESULTS.nonfinite_input
    )


def precise_result(result: lx.RESULTS, diverged: Bool[ArrayLike, ""]) -> RESULTS:
    """The precise outcome of a solve, as an `eqxdeq.RESULTS` (for `stats["result"]`):
    `result`, except that a divergence (`breakdown` from non-finite iterates, or
    `diverged`) is `RESULTS.linear_solve_diverged`. A non-finite right-hand side
    stays `nonfinite_input`."""
    result = RESULTS.promote(result)
    diverged = jnp.asarray(diverged) | (result == RESULTS.breakdown)
    return RESULTS.where(
        diverged & (result != RESULTS.nonfinite_input),
        RESULTS.linear_solve_diverged,
        result,
    )


def is_integer(x) -> bool:
    """A Python/NumPy integer, or a scalar integer (possibly traced) JAX array."""
    if isinstance(x, bool | np.bool_):
        return False
    if isinstance(x, int | np.integer):
        return True
    return (
        hasattr(x, "dtype")
        and jnp.issubdtype(x.dtype, jnp.integer)
        and getattr(x, "shape", None) == ()
    )


def check_max_steps(owner: str, max_steps) -> None:
    """`max_steps` must be None or a positive integer (or an integer array)."""
    if max_steps is not None and (
        not is_integer(max_steps) or (is_python_number(max_steps) and max_steps < 1)
    ):
        raise ValueError(
            f"`{owner}(max_steps=...)` must be a positive integer or None, got "
            f"{max_steps!r}."
        )


def _structure(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


def initial_guess(
    owner: str, options: dict[str, Any], vector: PyTree[Array]
) -> PyTree[Array] | None:
    """`options["y0"]` (None if not given), checked to have the structure, shapes and
    dtypes of the right-hand side."""
    y0 = options.get("y0", None)
    same = y0 is None or eqx.tree_equal(_structure(y0), _structure(vector)) is True
    if not same:
        raise ValueError(
            f"`options['y0']` of `{owner}` must have the same structure, shapes and "
            "dtypes as the right-hand side `vector`."
        )
    return y0


class AbstractSquareSolver(lx.AbstractLinearSolver[SquareState]):
    """What eqxdeq's linear solvers share: the state is the linearised square
    operator (`linearise_square`), `transpose` and `conj` transform it (and drop the
    options, as lineax's own iterative solvers drop `y0`), and it is full rank."""

    def init(
        self, operator: lx.AbstractLinearOperator, options: dict[str, Any]
    ) -> SquareState:
        del options
        return linearise_square(type(self).__name__, operator)

    def transpose(
        self, state: SquareState, options: dict[str, Any]
    ) -> tuple[SquareState, dict[str, Any]]:
        del options
        return state.transpose(), {}

    def conj(
        self, state: SquareState, options: dict[str, Any]
    ) -> tuple[SquareState, dict[str, Any]]:
        del options
        return lx.conj(state), {}

    def assume_full_rank(self) -> bool:
        return True


class Neumann(AbstractSquareSolver):
    r"""Truncated, optionally damped, Neumann series for a square system $A x = b$.

    With damping $\tau$ and $M = I - \tau A$, `Neumann(steps=k, damping=τ)` returns

    $$x_k = \tau \sum_{i=0}^{k} M^i b,$$

    that is $k + 1$ terms of the series $A^{-1} = \tau \sum_{i \ge 0} (I - \tau A)^i$.
    Equivalently $x_k$ is $k$ steps of damped Richardson iteration
    $x_{j+1} = x_j + \tau (b - A x_j)$ started from $x_0 = \tau b$ (see
    [`eqxdeq.Richardson`][]). Each step costs one matrix-vector product with $A$.

    - `steps=0` gives $x = \tau b$: with $\tau = 1$ exactly $b$, i.e. $A^{-1}$ is
        replaced by the identity.
    - If the spectral radius $\rho$ of $M$ is below 1 then $x_k \to A^{-1} b$, with
        error $\|x_k - A^{-1} b\| = \|M^{k+1} A^{-1} b\| = O(\rho^{k+1})$.

    In a DEQ, $A = I - \partial_y f$ (and $A^\top$ in the backward pass). With
    $\tau = 1$, $M = \partial_y f$ and $x_k = \sum_{i=0}^{k} (\partial_y f)^i b$:
    `Neumann(0)` gives Jacobian-free backpropagation (JFB), and `Neumann(k)` the
    $(k + 1)$-term Neumann-series ("phantom") gradients of Geng et al., whose
    damping factor $\lambda$ is our $\tau$: then
    $M = (1 - \tau) I + \tau\, \partial_y f$.

    This is an approximation by design: there is no convergence test, so the solve
    reports `lineax.RESULTS.successful` (the $k$ terms asked for were computed)
    whatever the error. It is never silently divergent, though:

    - `stats["result"]`, an [`eqxdeq.RESULTS`][], is `RESULTS.linear_solve_diverged`
        when the terms grew over the series, $\|M^k \tau b\|_2 > \|\tau b\|_2$
        (for a normal $M$ with $\rho < 1$ the term norms never grow, so this flags
        $\rho \ge 1$; a strongly non-normal $M$ can also grow transiently in the
        first few terms, and is flagged too: its truncated series is then no
        approximation yet). Else it is `lineax`'s result.
    - A non-finite result (a series that overflowed) is reported as
        `lineax.RESULTS.breakdown`, or as `lineax.RESULTS.nonfinite_input` when $b$
        is already non-finite.

    Used as the backward solver of an eqxdeq adjoint (e.g.
    `eqxdeq.ImplicitAdjoint(eqxdeq.Neumann(k))`, [`eqxdeq.PhantomAdjoint`][]), a
    diverged series is a failed backward solve, handled by the adjoint's
    `on_failure` (by default it raises).

    The operator must be square with the same input and output pytree structure
    (checked at trace time). It may be any [`lineax.AbstractLinearOperator`][], e.g.
    a matrix-free `lineax.JacobianLinearOperator`; it is linearised once in `init`.
    No `options` are used. `stats["num_steps"]` is `steps`; `stats["result"]` is
    described above.

    `transpose` and `conj` are supported, so this solver can be differentiated
    through `lineax.linear_solve` in forward and reverse mode. Note that lineax
    differentiates a linear solve as if it were exact: the reverse-mode cotangent
    with respect to $b$ is the same truncated series for $A^\top$.

    ??? cite "References"

        ```bibtex
        @inproceedings{geng2021training,
            author = {Geng, Zhengyang and Zhang, Xin-Yu and Bai, Shaojie and
                      Wang, Yisen and Lin, Zhouchen},
            title = {On Training Implicit Models},
            booktitle = {Advances in Neural Information Processing Systems},
            year = {2021},
        }

        @inproceedings{fung2022jfb,
            author = {Fung, Samy Wu and Heaton, Howard and Li, Qiuwei and
                      McKenzie, Daniel and Osher, Stanley and Yin, Wotao},
            title = {{JFB}: Jacobian-Free Backpropagation for Implicit Networks},
            booktitle = {Proceedings of the AAAI Conference on Artificial
                         Intelligence},
            year = {2022},
        }

        @inproceedings{liao2018reviving,
            author = {Liao, Renjie and Xiong, Yuwen and Fetaya, Ethan and
                      Zhang, Lisa and Yoon, KiJung and Pitkow, Xaq and
                      Urtasun, Raquel and Zemel, Richard},
            title = {Reviving and Improving Recurrent Back-Propagation},
            booktitle = {International Conference on Machine Learning},
            year = {2018},
        }
        ```
    """

    steps: RealScalarLike
    damping: RealScalarLike = 1.0

    def __check_init__(self):
        if not is_integer(self.steps) or (
            is_python_number(self.steps) and self.steps < 0
        ):
            raise ValueError(
                "`Neumann(steps=...)` must be a non-negative integer, got "
                f"{self.steps!r}."
            )
        if is_python_number(self.damping) and not 0 < self.damping < 2:
            raise ValueError(
                f"`Neumann(damping=...)` must be in (0, 2), got {self.damping!r}."
            )

    def compute(
        self, state: SquareState, vector: PyTree[Array], options: dict[str, Any]
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        del options
        operator = state
        tau = jnp.asarray(self.damping)
        dtype = stats_dtype(vector)
        # term_0 = τ b,  term_{i+1} = M term_i = term_i - τ A term_i,  x = Σ term_i.
        term = tree_scale(tau, vector)

        def body_fun(_, carry):
            term, total = carry
            term = (term**ω - tree_scale(tau, operator.mv(term)) ** ω).ω
            return term, (total**ω + term**ω).ω

        last, solution = lax.fori_loop(0, self.steps, body_fun, (term, term))
        result = lx.RESULTS.where(
            tree_allfinite(solution), lx.RESULTS.successful, nonfinite_result(vector)
        )
        # The series diverges if its terms grow: ‖M^k τb‖ > ‖τb‖. (For a normal M
        # with spectral radius below 1 the term norms never grow.) Reported in
        # `stats["result"]` only: the k terms asked for were computed.
        diverged = two_norm(last, dtype) > two_norm(term, dtype)
        stats = {
            "num_steps": jnp.asarray(self.steps),
            "result": precise_result(result, diverged),
        }
        return solution, result, stats


Neumann.__init__.__doc__ = r"""**Arguments:**

- `steps`: the number $k \ge 0$ of terms after the first, each costing one
    matrix-vector product. A Python integer, or a scalar integer JAX array (then
    changing it does not recompile, e.g. for a curriculum over the number of terms).
- `damping`: $\tau \in (0, 2)$, the step size of the underlying Richardson
    iteration; $M = I - \tau A$. Default 1.
"""
