"""Property-based tests (hypothesis): every fixed-point solver and every exact adjoint
on random contractive maps over random pytrees, against dense float64 references.

The maps act on the flattened state `y` (`jax.flatten_util.ravel_pytree`) with an
input `x` of the same structure:

    u = A flat(y) + B flat(x) + b,    f(y) = tanh(u)  or  f(y) = u,

with `A` a random Gaussian matrix scaled to spectral *norm* `r` (tanh: `∂f/∂y =
diag(tanh'(u)) A` has norm at most `r`, so `f` is an `r`-contraction) or to spectral
*radius* `r` (affine: the iteration converges, but `‖A‖₂` is up to ~2-5 `r` and
`(I - A)⁻¹` can be far larger than `1 / (1 - r)`), `r ∈ [0.1, 0.95]`.

Compilation dominates the cost (0.6-5 s of CPU per solver, 1.5-3 s per gradient,
against milliseconds per solve), so the things that change the compiled program
are drawn from small fixed sets — six pytree structures, two dtypes, the solver or
adjoint — and everything else is data: the matrices, the radius, the inputs, and the
choice tanh/affine (a traced flag). Everything the tests compare against is computed in
NumPy float64 from the `dtype`-rounded parameters: the reference of a float32
example is the exact fixed point (and gradient) of the float32 problem.

Every tolerance below is a first-order error bound (stated where it is used) with
the problem's own constants (`‖(I - ∂f/∂y)⁻¹‖₂`, `‖A‖₂`, the size `n`), not a fixed
number: the affine draws include conditioning up to ~10³.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from hypothesis import given, HealthCheck, settings, strategies as st

import eqxdeq


#
# Hypothesis settings: deterministic (`derandomize`, no example database), no
# deadline (the first example of each compiled program pays for its compilation).
#


def _settings(max_examples):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=False,
    )


#
# Random problems.
#


@dataclasses.dataclass(frozen=True)
class _Leaf:
    shape: tuple[int, ...]


# The pytree structures of the state `y` (and of the input `x`): a single array, a
# tuple of 2 or 3 arrays, a dict with a nested tuple; 1-3 dimensions, 6-38 elements.
STRUCTURES = {
    "array-1d": _Leaf((7,)),
    "array-3d": _Leaf((2, 3, 2)),
    "tuple-2": (_Leaf((3,)), _Leaf((2, 4))),
    "tuple-3": (_Leaf((4,)), _Leaf((2, 2)), _Leaf((1, 3, 2))),
    "dict": {"u": _Leaf((3, 2)), "v": (_Leaf((5,)), _Leaf((2, 2, 2)))},
    "dict-38": {"u": _Leaf((4, 5)), "v": (_Leaf((6,)), _Leaf((2, 3, 2)))},
}
# The default suite draws from one structure (the most general) so that examples
# share compilations; `-m slow` draws from all of them.
DEFAULT_STRUCTURES = ("dict",)
DTYPES = {"float64": jnp.float64, "float32": jnp.float32}
EPS = {
    "float64": float(np.finfo(np.float64).eps),
    "float32": float(np.finfo(np.float32).eps),
}


def _is_leaf(x):
    return isinstance(x, _Leaf)


def _tree_from_flat(structure, flat, dtype):
    """The pytree of `structure` holding the entries of `flat`, in `dtype`."""
    leaves, treedef = jtu.tree_flatten(structure, is_leaf=_is_leaf)
    out, start = [], 0
    for leaf in leaves:
        size = math.prod(leaf.shape)
        out.append(jnp.asarray(flat[start : start + size].reshape(leaf.shape), dtype))
        start += size
    assert start == flat.size
    return jtu.tree_unflatten(treedef, out)


def _size(structure):
    return sum(math.prod(x.shape) for x in jtu.tree_leaves(structure, is_leaf=_is_leaf))


def _flat64(tree):
    """The flattened pytree as a float64 NumPy vector (leaf order as `ravel_pytree`)."""
    return np.concatenate(
        [np.asarray(x, np.float64).reshape(-1) for x in jtu.tree_leaves(tree)]
    )


@dataclasses.dataclass
class Problem:
    """A random fixed-point problem and its float64 NumPy description.

    `A, B, b, x, y0` are the `dtype`-rounded values, as float64 arrays (`x`, `y0`
    flattened); `params, x_tree, y0_tree, nonlinear` what the JAX code gets.
    """

    structure: str
    dtype_name: str
    nonlinear: bool
    radius: float
    A: np.ndarray
    B: np.ndarray
    b: np.ndarray
    x: np.ndarray
    y0: np.ndarray

    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    @property
    def eps(self):
        return EPS[self.dtype_name]

    @property
    def n(self):
        return self.b.size

    def tree(self, flat):
        return _tree_from_flat(STRUCTURES[self.structure], flat, self.dtype)

    @property
    def params(self):
        return {
            "A": jnp.asarray(self.A, self.dtype),
            "B": jnp.asarray(self.B, self.dtype),
            "b": jnp.asarray(self.b, self.dtype),
        }

    @property
    def args(self):
        return self.params, self.tree(self.x), jnp.asarray(self.nonlinear)

    # float64 NumPy versions of the map and its derivatives.

    def u(self, y):
        return self.A @ y + self.B @ self.x + self.b

    def f(self, y):
        u = self.u(y)
        return np.tanh(u) if self.nonlinear else u

    def fprime(self, y):
        """`diag(f'(u))` as a vector."""
        return 1 - np.tanh(self.u(y)) ** 2 if self.nonlinear else np.ones(self.n)

    def jac(self, y):
        return self.fprime(y)[:, None] * self.A

    def eval_rounding(self, y):
        """Elementwise bound on the rounding error of evaluating `f(y)` in `dtype`:
        the dot products of length 2n + 1 (any summation order, with or without FMA)
        `γ (|A||y| + |B||x| + |b|)`, `γ = k ε / (1 - k ε)`, plus one rounding of
        tanh."""
        k = 2 * self.n + 1
        gamma = k * self.eps / (1 - k * self.eps)
        dot = (
            np.abs(self.A) @ np.abs(y)
            + np.abs(self.B) @ np.abs(self.x)
            + np.abs(self.b)
        )
        return gamma * dot + 2 * self.eps * np.abs(self.f(y))

    def describe(self):
        kind = "tanh" if self.nonlinear else "affine"
        return (
            f"{self.structure} {self.dtype_name} {kind} r={self.radius:.3f} n={self.n}"
        )


def _reference_fixed_point(p: Problem):
    """The float64 fixed point and a bound on its error.

    Affine: `(I - A)⁻¹ (B x + b)` by a dense solve (error ~ ε₆₄ cond, negligible).
    tanh: Picard iteration from 0 for `k` steps with `r^k / (1 - r) ‖y₁ - y₀‖ <
    1e-14`, then two Newton polishing steps (quadratic convergence: the a priori
    bound of the Picard part is already far below anything we test).
    """
    if not p.nonlinear:
        y = np.linalg.solve(np.eye(p.n) - p.A, p.B @ p.x + p.b)
        return y, 0.0
    r = np.linalg.norm(p.A, 2)
    y = np.zeros(p.n)
    y1 = p.f(y)
    d0 = np.linalg.norm(y1 - y)
    steps = max(1, math.ceil(math.log(1e-14 * (1 - r) / max(d0, 1e-300)) / math.log(r)))
    y = y1
    for _ in range(steps):
        y = p.f(y)
    bound = r**steps / (1 - r) * d0
    for _ in range(2):
        y = y - np.linalg.solve(np.eye(p.n) - p.jac(y), y - p.f(y))
    # Rounding of the float64 evaluations, amplified by at most 1 / (1 - r).
    bound += np.linalg.norm(p.eval_rounding(y)) * (EPS["float64"] / p.eps) / (1 - r)
    return y, bound


def make_problem(
    structure, dtype_name, nonlinear, radius, seed, offset_scale, y0_scale
):
    n = _size(STRUCTURES[structure])
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    if nonlinear:
        a *= radius / np.linalg.norm(a, 2)
    else:
        a *= radius / np.max(np.abs(np.linalg.eigvals(a)))
    bmat = rng.standard_normal((n, n)) / math.sqrt(n)
    b = offset_scale * rng.standard_normal(n)
    x = rng.standard_normal(n)
    y0 = y0_scale * rng.standard_normal(n)
    np_dtype = np.dtype(dtype_name)
    rnd = lambda v: np.asarray(v, np_dtype).astype(np.float64)
    return Problem(
        structure,
        dtype_name,
        nonlinear,
        radius,
        rnd(a),
        rnd(bmat),
        rnd(b),
        rnd(x),
        rnd(y0),
    )


@st.composite
def problems(draw, structures=tuple(STRUCTURES), dtypes=tuple(DTYPES)):
    return make_problem(
        structure=draw(st.sampled_from(structures)),
        dtype_name=draw(st.sampled_from(dtypes)),
        nonlinear=draw(st.booleans()),
        radius=draw(st.floats(0.1, 0.95)),
        seed=draw(st.integers(0, 2**32 - 1)),
        # How far into tanh's saturation, and how far from the fixed point to start.
        offset_scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
        y0_scale=draw(st.sampled_from([0.0, 1.0])),
    )


def fuzz_map(y, args):
    """`f(y) = tanh(u)` or `u`, `u = A flat(y) + B flat(x) + b`, on the pytree `y`.

    A global function, so that every example of one structure and dtype shares one
    compilation per solver."""
    params, x, nonlinear = args
    flat_y, unravel = jfu.ravel_pytree(y)
    flat_x, _ = jfu.ravel_pytree(x)
    u = params["A"] @ flat_y + params["B"] @ flat_x + params["b"]
    return unravel(jnp.where(nonlinear, jnp.tanh(u), u))


def _norm2(v):
    return float(np.linalg.norm(v))


#
# 1. Every solver converges to the reference fixed point.
#

TOL = {"float64": 1e-10, "float32": 1e-5}
MAX_STEPS = 20_000


def _make_solvers(tol):
    return {
        "picard": eqxdeq.Picard(tol, tol),
        "anderson": eqxdeq.Anderson(tol, tol),
        "broyden": eqxdeq.Broyden(tol, tol),
        "newton_krylov": eqxdeq.NewtonKrylov(tol, tol),
        "reversible": eqxdeq.Reversible(tol, tol),
        "steady_state": eqxdeq.SteadyState(tol, tol),
        # Anderson for 10 evaluations, then Newton-Krylov from the best point:
        # the slow-contracting draws exercise the handover.
        "fallback": eqxdeq.Fallback(
            eqxdeq.Anderson(tol, tol),
            eqxdeq.NewtonKrylov(tol, tol),
            stage_steps=(10, None),
        ),
    }


# Built once, so that `eqx.filter_jit` sees the same static solver every time.
SOLVERS = {name: _make_solvers(tol) for name, tol in TOL.items()}
SOLVER_NAMES = tuple(SOLVERS["float64"])


@eqx.filter_jit
def _solve(solver, y0, args):
    sol = optx.fixed_point(fuzz_map, solver, y0, args, max_steps=MAX_STEPS, throw=False)
    return sol.value, sol.result == optx.RESULTS.successful, sol.stats["num_steps"]


def check_solver_converges(p: Problem, name: str):
    tol = TOL[p.dtype_name]
    solver = SOLVERS[p.dtype_name][name]
    value, success, num_steps = _solve(solver, p.tree(p.y0), p.args)
    info = f"{name} on {p.describe()}, {int(num_steps)} steps"
    assert bool(success), info
    assert jtu.tree_structure(value) == jtu.tree_structure(p.tree(p.y0)), info
    assert all(v.dtype == p.dtype for v in jtu.tree_leaves(value)), info
    y = _flat64(value)
    assert np.all(np.isfinite(y)), info

    # (a) The residual. The solve stops (and returns the iterate it tested) once
    # |ĝ_i| < atol + rtol |f̂_i| for every i (elementwise criterion, max norm), with
    # ĝ = f̂(y) - y computed in `dtype`; f̂ differs from the exact f(y) by at most
    # δ = `eval_rounding(y)`, and the subtraction adds ε|ĝ|. So the exact residual
    # g = f(y) - y (float64, of the rounded problem) satisfies elementwise
    #     |g| ≤ (atol + rtol (|f| + δ)) (1 + ε) + δ.
    f = p.f(y)
    g = f - y
    delta = p.eval_rounding(y)
    allowed = (tol + tol * (np.abs(f) + delta)) * (1 + p.eps) + delta
    worst = float(np.max(np.abs(g) / allowed))
    assert worst <= 1, (info, worst)

    # (b) The forward error. y - y* = -(I - J)⁻¹ g for the affine map (J = A), and
    # for the tanh map ‖y - y*‖ ≤ ‖g‖ / (1 - ‖A‖) (f is a ‖A‖-contraction). So
    # ‖y - y*‖₂ ≤ K ‖allowed‖₂ with K = ‖(I - A)⁻¹‖₂ or 1 / (1 - ‖A‖₂).
    y_star, ref_error = _reference_fixed_point(p)
    if p.nonlinear:
        k = 1 / (1 - np.linalg.norm(p.A, 2))
    else:
        k = np.linalg.norm(np.linalg.inv(np.eye(p.n) - p.A), 2)
    error = _norm2(y - y_star)
    bound = k * _norm2(allowed) + ref_error
    assert error <= bound, (info, error, bound)
    return error, bound


#
# 2. Exact adjoints against the dense implicit-function-theorem gradient.
#

# Forward solves for the gradient tests: Picard (the cheapest to compile; the
# implicit gradient does not depend on how the fixed point was found), converged
# tightly.
GRAD_TOL = {"float64": 1e-12, "float32": 1e-5}
GRAD_SOLVERS = {name: eqxdeq.Picard(tol, tol) for name, tol in GRAD_TOL.items()}
LINEAR_TOL = {"float64": 1e-12, "float32": 1e-6}


def _make_adjoints(dtype_name):
    tol = LINEAR_TOL[dtype_name]
    return {
        # GMRES with tolerances from the dtype: 1e-12 in float64, 50 ε in float32.
        "implicit-default": eqxdeq.ImplicitAdjoint(),
        "implicit-gmres": eqxdeq.ImplicitAdjoint(lx.GMRES(rtol=tol, atol=tol)),
        "implicit-lu": eqxdeq.ImplicitAdjoint(lx.LU()),
        # Converges since the spectral radius of ∂f/∂y is below 1 (r for the affine
        # map, at most ‖A‖₂ = r for tanh).
        "implicit-richardson": eqxdeq.ImplicitAdjoint(
            eqxdeq.Richardson(tol, tol, max_steps=100_000)
        ),
    }


ADJOINTS = {name: _make_adjoints(name) for name in DTYPES}
ADJOINT_NAMES = tuple(ADJOINTS["float64"])


def _linear_tolerances(p: Problem, adjoint_name: str):
    """`(rtol, atol)` of the backward linear solve, 0 for a direct one."""
    if adjoint_name == "implicit-lu":
        return 0.0, 0.0
    if adjoint_name == "implicit-default":
        tol = 1e-12 if p.dtype_name == "float64" else 50 * p.eps
        return tol, tol
    tol = LINEAR_TOL[p.dtype_name]
    return tol, tol


@eqx.filter_jit
def _fixed_point_vjp(adjoint, solver, params, x, y0, nonlinear, cotangent):
    def fixed_point(params, x, y0):
        sol = optx.fixed_point(
            fuzz_map,
            solver,
            y0,
            (params, x, nonlinear),
            adjoint=adjoint,
            max_steps=MAX_STEPS,
            throw=False,
        )
        return sol.value, sol.result == optx.RESULTS.successful

    value, vjp, success = jax.vjp(fixed_point, params, x, y0, has_aux=True)
    return value, success, vjp(cotangent)


@eqx.filter_jit
def _fixed_point_jvp(adjoint, solver, params, x, y0, nonlinear, tangents):
    def fixed_point(params, x):
        sol = optx.fixed_point(
            fuzz_map,
            solver,
            y0,
            (params, x, nonlinear),
            adjoint=adjoint,
            max_steps=MAX_STEPS,
            throw=False,
        )
        return sol.value, sol.result == optx.RESULTS.successful

    value, tangent, success = jax.jvp(fixed_point, (params, x), tangents, has_aux=True)
    return value, success, tangent


def _param_grads(p: Problem, y, v):
    """`(∂f/∂θ)ᵀ c` at `y` for `v = f'(u) ⊙ c`, as `(A, B, b, x)` float64 arrays."""
    return np.outer(v, y), np.outer(v, p.x), v, p.B.T @ v


def _concat(*arrays):
    return np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])


def _forward_checks(p: Problem, value, success, info):
    """The forward solve succeeded and is as accurate as its tolerance allows (the
    bound of `check_solver_converges`); returns the computed fixed point and the
    reference `y*`, as float64 vectors, and constants of the problem at `y*`."""
    assert bool(success), info
    y = _flat64(value)
    y_star, ref_error = _reference_fixed_point(p)
    tol = GRAD_TOL[p.dtype_name]
    f = p.f(y)
    delta = p.eval_rounding(y)
    allowed = (tol + tol * (np.abs(f) + delta)) * (1 + p.eps) + delta
    if p.nonlinear:
        k = 1 / (1 - np.linalg.norm(p.A, 2))
    else:
        k = np.linalg.norm(np.linalg.inv(np.eye(p.n) - p.A), 2)
    forward_error = _norm2(y - y_star)
    assert forward_error <= k * _norm2(allowed) + ref_error, info
    m = np.eye(p.n) - p.jac(y_star)
    kappa = np.linalg.norm(np.linalg.inv(m), 2)
    return y, y_star, m, kappa, max(forward_error, ref_error)


def _solve_error_bound(p: Problem, m, kappa, w, rhs, rtol, atol, lu):
    """First-order bound on ‖ŵ - w‖₂ for a solve of `m w = rhs` (or its transpose)
    in `dtype`: ‖m⁻¹‖₂ times the 2-norm of the residual the solver accepts
    (`atol + rtol |rhs|` elementwise for lineax's GMRES and eqxdeq's Richardson) plus
    the rounding of the operator application `w - Jᵀw` (dot products of length n,
    `γ_n (|A|ᵀ|f' ⊙ w| + |w|)`; for LU, backward error `γ_3n ‖m‖ ‖w‖`)."""
    k = (3 if lu else 1) * p.n + 2
    gamma = k * p.eps / (1 - k * p.eps)
    rounding = gamma * (np.abs(m - np.eye(p.n)).T @ np.abs(w) + np.abs(w))
    if lu:
        rounding = rounding + gamma * np.linalg.norm(m, 2) * np.abs(w)
    accepted = atol + rtol * np.abs(rhs)
    return kappa * (_norm2(accepted) + 2 * _norm2(rounding))


def _rel_error(x, ref):
    return _norm2(x - ref) / _norm2(ref)


def check_exact_adjoint_vjp(p: Problem, adjoint_name: str, seed: int):
    """vjp of `(A, B, b, x, y0) ↦ y*` against the dense IFT gradient.

    Reference: `w = (I - J)⁻ᵀ ȳ`, `v = f'(u*) ⊙ w` and `(∂f/∂θ)ᵀ w` = `(v y*ᵀ,
    v xᵀ, v, Bᵀ v)`, all at the reference `y*`; the cotangent of `y0` is exactly 0.

    Bound (first order, M = I - J, κ = ‖M⁻¹‖₂, δy = ‖ŷ - y*‖₂):
    - the linear solve: ‖δw‖ ≤ `_solve_error_bound`;
    - evaluating at ŷ instead of y* (tanh only): f' moves by at most
      ‖δf'‖ ≤ max|tanh''| ‖A‖ δy (max|tanh''| = 4/(3√3) < 0.77), so M by
      ‖δf'‖ ‖A‖, w by κ ‖δM‖ ‖w‖, and v = f' ⊙ w by ‖δf'‖ ‖w‖ + ‖δw‖;
    - the gradient is linear in v with factor ‖y‖ + ‖x‖ + 1 + ‖B‖, and has the
      further term v δyᵀ.
    Twice that (second-order terms) relative to the reference's norm.
    """
    rng = np.random.default_rng(seed)
    cot = rng.standard_normal(p.n)
    adjoint = ADJOINTS[p.dtype_name][adjoint_name]
    solver = GRAD_SOLVERS[p.dtype_name]
    params, x_tree, nonlinear = p.args
    value, success, grads = _fixed_point_vjp(
        adjoint, solver, params, x_tree, p.tree(p.y0), nonlinear, p.tree(cot)
    )
    info = f"{adjoint_name} on {p.describe()}"
    y, y_star, m, kappa, forward_error = _forward_checks(p, value, success, info)
    g_params, g_x, g_y0 = grads
    assert jtu.tree_structure(g_x) == jtu.tree_structure(x_tree), info
    for g in jtu.tree_leaves(grads):
        assert g.dtype == p.dtype, info
    assert np.all(_flat64(g_y0) == 0), info

    cot = _flat64(p.tree(cot))  # (rounded to dtype)
    w = np.linalg.solve(m.T, cot)
    fp = p.fprime(y_star)
    v = fp * w
    ref = _concat(*_param_grads(p, y_star, v))
    got = _concat(g_params["A"], g_params["B"], g_params["b"], _flat64(g_x))
    error = _rel_error(got, ref)

    rtol, atol = _linear_tolerances(p, adjoint_name)
    lu = adjoint_name == "implicit-lu"
    dw = _solve_error_bound(p, m, kappa, w, cot, rtol, atol, lu)
    norm_a = np.linalg.norm(p.A, 2)
    norm_w = _norm2(w)
    if p.nonlinear:
        dfp = 0.77 * norm_a * forward_error
        dw += kappa * dfp * norm_a * norm_w
        dv = dfp * norm_w + dw
    else:
        dv = dw
    factor = _norm2(y_star) + _norm2(p.x) + 1 + np.linalg.norm(p.B, 2)
    bound = 2 * (factor * dv + _norm2(v) * forward_error) / _norm2(ref)
    # Rounding of the result itself.
    bound += 4 * p.eps
    assert error <= bound, (info, error, bound)
    return error, bound


def check_exact_adjoint_jvp(p: Problem, seed: int):
    """jvp of `(A, B, b, x) ↦ y*` with the default `eqxdeq.ImplicitAdjoint()`:
    `(I - J)⁻¹ (f' ⊙ (δA y* + δB x + B δx + δb))`; the bound as for the vjp, for a
    solve with M instead of Mᵀ (and the right-hand side moving with ŷ)."""
    rng = np.random.default_rng(seed)
    da, db_mat, db, dx = (
        rng.standard_normal((p.n, p.n)),
        rng.standard_normal((p.n, p.n)),
        rng.standard_normal(p.n),
        rng.standard_normal(p.n),
    )
    rnd = lambda v: np.asarray(v, np.dtype(p.dtype_name)).astype(np.float64)
    da, db_mat, db, dx = map(rnd, (da, db_mat, db, dx))
    tangents = (
        {
            "A": jnp.asarray(da, p.dtype),
            "B": jnp.asarray(db_mat, p.dtype),
            "b": jnp.asarray(db, p.dtype),
        },
        p.tree(dx),
    )
    adjoint = ADJOINTS[p.dtype_name]["implicit-default"]
    solver = GRAD_SOLVERS[p.dtype_name]
    params, x_tree, nonlinear = p.args
    value, success, tangent = _fixed_point_jvp(
        adjoint, solver, params, x_tree, p.tree(p.y0), nonlinear, tangents
    )
    info = f"jvp on {p.describe()}"
    y, y_star, m, kappa, forward_error = _forward_checks(p, value, success, info)
    assert jtu.tree_structure(tangent) == jtu.tree_structure(x_tree), info
    fp = p.fprime(y_star)
    du = da @ y_star + db_mat @ p.x + p.B @ dx + db
    rhs = fp * du
    ref = np.linalg.solve(m, rhs)
    got = _flat64(tangent)
    error = _rel_error(got, ref)

    rtol, atol = _linear_tolerances(p, "implicit-default")
    # Solve with M (not Mᵀ): the same bound with |J| for |J|ᵀ.
    dz = _solve_error_bound(p, m.T, kappa, ref, rhs, rtol, atol, lu=False)
    if p.nonlinear:
        norm_a = np.linalg.norm(p.A, 2)
        dfp = 0.77 * norm_a * forward_error
        # δ(rhs) = δf' ⊙ du + f' ⊙ δA δy; δM = δf' A.
        d_rhs = dfp * _norm2(du) + np.linalg.norm(da, 2) * forward_error
        dz += kappa * (d_rhs + dfp * norm_a * _norm2(ref))
    else:
        dz += kappa * np.linalg.norm(da, 2) * forward_error
    bound = 2 * dz / _norm2(ref) + 4 * p.eps
    assert error <= bound, (info, error, bound)
    return error, bound


#
# 3. ReversibleAdjoint: the exact gradient of the Reversible solver's own iterations.
#

REVERSIBLE_MAX_STEPS = 32
CHECKPOINTS = 8
REVERSIBLE_ADJOINT = eqxdeq.ReversibleAdjoint(checkpoints=CHECKPOINTS)
# The relaxation β is a static field (one compilation each): the default 0.8, and
# 0.5 (slower, more accurate backward pass) under `-m slow`.
RELAXATIONS = (0.8, 0.5)
# rtol = atol = 0: the solve never converges and runs exactly `step_budget` steps.
REVERSIBLE_SOLVERS = {
    beta: eqxdeq.Reversible(0.0, 0.0, relaxation=beta) for beta in RELAXATIONS
}


@eqx.filter_jit
def _reversible_vjp(solver, params, x, y0, nonlinear, budget, cotangent):
    def run(params, x, y0):
        sol = optx.fixed_point(
            fuzz_map,
            solver,
            y0,
            (params, x, nonlinear),
            adjoint=REVERSIBLE_ADJOINT,
            max_steps=REVERSIBLE_MAX_STEPS,
            throw=False,
            options={"step_budget": budget},
        )
        return sol.value, sol.stats["num_steps"]

    value, vjp, num_steps = jax.vjp(run, params, x, y0, has_aux=True)
    return value, num_steps, vjp(cotangent)


def _unrolled_reversible(p: Problem, beta, num_steps, cot):
    """`y_N` of the reversible iteration from `y_0 = z_0 = y0`, and the gradient of
    `⟨ȳ, y_N⟩` with respect to `(A, B, b, x, y0)`, by hand-written
    backpropagation through the N steps in float64."""
    y = z = p.y0
    trajectory = []
    for _ in range(num_steps):
        new_y = (1 - beta) * y + beta * p.f(z)
        new_z = (1 - beta) * z + beta * p.f(new_y)
        trajectory.append((z, new_y))
        y, z = new_y, new_z
    y_bar, z_bar = cot.copy(), np.zeros(p.n)
    grads = [np.zeros((p.n, p.n)), np.zeros((p.n, p.n)), np.zeros(p.n), np.zeros(p.n)]

    def pull(point, c):
        """Add `(∂f/∂θ)ᵀ c` at `point` to `grads`; return `(∂f/∂y)ᵀ c`."""
        v = p.fprime(point) * c
        for g, d in zip(grads, _param_grads(p, point, v)):
            g += d
        return p.A.T @ v

    for z_n, y_next in reversed(trajectory):
        # z_{n+1} = (1 - β) z_n + β f(y_{n+1})
        y_bar = y_bar + pull(y_next, beta * z_bar)
        z_bar = (1 - beta) * z_bar
        # y_{n+1} = (1 - β) y_n + β f(z_n)
        z_bar = z_bar + pull(z_n, beta * y_bar)
        y_bar = (1 - beta) * y_bar
    return y, (*grads, y_bar + z_bar)


def _checkpoint_stride(num_steps, slots):
    """The spacing of `ReversibleAdjoint`'s checkpoints after `num_steps` steps:
    every step while the slots last, doubling whenever they fill."""
    stride = 1
    for step in range(1, num_steps + 1):
        if step % stride == 0 and step // stride == slots:
            stride *= 2
    return stride


def check_reversible_adjoint(p: Problem, beta: float, num_steps: int, seed: int):
    """`ReversibleAdjoint` against backpropagation through the same N steps.

    Bound: the backward pass reconstructs at most `s = stride - 1` steps between
    exact checkpoints, each multiplying the error already in the reconstructed
    iterates by at most 1/(1-β)² (the determinant of a step is (1-β)^2n, and its
    inverse expands by up to 1/(1-β)² where ∂f/∂y is near ±1). The rounding of an
    evaluation of f is `u = √(2n+1) ε` (dot products of length 2n + 1, in the
    probabilistic model of rounding: the worst-case `(2n+1) ε` is ~100x pessimistic
    here), times `1 + ‖A‖₂` through a step; the iteration contracts, so errors
    from different steps do not add up beyond a constant, taken as 10:
    `10 u (1 + ‖A‖₂) (1-β)^(-2s)`. (Measured: 1e-3 to 1e-2 of this bound.)
    """
    rng = np.random.default_rng(seed)
    cot = _flat64(p.tree(rng.standard_normal(p.n)))
    params, x_tree, nonlinear = p.args
    value, steps, grads = _reversible_vjp(
        REVERSIBLE_SOLVERS[beta],
        params,
        x_tree,
        p.tree(p.y0),
        nonlinear,
        jnp.asarray(num_steps),
        p.tree(cot),
    )
    info = f"beta={beta} N={num_steps} on {p.describe()}"
    assert int(steps) == num_steps, info
    g_params, g_x, g_y0 = grads
    for g in jtu.tree_leaves(grads):
        assert g.dtype == p.dtype, info
    y_n, ref_grads = _unrolled_reversible(p, beta, num_steps, cot)
    ref = _concat(*ref_grads)
    got = _concat(
        g_params["A"], g_params["B"], g_params["b"], _flat64(g_x), _flat64(g_y0)
    )
    u = math.sqrt(2 * p.n + 1) * p.eps
    lipschitz = 1 + np.linalg.norm(p.A, 2)
    # The forward value is y_N of the same iteration (no reconstruction).
    value_error = _rel_error(_flat64(value), y_n)
    assert value_error <= 10 * u * lipschitz, (info, value_error)
    s = _checkpoint_stride(num_steps, CHECKPOINTS) - 1
    bound = 10 * u * lipschitz * (1 - beta) ** (-2 * s)
    error = _rel_error(got, ref)
    assert error <= bound, (info, error, bound)
    return error, bound


#
# The tests. Each draws a configuration (what is compiled: solver or adjoint,
# dtype, relaxation) and a problem (structure, data). The default suite draws from
# one configuration per solver / adjoint, alternating the dtypes, and from one
# structure, so that its 42 examples share 13 compilations (~20 s on a quiet
# core); `-m slow` draws from every combination (the full product) and every
# structure, 250 examples (~2.5 min).
#

seeds = st.integers(0, 2**32 - 1)


@st.composite
def cases(draw, configs, structures=tuple(STRUCTURES)):
    """`(name, problem)` for a `(name, dtype_name)` drawn from `configs`."""
    name, dtype_name = draw(st.sampled_from(configs))
    return name, draw(problems(structures, (dtype_name,)))


def _alternate(names):
    return [(name, ("float64", "float32")[i % 2]) for i, name in enumerate(names)]


def _product(names):
    return [(name, dtype_name) for name in names for dtype_name in DTYPES]


@_settings(max_examples=14)
@given(case=cases(_alternate(SOLVER_NAMES), DEFAULT_STRUCTURES))
def test_solvers_converge(case):
    check_solver_converges(case[1], case[0])


@pytest.mark.slow
@_settings(max_examples=120)
@given(case=cases(_product(SOLVER_NAMES)))
def test_solvers_converge_slow(case):
    check_solver_converges(case[1], case[0])


@_settings(max_examples=10)
@given(case=cases(_alternate(ADJOINT_NAMES), DEFAULT_STRUCTURES), seed=seeds)
def test_exact_adjoints_vjp(case, seed):
    check_exact_adjoint_vjp(case[1], case[0], seed)


@pytest.mark.slow
@_settings(max_examples=60)
@given(case=cases(_product(ADJOINT_NAMES)), seed=seeds)
def test_exact_adjoints_vjp_slow(case, seed):
    check_exact_adjoint_vjp(case[1], case[0], seed)


@_settings(max_examples=6)
@given(case=cases([("jvp", "float32")], DEFAULT_STRUCTURES), seed=seeds)
def test_implicit_adjoint_jvp(case, seed):
    check_exact_adjoint_jvp(case[1], seed)


@pytest.mark.slow
@_settings(max_examples=30)
@given(case=cases(_product(["jvp"])), seed=seeds)
def test_implicit_adjoint_jvp_slow(case, seed):
    check_exact_adjoint_jvp(case[1], seed)


@st.composite
def reversible_cases(draw, configs, structures=tuple(STRUCTURES)):
    """`(problem, β, N)`; float32 up to N = 2 × checkpoints (a stride of 2):
    beyond, ε (1-β)^(-2s) approaches 1 and the bound says nothing."""
    beta, p = draw(cases(configs, structures))
    most = REVERSIBLE_MAX_STEPS if p.dtype_name == "float64" else 2 * CHECKPOINTS
    return p, beta, draw(st.integers(1, most))


@_settings(max_examples=12)
@given(
    case=reversible_cases([(RELAXATIONS[0], "float64")], DEFAULT_STRUCTURES),
    seed=seeds,
)
def test_reversible_adjoint(case, seed):
    problem, beta, num_steps = case
    check_reversible_adjoint(problem, beta, num_steps, seed)


@pytest.mark.slow
@_settings(max_examples=40)
@given(case=reversible_cases(_product(RELAXATIONS)), seed=seeds)
def test_reversible_adjoint_slow(case, seed):
    problem, beta, num_steps = case
    check_reversible_adjoint(problem, beta, num_steps, seed)
