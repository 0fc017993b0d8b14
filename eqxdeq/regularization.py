r"""Matrix-free Jacobian penalties and diagnostics for training deep equilibrium
models.

Every function here takes `fn`, a function of the state only, $z \mapsto f(z)$ (close
over the input and the parameters: `lambda z: cell(z, x)`), and a state `z`, any
pytree of real floating-point arrays, usually the fixed point $z^\star$. Write
$J = \partial f / \partial z$ at `z`, seen as a matrix on the flattened state of
dimension $d$ (the total number of elements of `z`).

- [`eqxdeq.regularization.jacobian_frobenius`][]: $\lVert J \rVert_F^2$
    (Hutchinson, unbiased), one vjp (or jvp) per sample;
- [`eqxdeq.regularization.jacobian_spectral_norm`][]: $\lVert J \rVert_2$ (power
    iteration on $J^\top J$), one jvp and one vjp per iteration;
- [`eqxdeq.regularization.jacobian_spectral_radius`][]: $\rho(J)$ (power iteration
    on $J$), one jvp (and one vjp if `two_sided`) per iteration;
- [`eqxdeq.regularization.denoising_energy`][]:
    $\mathbb{E}\lVert f(z + \sigma\varepsilon) - z\rVert^2$, one evaluation of $f$
    per sample.

The Jacobian is never materialised: only Jacobian-vector products (`jax.jvp`,
`jax.linearize`) and vector-Jacobian products (`jax.vjp`) are used. All of them are
differentiable (with respect to the parameters `fn` closes over and to `z`), and work
under `jax.jit` and `jax.vmap`. A batched state (say of shape `(batch, n)`) is one
state whose Jacobian is block-diagonal: $\lVert J\rVert_F^2$ then sums over the
batch and $\lVert J\rVert_2$, $\rho(J)$ are maxima over it; `jax.vmap` over the batch
gives per-sample values.
"""

from collections.abc import Callable
from typing import Literal, overload

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, ScalarLike

from ._misc import is_python_number, stats_dtype, tree_cast_like, tree_inner


_PROBES = ("gaussian", "rademacher")
_ESTIMATORS = ("hutchinson", "hutchinson_jvp")


#
# Argument checks
#


def _check_floating(tree, what: str) -> None:
    leaves = jtu.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{what} must have at least one array leaf.")
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if (
            not hasattr(leaf, "shape")
            or dtype is None
            or not jnp.issubdtype(dtype, jnp.floating)
        ):
            raise ValueError(
                f"{what} must be a pytree of real floating-point arrays; got a leaf "
                f"{leaf!r}. (Complex states are not supported.)"
            )


def _check_state(z, name: str) -> None:
    _check_floating(z, f"`{name}(z=...)`")


def _check_output(out, name: str) -> None:
    _check_floating(out, f"The output of `{name}(fn=...)`")


def _check_square(out_struct, z, name: str) -> None:
    same_structure = jtu.tree_structure(out_struct) == jtu.tree_structure(z)
    if not same_structure or any(
        a.shape != b.shape
        for a, b in zip(jtu.tree_leaves(out_struct), jtu.tree_leaves(z))
    ):
        raise ValueError(
            f"`{name}` needs `fn(z)` to have the same pytree structure and shapes as "
            "`z` (a map of the state to itself)."
        )


def _check_num_samples(num_samples, name: str) -> None:
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or num_samples < 1
    ):
        raise ValueError(
            f"`{name}(num_samples=...)` must be a Python int >= 1; got {num_samples!r}."
        )


def _check_num_iters(num_iters, name: str) -> None:
    if isinstance(num_iters, bool):
        raise ValueError(f"`{name}(num_iters=...)` must be an integer >= 1.")
    if is_python_number(num_iters):
        if not jnp.issubdtype(jnp.result_type(num_iters), jnp.integer):
            raise ValueError(
                f"`{name}(num_iters=...)` must be an integer >= 1; got {num_iters!r}."
            )
        if num_iters < 1:
            raise ValueError(
                f"`{name}(num_iters=...)` must be at least 1; got {num_iters!r}."
            )
    elif not (
        hasattr(num_iters, "dtype")
        and jnp.issubdtype(num_iters.dtype, jnp.integer)
        and jnp.shape(num_iters) == ()
    ):
        raise ValueError(
            f"`{name}(num_iters=...)` must be an integer >= 1 (a Python int or a "
            f"scalar integer array); got {num_iters!r}."
        )


def _check_choice(value, choices, argument: str, name: str) -> None:
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(f'"{c}"' for c in choices)
        raise ValueError(
            f"`{name}({argument}=...)` must be one of {options}; got {value!r}."
        )


def _check_sigma(sigma, name: str):
    if jnp.shape(sigma) != ():
        raise ValueError(f"`{name}(sigma=...)` must be a scalar.")
    if not jnp.issubdtype(jnp.result_type(sigma), jnp.floating) and not (
        jnp.issubdtype(jnp.result_type(sigma), jnp.integer)
    ):
        raise ValueError(f"`{name}(sigma=...)` must be a real number.")
    message = f"`{name}(sigma=...)` must be positive."
    if is_python_number(sigma):
        if not sigma > 0:
            raise ValueError(f"{message[:-1]}; got {sigma!r}.")
        return sigma
    # Traced: checked at run time.
    return eqx.error_if(sigma, jnp.logical_not(sigma > 0), message)


#
# Pytree helpers
#


def _size(tree) -> int:
    return sum(leaf.size for leaf in jtu.tree_leaves(tree))


def _draw(key: PRNGKeyArray, like, probe: str) -> PyTree[Array]:
    """Independent standard Gaussian or Rademacher entries with the structure, shapes
    and dtypes of `like` (arrays or `jax.ShapeDtypeStruct`s)."""
    leaves, treedef = jtu.tree_flatten(like)
    keys = jr.split(key, len(leaves))
    if probe == "gaussian":
        draws = [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    else:
        draws = [jr.rademacher(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jtu.tree_unflatten(treedef, draws)


def _sq_norm(x, dtype) -> Float[Array, ""]:
    return tree_inner(x, x, dtype)


def _safe_norm(x, dtype) -> Float[Array, ""]:
    """Euclidean norm with a zero (not NaN) derivative at zero."""
    sq = _sq_norm(x, dtype)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


def _normalised(x, dtype):
    """`x / ‖x‖` (and `0` for `x = 0`), in the dtypes of `x`. Not differentiated."""
    norm = _sq_norm(x, dtype) ** 0.5
    scale = jnp.where(norm > 0, 1 / jnp.where(norm > 0, norm, 1), 0)
    return jtu.tree_map(lambda a: scale.astype(a.dtype) * a, x)


def _no_grad(fn, z):
    """`fn` and `z` with every array, including those `fn` closes over, behind a
    `stop_gradient`: the power iterations run on this copy, so they carry no tangents
    (and a traced `num_iters` works in reverse mode)."""
    z = lax.stop_gradient(z)
    closed = eqx.filter_closure_convert(fn, z)
    closed = jtu.tree_map(
        lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x, closed
    )
    return closed, z


def _initial_vector(key, init, z, name: str, argument: str = "init"):
    if init is None:
        if key is None:
            raise ValueError(
                f"`{name}` needs a random starting vector: pass `key=...` (or a "
                f"starting vector `{argument}=...`)."
            )
        v = _draw(key, z, "gaussian")
    else:
        if jtu.tree_structure(init) != jtu.tree_structure(z) or any(
            jnp.shape(a) != b.shape
            for a, b in zip(jtu.tree_leaves(init), jtu.tree_leaves(z))
        ):
            raise ValueError(
                f"`{name}({argument}=...)` must have the pytree structure and shapes "
                "of `z`."
            )
        v = tree_cast_like(jtu.tree_map(jnp.asarray, init), z)
    return _normalised(lax.stop_gradient(v), stats_dtype(z))


#
# Frobenius norm
#


def jacobian_frobenius(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    *,
    key: PRNGKeyArray,
    num_samples: int = 1,
    probe: str = "gaussian",
    estimator: str = "hutchinson",
    normalise: bool = False,
) -> Float[Array, ""]:
    r"""Hutchinson's unbiased estimate of the squared Frobenius norm
    $\lVert J\rVert_F^2 = \operatorname{tr}(J^\top J) = \operatorname{tr}(J J^\top)$
    of $J = \partial f / \partial z$ (Bai et al. 2021's Jacobian regulariser).

    For probes $v_1, \dots, v_m$ with independent entries of mean zero and variance
    one, $\mathbb{E}[v v^\top] = I$, so

    $$\widehat{F} = \frac{1}{m} \sum_{i=1}^m \lVert J^\top v_i \rVert_2^2,
      \qquad \mathbb{E}\,\widehat{F} = \operatorname{tr}(J J^\top)
      = \lVert J \rVert_F^2 .$$

    With `estimator="hutchinson"` (the default, as in torchdeq's `jac_reg`) the
    probes live in the output space and each costs one vector-Jacobian product
    $v \mapsto v^\top J$ (`jax.vjp`): the $m$ products share one evaluation of $f$
    and are batched with `jax.vmap`. `estimator="hutchinson_jvp"` uses probes in
    the input space and Jacobian-vector products, $\lVert J v_i\rVert^2$
    (`jax.linearize`), with the same expectation.

    The variance of one sample is $2\lVert JJ^\top\rVert_F^2$ for Gaussian probes and
    $2(\lVert JJ^\top\rVert_F^2 - \sum_k (JJ^\top)_{kk}^2)$ for Rademacher ones (for
    the jvp estimator, replace $JJ^\top$ by $J^\top J$), so Rademacher probes never
    do worse; the standard error falls as $1/\sqrt{m}$.

    The gradient of the estimate (with respect to the parameters `fn` closes over, or
    to `z`) is an unbiased estimate of the gradient of $\lVert J\rVert_F^2$: for a fixed
    `key` the estimate is a smooth function, so differentiate it like any other loss
    term (this costs a second-order vjp of $f$).

    !!! info "Normalisation"

        This returns the squared norm itself. torchdeq's `jac_reg` and banax's
        `hutchinson_jacobian_frobenius` return $\lVert J\rVert_F^2 / d$, with $d$ the
        number of elements of `z` (torchdeq's includes the batch dimension): pass
        `normalise=True` for that. For a batch `z` of shape `(batch, n)`,
        `normalise=True` gives the mean over the batch of
        $\lVert J_b\rVert_F^2 / n$.

    ??? cite "References"

        ```bibtex
        @article{hutchinson1989stochastic,
            author = {Hutchinson, M. F.},
            title = {A stochastic estimator of the trace of the influence matrix for
                     {L}aplacian smoothing splines},
            journal = {Communications in Statistics -- Simulation and Computation},
            volume = {18},
            number = {3},
            pages = {1059--1076},
            year = {1989},
        }

        @inproceedings{bai2021stabilizing,
            author = {Bai, Shaojie and Koltun, Vladlen and Kolter, J. Zico},
            title = {Stabilizing Equilibrium Models by {J}acobian Regularization},
            booktitle = {International Conference on Machine Learning},
            year = {2021},
        }
        ```

    **Arguments:**

    - `fn`: the map $z \mapsto f(z)$, a function of the state only. Its output may be
        any pytree of real floating-point arrays.
    - `z`: the state at which to evaluate the Jacobian (usually the fixed point), a
        pytree of real floating-point arrays.
    - `key`: a JAX PRNG key for the probes.
    - `num_samples`: the number $m \ge 1$ of probes (a Python int).
    - `probe`: `"gaussian"` (standard normal entries, the default, as in torchdeq) or
        `"rademacher"` (entries $\pm 1$, lower variance).
    - `estimator`: `"hutchinson"` (vector-Jacobian products, the default) or
        `"hutchinson_jvp"` (Jacobian-vector products).
    - `normalise`: if `True`, divide by the dimension $d$ of `z` (see above).

    **Returns:**

    A scalar, in the widest floating dtype of `z` (at least float32).
    """
    name = "jacobian_frobenius"
    _check_num_samples(num_samples, name)
    _check_choice(probe, _PROBES, "probe", name)
    _check_choice(estimator, _ESTIMATORS, "estimator", name)
    _check_state(z, name)
    keys = jr.split(key, num_samples)
    if estimator == "hutchinson":
        out, pull = jax.vjp(fn, z)
        _check_output(out, name)
        probes = jax.vmap(lambda k: _draw(k, out, probe))(keys)
        products = jax.vmap(lambda v: pull(v)[0])(probes)
    else:
        out, push = jax.linearize(fn, z)
        _check_output(out, name)
        probes = jax.vmap(lambda k: _draw(k, z, probe))(keys)
        products = jax.vmap(push)(probes)
    dtype = stats_dtype((z, out))
    estimate = jnp.mean(jax.vmap(lambda p: _sq_norm(p, dtype))(products))
    if normalise:
        estimate = estimate / _size(z)
    return estimate


#
# Spectral norm
#


@overload
def jacobian_spectral_norm(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    *,
    key: PRNGKeyArray | None = None,
    num_iters: int | Int[Array, ""] = 20,
    init: PyTree[Array] | None = None,
    return_vector: Literal[False] = False,
) -> Float[Array, ""]: ...


@overload
def jacobian_spectral_norm(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    *,
    key: PRNGKeyArray | None = None,
    num_iters: int | Int[Array, ""] = 20,
    init: PyTree[Array] | None = None,
    return_vector: Literal[True],
) -> tuple[Float[Array, ""], PyTree[Array]]: ...


def jacobian_spectral_norm(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    *,
    key: PRNGKeyArray | None = None,
    num_iters: int | Int[Array, ""] = 20,
    init: PyTree[Array] | None = None,
    return_vector: bool = False,
) -> Float[Array, ""] | tuple[Float[Array, ""], PyTree[Array]]:
    r"""Power-iteration estimate of the spectral norm
    $\lVert J\rVert_2 = \sigma_{\max}(J)$ of $J = \partial f / \partial z$.

    Starting from a random unit vector $v_0$ (or `init`), power iteration on the Gram
    matrix $J^\top J$,

    $$v_{k+1} = \frac{J^\top J v_k}{\lVert J^\top J v_k\rVert_2},$$

    costs one Jacobian-vector and one vector-Jacobian product per iteration (from a
    single `jax.linearize` of $f$ and its transpose), and converges to the top right
    singular vector at the rate $(\sigma_2/\sigma_1)^{2k}$. The estimate is the
    Rayleigh quotient of the last vector,

    $$\widehat{\sigma} = \lVert J v_K\rVert_2
      = \sqrt{v_K^\top J^\top J v_K} \;\le\; \sigma_{\max}(J),$$

    so it approaches $\sigma_{\max}$ from below, with a relative error of order
    $(\sigma_2/\sigma_1)^{4K}$ once the vector has aligned.

    !!! info "Gradients"

        The iteration runs behind a `stop_gradient`; only the final
        $\lVert J v_K\rVert$ is differentiated, with $v_K$ held fixed. Since
        $\mathrm{d}\sigma_{\max} = u^\top (\mathrm{d}J)\, v$ for the top singular
        pair $(u, v)$ (a simple $\sigma_{\max}$), this is the exact gradient once
        $v_K$ has converged, with respect to the parameters `fn` closes over and to
        `z`. It costs one extra Jacobian-vector product in the forward pass, and
        memory does not grow with `num_iters`. (Compare banax's
        `jacobian_spectral_norm`, which does the same.)

    **Arguments:**

    - `fn`: the map $z \mapsto f(z)$, a function of the state only; its output may be
        any pytree of real floating-point arrays.
    - `z`: the state at which to evaluate the Jacobian, a pytree of real
        floating-point arrays.
    - `key`: a JAX PRNG key for the starting vector. Needed unless `init` is given.
    - `num_iters`: the number $K \ge 1$ of power iterations: a Python int, or a
        scalar integer array (which may be traced: changing it does not recompile).
    - `init`: optional starting vector (a pytree like `z`), for example the vector
        returned by the previous training step (`return_vector=True`), so that a few
        iterations per step suffice (as in spectral normalisation). It is normalised
        and not differentiated; `key` is then not used.
    - `return_vector`: if `True`, also return $v_K$.

    **Returns:**

    The estimate $\widehat\sigma$, a scalar in the widest floating dtype of `z` (at
    least float32); with `return_vector=True`, the pair $(\widehat\sigma, v_K)$, with
    $v_K$ a unit vector (pytree like `z`).
    """
    name = "jacobian_spectral_norm"
    _check_state(z, name)
    _check_num_iters(num_iters, name)
    dtype = stats_dtype(z)
    v0 = _initial_vector(key, init, z, name)
    fn_nograd, z_nograd = _no_grad(fn, z)
    out, push = jax.linearize(fn_nograd, z_nograd)
    _check_output(out, name)
    pull = jax.linear_transpose(push, z_nograd)

    def body(_, v):
        return _normalised(pull(push(v))[0], dtype)

    v = lax.stop_gradient(lax.fori_loop(0, num_iters, body, v0))
    _, jv = jax.jvp(fn, (z,), (v,))
    estimate = _safe_norm(jv, stats_dtype((z, jv)))
    if return_vector:
        return estimate, v
    return estimate


#
# Spectral radius
#


@overload
def jacobian_spectral_radius(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    *,
    key: PRNGKeyArray | None = None,
    num_iters: int | Int[Array, ""] = 20,
    two_sided: bool = False,
    init: PyTree[Array] | None = None,
    return_vector: Literal[False] = False,
) -> Float[Array, ""]: ...


@overload
def jacobian_spectral_radius(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    *,
    key: PRNGKeyArray | None = None,
    num_iters: int | Int[Array, ""] = 20,
    two_sided: bool = False,
    init: PyTree[Array] | None = None,
    return_vector: Literal[True],
) -> tuple[Float[Array, ""], PyTree[Array]]: ...


def jacobian_spectral_radius(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    *,
    key: PRNGKeyArray | None = None,
    num_iters: int | Int[Array, ""] = 20,
    two_sided: bool = False,
    init: PyTree[Array] | None = None,
    return_vector: bool = False,
) -> Float[Array, ""] | tuple[Float[Array, ""], PyTree[Array]]:
    r"""Power-iteration estimate of the spectral radius
    $\rho(J) = \lvert\lambda_{\max}(J)\rvert$ of $J = \partial f / \partial z$, the
    quantity that decides whether the fixed-point iteration converges locally
    ($\rho < 1$); torchdeq's `power_method`.

    Power iteration on $J$ itself,

    $$v_{k+1} = \frac{J v_k}{\lVert J v_k\rVert_2},$$

    costs one Jacobian-vector product per iteration (from a single
    `jax.linearize` of $f$). When $J$ has a simple dominant eigenvalue $\lambda_1$
    that is real (it then is for real $J$ unless a complex pair dominates),
    $v_k$ converges to its eigenvector at the rate $\lvert\lambda_2/\lambda_1\rvert^k$
    and the estimate

    $$\widehat\rho = \lVert J v_K\rVert_2 \to \lvert\lambda_1\rvert .$$

    If a complex-conjugate pair dominates, $v_k$ does not converge; $\widehat\rho$
    then tends to stay between the smallest and largest singular values of $J$
    restricted to that pair's invariant plane (equal to $\lvert\lambda_1\rvert$
    when $J$ is normal there, a rotation), and never exceeds $\lVert J\rVert_2$.

    With `two_sided=True` the left eigenvector is iterated too,
    $u_{k+1} = J^\top u_k / \lVert J^\top u_k\rVert$ (one more vector-Jacobian
    product per iteration), and the estimate is the two-sided Rayleigh quotient

    $$\widehat\rho = \left\lvert \frac{u_K^\top J v_K}{u_K^\top v_K} \right\rvert,$$

    whose error is the product of the errors of the two vectors (so it converges
    twice as fast for a non-symmetric $J$), and whose gradient is the exact
    derivative of $\lvert\lambda_1\rvert$ (below). It is ill-conditioned when
    $u^\top v \approx 0$, that is when $\lambda_1$ is itself ill-conditioned.

    !!! info "Gradients"

        The iteration runs behind a `stop_gradient` and the final estimate is
        differentiated with the vectors held fixed, so memory does not grow with
        `num_iters`. For a simple eigenvalue,
        $\mathrm{d}\lambda_1 = u^\top (\mathrm{d}J)\, v / u^\top v$ with $u, v$ its
        left and right eigenvectors. The two-sided estimate has exactly this gradient
        at convergence. The one-sided $\lVert J v\rVert$ has gradient
        $\operatorname{sign}(\lambda_1)\, v^\top (\mathrm{d}J)\, v$, which is exact
        when $J$ is symmetric (or normal, $u = v$). For a non-normal $J$ it can be
        far off: for one random non-symmetric $6 \times 6$ matrix with eigenvalues
        $0.9, -0.5, 0.4, 0.3, 0.2, -0.1$ and one direction $\mathrm{d}J$ it is 0.27
        where the true derivative is 6.06. Use `two_sided=True` when the
        gradient matters and $J$ is far from symmetric.

    **Arguments:**

    - `fn`: the map $z \mapsto f(z)$, a function of the state only, whose output has
        the structure and shapes of `z`.
    - `z`: the state at which to evaluate the Jacobian, a pytree of real
        floating-point arrays.
    - `key`: a JAX PRNG key for the starting vector(s). Needed unless `init` is given.
    - `num_iters`: the number $K \ge 1$ of power iterations: a Python int, or a
        scalar integer array (which may be traced: changing it does not recompile).
    - `two_sided`: if `True`, also iterate on $J^\top$ and return the two-sided
        Rayleigh quotient (twice the cost per iteration).
    - `init`: optional starting vector (a pytree like `z`; with `two_sided=True`, a
        pair `(v, u)` of such pytrees, right then left), for example the one returned
        by the previous training step. It is normalised and not differentiated; `key`
        is then not used.
    - `return_vector`: if `True`, also return the final vector: $v_K$, or the pair
        $(v_K, u_K)$ with `two_sided=True`.

    **Returns:**

    The estimate $\widehat\rho$, a scalar in the widest floating dtype of `z` (at
    least float32); with `return_vector=True`, the pair of the estimate and the final
    unit vector(s).
    """
    name = "jacobian_spectral_radius"
    _check_state(z, name)
    _check_num_iters(num_iters, name)
    out_struct = jax.eval_shape(fn, z)
    _check_output(out_struct, name)
    _check_square(out_struct, z, name)
    dtype = stats_dtype((z, out_struct))
    fn_nograd, z_nograd = _no_grad(fn, z)
    _, push = jax.linearize(fn_nograd, z_nograd)

    def jvp(v):
        return tree_cast_like(push(v), z)

    if two_sided:
        pull = jax.linear_transpose(push, z_nograd)

        def vjp(u):
            return pull(tree_cast_like(u, out_struct))[0]

        if init is None:
            v0 = u0 = None
            vkey = ukey = None
            if key is not None:
                vkey, ukey = jr.split(key)
        else:
            if not (isinstance(init, tuple) and len(init) == 2):
                raise ValueError(
                    f"`{name}(init=...)` must be a pair `(v, u)` of pytrees like `z` "
                    "when `two_sided=True`."
                )
            v0, u0 = init
            vkey = ukey = None
        v0 = _initial_vector(vkey, v0, z, name)
        u0 = _initial_vector(ukey, u0, z, name)

        def body(_, vu):
            v, u = vu
            return _normalised(jvp(v), dtype), _normalised(vjp(u), dtype)

        v, u = lax.stop_gradient(lax.fori_loop(0, num_iters, body, (v0, u0)))
        _, jv = jax.jvp(fn, (z,), (v,))
        estimate = jnp.abs(tree_inner(u, jv, dtype) / tree_inner(u, v, dtype))
        vector = (v, u)
    else:
        v0 = _initial_vector(key, init, z, name)

        def body_right(_, v):
            return _normalised(jvp(v), dtype)

        v = lax.stop_gradient(lax.fori_loop(0, num_iters, body_right, v0))
        _, jv = jax.jvp(fn, (z,), (v,))
        estimate = _safe_norm(jv, dtype)
        vector = v
    if return_vector:
        return estimate, vector
    return estimate


#
# Denoising energy
#


def denoising_energy(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    *,
    key: PRNGKeyArray,
    sigma: ScalarLike,
    num_samples: int = 1,
    normalise: bool = False,
) -> Float[Array, ""]:
    r"""The denoising energy of Perschewski and Stober (2025): how far one
    application of $f$ lands from the state $z$ when started from a noisy copy,

    $$E_\sigma(z) = \mathbb{E}_{\varepsilon \sim \mathcal{N}(0, I)}
      \left\lVert f(z + \sigma \varepsilon) - z \right\rVert_2^2 ,$$

    estimated with `num_samples` independent noise draws (each one evaluation of $f$,
    batched with `jax.vmap`). Penalising it trains $f$ to map a perturbed equilibrium
    back onto the equilibrium, a denoiser: with $r = f(z) - z$ the residual and $J$
    the Jacobian at $z$, a Taylor expansion (odd moments of $\varepsilon$ vanish)
    gives

    $$E_\sigma(z) = \lVert r\rVert^2
      + \sigma^2 \left(\lVert J\rVert_F^2 + \langle r, \Delta f(z)\rangle\right)
      + O(\sigma^4),$$

    with $\Delta f$ the Laplacian of each output. At a fixed point $z^\star$ ($r = 0$)
    this is $\sigma^2 \lVert J\rVert_F^2 + O(\sigma^4)$: a derivative-free relative
    of [`eqxdeq.regularization.jacobian_frobenius`][] that also sees the curvature
    of $f$ at the scale $\sigma$. For an affine $f$ it is exactly
    $\lVert r\rVert^2 + \sigma^2\lVert J\rVert_F^2$. The estimate is unbiased for
    $E_\sigma$, and differentiable (with respect to the parameters `fn` closes over,
    and to `z`, through both $f(z + \sigma\varepsilon)$ and the subtracted $z$; wrap
    `z` in `jax.lax.stop_gradient` to treat the target as a constant).

    !!! info "Normalisation"

        banax's `denoising_energy` divides by the number $d$ of elements of `z` and
        uses one sample: it is `normalise=True`, `num_samples=1` here (in
        distribution; the random numbers differ).

    ??? cite "References"

        Perschewski and Stober (2025), *Procedia Computer Science*,
        [doi:10.1016/j.procs.2025.07.136](https://doi.org/10.1016/j.procs.2025.07.136).

    **Arguments:**

    - `fn`: the map $z \mapsto f(z)$, a function of the state only, whose output has
        the structure and shapes of `z`.
    - `z`: the state (usually the fixed point), a pytree of real floating-point
        arrays.
    - `key`: a JAX PRNG key for the noise.
    - `sigma`: the noise standard deviation $\sigma > 0$, a scalar (it may be traced;
        a traced non-positive value raises an `equinox.EquinoxRuntimeError` at run
        time).
    - `num_samples`: the number of noise draws averaged (a Python int $\ge 1$).
    - `normalise`: if `True`, divide by the dimension $d$ of `z`.

    **Returns:**

    A scalar, in the widest floating dtype of `z` (at least float32).
    """
    name = "denoising_energy"
    _check_num_samples(num_samples, name)
    _check_state(z, name)
    sigma = _check_sigma(sigma, name)
    out_struct = jax.eval_shape(fn, z)
    _check_output(out_struct, name)
    _check_square(out_struct, z, name)
    dtype = stats_dtype(z)

    def sample(k):
        noise = _draw(k, z, "gaussian")
        noisy = jtu.tree_map(lambda a, e: a + jnp.asarray(sigma, a.dtype) * e, z, noise)
        delta = jtu.tree_map(lambda fa, a: fa.astype(a.dtype) - a, fn(noisy), z)
        return _sq_norm(delta, dtype)

    estimate = jnp.mean(jax.vmap(sample)(jr.split(key, num_samples)))
    if normalise:
        estimate = estimate / _size(z)
    return estimate


#
# Fixed-point correction
#


def fixed_point_correction(
    losses: PyTree[Float[Array, ""]],
    weights: Literal["const", "linear", "exp"] | PyTree[ScalarLike] = "exp",
    *,
    gamma: float = 0.8,
) -> Float[Array, ""]:
    r"""The fixed-point-correction loss (Bai et al. 2022; torchdeq's
    `fp_correction`): a weighted sum $\sum_i w_i \ell_i$ of the losses $\ell_i$ of the
    states sampled along a solve by [`eqxdeq.nn.DEQ.trajectory`][], the last one the
    loss at $z^\star$.

    The intermediate states carry phantom (or JFB) gradients, so the correction
    trains the cell to make early iterates useful too, which in turn makes the solve
    converge in fewer steps.

    **Arguments:**

    - `losses`: a sequence of $n$ scalar losses, in the order of the states.
    - `weights`: `"const"` ($w_i = 1$), `"linear"` ($w_i = (i + 1)/n$), `"exp"`
        ($w_i = \gamma^{n - 1 - i}$, the default: the final state weighs most), or
        explicit weights (a sequence of $n$ numbers).
    - `gamma`: the decay of `"exp"`, in $(0, 1]$.

    **Returns:**

    The scalar $\sum_i w_i \ell_i$.
    """
    losses = list(losses)
    n = len(losses)
    if n == 0:
        raise ValueError("`fixed_point_correction(losses=...)` must not be empty.")
    if is_python_number(gamma) and not 0 < gamma <= 1:
        raise ValueError("`fixed_point_correction(gamma=...)` must be in (0, 1].")
    if isinstance(weights, str):
        if weights == "const":
            w = [1.0] * n
        elif weights == "linear":
            w = [(i + 1) / n for i in range(n)]
        elif weights == "exp":
            w = [gamma ** (n - 1 - i) for i in range(n)]
        else:
            raise ValueError(
                "`fixed_point_correction(weights=...)` must be 'const', 'linear', "
                f"'exp' or a sequence of numbers, got {weights!r}."
            )
    else:
        w = list(weights)
        if len(w) != n:
            raise ValueError(
                f"`fixed_point_correction(weights=...)` has {len(w)} weights for "
                f"{n} losses."
            )
    total = losses[0] * jnp.asarray(w[0], jnp.result_type(losses[0]))
    for wi, li in zip(w[1:], losses[1:]):
        total = total + jnp.asarray(wi, jnp.result_type(li)) * li
    return total
