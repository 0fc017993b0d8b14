"""`eqxdeq.regularization` against dense Jacobians on small problems."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqxdeq.regularization as reg


NUM_KEYS = 4000  # Monte-Carlo keys for the unbiasedness checks
SE = 4.0  # allowed deviation, in standard errors


#
# Problems and dense references
#


def dense_jacobian(fn, z):
    """`∂f/∂z` as a matrix on the flattened state."""
    flat, unravel = jax.flatten_util.ravel_pytree(z)
    return jax.jacfwd(lambda x: jax.flatten_util.ravel_pytree(fn(unravel(x)))[0])(flat)


def tanh_map(w, b):
    return lambda z: jnp.tanh(w @ z + b)


def tanh_params(key, n=6, scale=0.5, dtype=jnp.float64):
    wkey, bkey, zkey = jr.split(key, 3)
    w = scale * jr.normal(wkey, (n, n), jnp.float64) / np.sqrt(n)
    b = 0.3 * jr.normal(bkey, (n,), jnp.float64)
    z = jr.normal(zkey, (n,), jnp.float64)
    return w.astype(dtype), b.astype(dtype), z.astype(dtype)


def matrix_with_eigenvalues(key, eigenvalues, symmetric):
    """`P diag(λ) P⁻¹` (`P` orthogonal if `symmetric`, else a random matrix)."""
    n = len(eigenvalues)
    p = jr.normal(key, (n, n), jnp.float64)
    if symmetric:
        p, _ = jnp.linalg.qr(p)
        return p @ jnp.diag(jnp.asarray(eigenvalues)) @ p.T
    return p @ jnp.diag(jnp.asarray(eigenvalues)) @ jnp.linalg.inv(p)


def pytree_map(params):
    """A map of `{"a": (3,), "b": (2, 2)}` to itself that mixes the two leaves."""
    w_aa, w_ab, w_ba, w_bb = params

    def fn(z):
        a, b = z["a"], z["b"].reshape(-1)
        return {
            "a": jnp.tanh(w_aa @ a + w_ab @ b),
            "b": jnp.sin(w_ba @ a + w_bb @ b).reshape(2, 2),
        }

    return fn


def pytree_problem(key):
    keys = jr.split(key, 6)
    params = tuple(
        0.5 * jr.normal(k, shape, jnp.float64)
        for k, shape in zip(keys[:4], [(3, 3), (3, 4), (4, 3), (4, 4)])
    )
    z = {
        "a": jr.normal(keys[4], (3,), jnp.float64),
        "b": jr.normal(keys[5], (2, 2), jnp.float64),
    }
    return pytree_map(params), z


def monte_carlo(estimate, key, num=NUM_KEYS):
    """Mean, standard error and variance of `estimate(key)` over `num` keys."""
    samples = jax.jit(jax.vmap(estimate))(jr.split(key, num))
    samples = np.asarray(samples, dtype=np.float64)
    return samples.mean(), samples.std(ddof=1) / np.sqrt(num), samples.var(ddof=1)


def variance_standard_error(estimate, key, num=NUM_KEYS):
    """Sample variance of `estimate(key)` over `num` keys, and its standard error
    `sqrt((μ₄ - σ⁴) / num)` (from the sample fourth central moment)."""
    samples = jax.jit(jax.vmap(estimate))(jr.split(key, num))
    samples = np.asarray(samples, dtype=np.float64)
    var = samples.var(ddof=1)
    fourth = np.mean((samples - samples.mean()) ** 4)
    return var, np.sqrt((fourth - var**2) / num)


def relative_error(a, b):
    a, b = float(a), float(b)
    return abs(a - b) / abs(b)


#
# jacobian_frobenius
#


@pytest.mark.parametrize("estimator", ["hutchinson", "hutchinson_jvp"])
@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_frobenius_unbiased(getkey, probe, estimator):
    w, b, z = tanh_params(getkey())
    fn = tanh_map(w, b)
    jac = dense_jacobian(fn, z)
    exact = float(jnp.sum(jac**2))

    estimate = lambda k: reg.jacobian_frobenius(
        fn, z, key=k, probe=probe, estimator=estimator
    )
    key = getkey()
    mean, se, _ = monte_carlo(estimate, key)
    assert abs(mean - exact) < SE * se, (mean, exact, se)

    # The variance of one sample (checks the probe distribution): 2‖M‖_F² for
    # Gaussian probes, 2(‖M‖_F² - Σ M_kk²) for Rademacher ones, with M = J Jᵀ (vjp)
    # or Jᵀ J (jvp).
    m = jac @ jac.T if estimator == "hutchinson" else jac.T @ jac
    exact_var = 2 * float(jnp.sum(m**2))
    if probe == "rademacher":
        exact_var -= 2 * float(jnp.sum(jnp.diag(m) ** 2))
    var, var_se = variance_standard_error(estimate, key)
    assert abs(var - exact_var) < SE * var_se, (var, exact_var, var_se)


@pytest.mark.slow
def test_frobenius_num_samples(getkey):
    w, b, z = tanh_params(getkey())
    fn = tanh_map(w, b)
    exact = float(jnp.sum(dense_jacobian(fn, z) ** 2))
    var1, var1_se = variance_standard_error(
        lambda k: reg.jacobian_frobenius(fn, z, key=k), getkey()
    )
    estimate8 = lambda k: reg.jacobian_frobenius(fn, z, key=k, num_samples=8)
    key = getkey()
    mean8, se8, _ = monte_carlo(estimate8, key)
    assert abs(mean8 - exact) < SE * se8
    # The variance falls as 1/m.
    var8, var8_se = variance_standard_error(estimate8, key)
    assert abs(var8 - var1 / 8) < SE * np.hypot(var8_se, var1_se / 8)


def test_frobenius_normalise(getkey):
    w, b, z = tanh_params(getkey())
    fn = tanh_map(w, b)
    key = getkey()
    plain = reg.jacobian_frobenius(fn, z, key=key, num_samples=3)
    scaled = reg.jacobian_frobenius(fn, z, key=key, num_samples=3, normalise=True)
    assert jnp.allclose(scaled, plain / z.size, rtol=1e-14, atol=0)


def test_frobenius_exact_for_orthogonal_probes(getkey):
    # Rademacher probes on a diagonal Jacobian: ‖Jᵀv‖² = Σ J_kk² exactly.
    d = jr.normal(getkey(), (5,), jnp.float64)
    fn = lambda z: d * z
    z = jnp.zeros(5)
    out = reg.jacobian_frobenius(fn, z, key=getkey(), probe="rademacher")
    assert jnp.allclose(out, jnp.sum(d**2), rtol=1e-14)


def test_frobenius_gradient(getkey):
    w, b, z = tanh_params(getkey())
    direction = jr.normal(getkey(), w.shape, jnp.float64)

    def estimate(w, key):
        return reg.jacobian_frobenius(tanh_map(w, b), z, key=key, num_samples=2)

    def dense(w):
        return jnp.sum(dense_jacobian(tanh_map(w, b), z) ** 2)

    # For a fixed key, the gradient is that of a smooth function.
    key = getkey()
    grad = jax.grad(estimate)(w, key)
    h = 1e-5
    fd = (estimate(w + h * direction, key) - estimate(w - h * direction, key)) / (2 * h)
    assert relative_error(jnp.vdot(grad, direction), fd) < 1e-7

    # Over keys, it is an unbiased estimate of the dense gradient.
    exact = float(jnp.vdot(jax.grad(dense)(w), direction))
    mean, se, _ = monte_carlo(
        lambda k: jnp.vdot(jax.grad(estimate)(w, k), direction), getkey(), num=2000
    )
    assert abs(mean - exact) < SE * se, (mean, exact, se)

    # ... also with respect to the state.
    zdir = jr.normal(getkey(), z.shape, jnp.float64)
    exact_z = float(
        jnp.vdot(
            jax.grad(lambda z: jnp.sum(dense_jacobian(tanh_map(w, b), z) ** 2))(z),
            zdir,
        )
    )
    mean, se, _ = monte_carlo(
        lambda k: jnp.vdot(
            jax.grad(lambda z: reg.jacobian_frobenius(tanh_map(w, b), z, key=k))(z),
            zdir,
        ),
        getkey(),
        num=2000,
    )
    assert abs(mean - exact_z) < SE * se, (mean, exact_z, se)


def test_frobenius_non_square(getkey):
    a = jr.normal(getkey(), (3, 5), jnp.float64)
    fn = lambda z: jnp.sin(a @ z)
    z = jr.normal(getkey(), (5,), jnp.float64)
    exact = float(jnp.sum(dense_jacobian(fn, z) ** 2))
    for estimator in ["hutchinson", "hutchinson_jvp"]:
        mean, se, _ = monte_carlo(
            lambda k: reg.jacobian_frobenius(fn, z, key=k, estimator=estimator),
            getkey(),
        )
        assert abs(mean - exact) < SE * se


#
# jacobian_spectral_norm
#


def _spectral_norm_problems(key):
    k1, k2, k3 = jr.split(key, 3)
    symmetric = matrix_with_eigenvalues(
        k1, [2.0, -1.2, 0.9, 0.5, -0.3, 0.1], symmetric=True
    )
    nonsymmetric = jr.normal(k2, (6, 6), jnp.float64)
    w, b, z = tanh_params(k3)
    return {
        "symmetric": (lambda z: symmetric @ z, jnp.zeros(6)),
        "nonsymmetric": (lambda z: nonsymmetric @ z, jnp.zeros(6)),
        "tanh": (tanh_map(w, b), z),
    }


@pytest.mark.parametrize("problem", ["symmetric", "nonsymmetric", "tanh"])
def test_spectral_norm(getkey, problem):
    fn, z = _spectral_norm_problems(getkey())[problem]
    singular_values = jnp.linalg.svd(dense_jacobian(fn, z), compute_uv=False)
    # A gap, so that 100 iterations converge far below the tolerance.
    assert singular_values[1] / singular_values[0] < 0.9
    estimate, v = reg.jacobian_spectral_norm(
        fn, z, key=getkey(), num_iters=100, return_vector=True
    )
    assert relative_error(estimate, singular_values[0]) < 1e-10
    assert jnp.allclose(jnp.linalg.norm(v), 1, rtol=1e-12)
    # Few iterations: a lower bound.
    rough = reg.jacobian_spectral_norm(fn, z, key=getkey(), num_iters=2)
    assert rough <= singular_values[0] * (1 + 1e-12)
    # Warm start from the returned vector.
    again = reg.jacobian_spectral_norm(fn, z, init=v, num_iters=1)
    assert relative_error(again, estimate) < 1e-12


def test_spectral_norm_gradient(getkey):
    w, b, z = tanh_params(getkey())

    def estimate(w, z):
        return reg.jacobian_spectral_norm(
            tanh_map(w, b), z, key=jr.PRNGKey(0), num_iters=200
        )

    def dense(w, z):
        return jnp.linalg.norm(dense_jacobian(tanh_map(w, b), z), 2)

    s = jnp.linalg.svd(dense_jacobian(tanh_map(w, b), z), compute_uv=False)
    assert s[1] / s[0] < 0.9
    grads = jax.grad(estimate, argnums=(0, 1))(w, z)
    exact = jax.grad(dense, argnums=(0, 1))(w, z)
    for g, e in zip(grads, exact):
        assert jnp.allclose(g, e, rtol=1e-8, atol=1e-10)


def test_spectral_norm_traced_num_iters(getkey):
    w, b, z = tanh_params(getkey())

    @jax.jit
    def grad(w, num_iters):
        return jax.grad(
            lambda w: reg.jacobian_spectral_norm(
                tanh_map(w, b), z, key=jr.PRNGKey(0), num_iters=num_iters
            )
        )(w)

    exact = jax.grad(lambda w: jnp.linalg.norm(dense_jacobian(tanh_map(w, b), z), 2))(w)
    assert jnp.allclose(grad(w, jnp.array(200)), exact, rtol=1e-8, atol=1e-10)


#
# jacobian_spectral_radius
#


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize(
    "eigenvalues, symmetric",
    [
        ([0.9, -0.5, 0.4, 0.3, 0.2, -0.1], True),
        ([0.9, -0.5, 0.4, 0.3, 0.2, -0.1], False),
        ([-1.3, 0.6, -0.5, 0.4, 0.2, 0.05], False),
    ],
)
def test_spectral_radius(getkey, eigenvalues, symmetric, two_sided):
    a = matrix_with_eigenvalues(getkey(), eigenvalues, symmetric)
    fn = lambda z: jnp.tanh(a @ z)  # Jacobian `a` at zero
    z = jnp.zeros(len(eigenvalues))
    exact = float(np.max(np.abs(np.linalg.eigvals(np.asarray(dense_jacobian(fn, z))))))
    assert relative_error(exact, abs(eigenvalues[0])) < 1e-10
    estimate, vector = reg.jacobian_spectral_radius(
        fn, z, key=getkey(), num_iters=50, two_sided=two_sided, return_vector=True
    )
    assert relative_error(estimate, exact) < 1e-3
    # Far tighter in fact: the ratio |λ₂/λ₁| ≤ 0.56 gives 0.56^50 ~ 1e-13.
    assert relative_error(estimate, exact) < 1e-9
    # Warm start.
    again = reg.jacobian_spectral_radius(
        fn, z, init=vector, num_iters=1, two_sided=two_sided
    )
    assert relative_error(again, estimate) < 1e-9


def test_spectral_radius_nonlinear(getkey):
    w, b, z = tanh_params(getkey(), scale=1.5)
    fn = tanh_map(w, b)
    eigenvalues = np.linalg.eigvals(np.asarray(dense_jacobian(fn, z)))
    moduli = np.sort(np.abs(eigenvalues))[::-1]
    dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]
    # The test problem has a clear, real dominant eigenvalue.
    assert abs(dominant.imag) < 1e-12 and moduli[1] / moduli[0] < 0.8, eigenvalues
    for two_sided in [False, True]:
        estimate = reg.jacobian_spectral_radius(
            fn, z, key=getkey(), num_iters=100, two_sided=two_sided
        )
        assert relative_error(estimate, moduli[0]) < 1e-3


@pytest.mark.slow
def test_spectral_radius_complex_pair():
    # A dominant complex pair: the vector does not converge, but the estimate stays a
    # lower bound of ‖J‖₂ (and equals |λ₁| when J is normal, as for this rotation).
    fn, z = pytree_problem(jr.PRNGKey(2))
    jac = dense_jacobian(fn, z)
    eigenvalues = np.linalg.eigvals(np.asarray(jac))
    assert abs(eigenvalues[np.argmax(np.abs(eigenvalues))].imag) > 1e-3
    estimate = reg.jacobian_spectral_radius(fn, z, key=jr.PRNGKey(0), num_iters=100)
    assert jnp.isfinite(estimate)
    assert estimate <= jnp.linalg.norm(jac, 2) * (1 + 1e-12)

    theta = 0.7
    rotation = 0.9 * jnp.array(
        [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    )
    rotation = jax.scipy.linalg.block_diag(rotation, 0.3 * jnp.eye(2))
    estimate = reg.jacobian_spectral_radius(
        lambda z: rotation @ z, jnp.zeros(4), key=jr.PRNGKey(0), num_iters=50
    )
    assert relative_error(estimate, 0.9) < 1e-10


def _dominant_modulus(matrix):
    eigenvalues = np.linalg.eigvals(np.asarray(matrix))
    return np.max(np.abs(eigenvalues))


def test_spectral_radius_gradient(getkey):
    eigenvalues = [0.9, -0.5, 0.4, 0.3, 0.2, -0.1]
    n = len(eigenvalues)
    direction = jr.normal(getkey(), (n, n), jnp.float64)
    z = jnp.zeros(n)
    h = 1e-6

    for symmetric in [True, False]:
        a = matrix_with_eigenvalues(getkey(), eigenvalues, symmetric)
        if symmetric:
            direction = (direction + direction.T) / 2

        def estimate(t, two_sided):
            fn = lambda z: jnp.tanh((a + t * direction) @ z)
            return reg.jacobian_spectral_radius(
                fn, z, key=jr.PRNGKey(0), num_iters=80, two_sided=two_sided
            )

        # Exact derivative of |λ₁(a + t B)| at t = 0, by central differences.
        fd = (
            _dominant_modulus(a + h * direction) - _dominant_modulus(a - h * direction)
        ) / (2 * h)
        two_sided = jax.grad(estimate)(0.0, True)
        assert relative_error(two_sided, fd) < 1e-6
        one_sided = jax.grad(estimate)(0.0, False)
        if symmetric:
            assert relative_error(one_sided, fd) < 1e-6
        else:
            # The documented approximation sign(λ₁) vᵀ B v, with v the unit right
            # eigenvector; not the exact derivative for a non-normal Jacobian.
            values, vectors = np.linalg.eig(np.asarray(a))
            i = np.argmax(np.abs(values))
            v = np.real(vectors[:, i]) / np.linalg.norm(np.real(vectors[:, i]))
            documented = np.sign(values[i].real) * v @ np.asarray(direction) @ v
            assert relative_error(one_sided, documented) < 1e-6
            assert relative_error(one_sided, fd) > 1e-3


#
# denoising_energy
#


def test_denoising_energy_affine(getkey):
    # Exact for an affine map: E = ‖f(z) - z‖² + σ² ‖A‖_F², at any z.
    a = 0.4 * jr.normal(getkey(), (6, 6), jnp.float64)
    c = jr.normal(getkey(), (6,), jnp.float64)
    z = jr.normal(getkey(), (6,), jnp.float64)
    fn = lambda z: a @ z + c
    sigma = 0.3
    exact = float(jnp.sum((fn(z) - z) ** 2) + sigma**2 * jnp.sum(a**2))
    mean, se, _ = monte_carlo(
        lambda k: reg.denoising_energy(fn, z, key=k, sigma=sigma), getkey()
    )
    assert abs(mean - exact) < SE * se, (mean, exact, se)
    key = getkey()
    plain = reg.denoising_energy(fn, z, key=key, sigma=sigma, num_samples=4)
    scaled = reg.denoising_energy(
        fn, z, key=key, sigma=sigma, num_samples=4, normalise=True
    )
    assert jnp.allclose(scaled, plain / z.size, rtol=1e-14, atol=0)


def test_denoising_energy_at_fixed_point(getkey):
    # At a fixed point, E_σ / σ² = ‖J‖_F² + O(σ²).
    w, b, _ = tanh_params(getkey())
    fn = tanh_map(w, b)
    z = jax.lax.fori_loop(0, 200, lambda _, z: fn(z), jnp.zeros(6))
    assert jnp.max(jnp.abs(fn(z) - z)) < 1e-14
    exact = float(jnp.sum(dense_jacobian(fn, z) ** 2))
    sigma = 1e-3
    mean, se, _ = monte_carlo(
        lambda k: reg.denoising_energy(fn, z, key=k, sigma=sigma) / sigma**2, getkey()
    )
    assert abs(mean - exact) < SE * se, (mean, exact, se)


def test_denoising_energy_gradient(getkey):
    w, b, z = tanh_params(getkey())
    direction = jr.normal(getkey(), w.shape, jnp.float64)
    key = getkey()

    def energy(w):
        return reg.denoising_energy(
            tanh_map(w, b), z, key=key, sigma=0.2, num_samples=3
        )

    h = 1e-5
    fd = (energy(w + h * direction) - energy(w - h * direction)) / (2 * h)
    assert relative_error(jnp.vdot(jax.grad(energy)(w), direction), fd) < 1e-7


def test_denoising_energy_traced_sigma(getkey):
    w, b, z = tanh_params(getkey())
    fn = tanh_map(w, b)
    key = getkey()
    energy = eqx.filter_jit(lambda s: reg.denoising_energy(fn, z, key=key, sigma=s))
    assert jnp.allclose(
        energy(jnp.array(0.2)), reg.denoising_energy(fn, z, key=key, sigma=0.2)
    )
    with pytest.raises(eqx.EquinoxRuntimeError, match="sigma"):
        energy(jnp.array(-0.2)).block_until_ready()


#
# Pytrees, jit, vmap, dtypes
#


@pytest.mark.slow
def test_pytree_state(getkey):
    # (This key gives a clear, real dominant eigenvalue; checked below.)
    fn, z = pytree_problem(jr.PRNGKey(1))
    jac = dense_jacobian(fn, z)
    frobenius = float(jnp.sum(jac**2))
    mean, se, _ = monte_carlo(lambda k: reg.jacobian_frobenius(fn, z, key=k), getkey())
    assert abs(mean - frobenius) < SE * se

    singular_values = jnp.linalg.svd(jac, compute_uv=False)
    assert singular_values[1] / singular_values[0] < 0.9
    norm, v = reg.jacobian_spectral_norm(
        fn, z, key=getkey(), num_iters=200, return_vector=True
    )
    assert relative_error(norm, singular_values[0]) < 1e-3
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(z)

    eigenvalues = np.linalg.eigvals(np.asarray(jac))
    moduli = np.sort(np.abs(eigenvalues))[::-1]
    dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]
    assert abs(dominant.imag) < 1e-12 and moduli[1] / moduli[0] < 0.9, eigenvalues
    for two_sided in [False, True]:
        radius = reg.jacobian_spectral_radius(
            fn, z, key=getkey(), num_iters=300, two_sided=two_sided
        )
        assert relative_error(radius, moduli[0]) < 1e-3

    # Denoising energy with a small σ, against σ² ‖J‖_F² + ‖f(z) - z‖² (to O(σ²)).
    residual = jax.flatten_util.ravel_pytree(
        jax.tree_util.tree_map(jnp.subtract, fn(z), z)
    )[0]
    sigma = 1e-3
    exact = float(jnp.sum(residual**2) + sigma**2 * frobenius)
    mean, se, _ = monte_carlo(
        lambda k: reg.denoising_energy(fn, z, key=k, sigma=sigma), getkey()
    )
    # The O(σ²) curvature term, σ² ⟨r, Δf⟩, is of the order of σ² ‖r‖.
    assert abs(mean - exact) < SE * se + 10 * sigma**2 * float(
        jnp.linalg.norm(residual)
    )


@pytest.mark.slow
def test_mixed_dtype_pytree(getkey):
    w = 0.5 * jr.normal(getkey(), (3, 3), jnp.float64)

    def fn(z):
        a, b = z["a"], z["b"]
        cross = (w @ b).astype(a.dtype)
        return {"a": jnp.tanh(a + cross), "b": jnp.sin(w @ b + a.astype(b.dtype))}

    z = {
        "a": jr.normal(getkey(), (3,), jnp.float32),
        "b": jr.normal(getkey(), (3,), jnp.float64),
    }
    z64 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), z)

    def fn64(z):
        out = fn({"a": z["a"].astype(jnp.float32), "b": z["b"]})
        return jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), out)

    jac = dense_jacobian(fn64, z64)
    key = getkey()
    values = [
        reg.jacobian_frobenius(fn, z, key=key),
        reg.jacobian_spectral_norm(fn, z, key=key, num_iters=100),
        reg.jacobian_spectral_radius(fn, z, key=key, num_iters=100),
        reg.denoising_energy(fn, z, key=key, sigma=0.1),
    ]
    for value in values:
        assert value.dtype == jnp.float64 and value.shape == ()
    s = jnp.linalg.svd(jac, compute_uv=False)
    assert relative_error(values[1], s[0]) < 1e-4


def test_jit(getkey):
    w, b, z = tanh_params(getkey())
    key = getkey()

    def all_estimates(w, z, key):
        fn = tanh_map(w, b)
        return (
            reg.jacobian_frobenius(fn, z, key=key, num_samples=2),
            reg.jacobian_frobenius(fn, z, key=key, estimator="hutchinson_jvp"),
            reg.jacobian_spectral_norm(fn, z, key=key),
            reg.jacobian_spectral_radius(fn, z, key=key),
            reg.jacobian_spectral_radius(fn, z, key=key, two_sided=True),
            reg.denoising_energy(fn, z, key=key, sigma=0.1, num_samples=2),
        )

    eager = all_estimates(w, z, key)
    jitted = jax.jit(all_estimates)(w, z, key)
    filter_jitted = eqx.filter_jit(all_estimates)(w, z, key)
    for e, j, f in zip(eager, jitted, filter_jitted):
        assert jnp.allclose(e, j, rtol=1e-12) and jnp.allclose(e, f, rtol=1e-12)


@pytest.mark.slow
def test_vmap_over_batch(getkey):
    batch = 5
    w, b, _ = tanh_params(getkey())
    fn = tanh_map(w, b)
    zs = jr.normal(getkey(), (batch, 6), jnp.float64)
    keys = jr.split(getkey(), batch)

    for estimate in [
        lambda z, k: reg.jacobian_frobenius(fn, z, key=k),
        lambda z, k: reg.jacobian_spectral_norm(fn, z, key=k),
        lambda z, k: reg.jacobian_spectral_radius(fn, z, key=k, two_sided=True),
        lambda z, k: reg.denoising_energy(fn, z, key=k, sigma=0.1),
    ]:
        batched = jax.vmap(estimate)(zs, keys)
        looped = jnp.stack([estimate(z, k) for z, k in zip(zs, keys)])
        assert batched.shape == (batch,)
        assert jnp.allclose(batched, looped, rtol=1e-10)

    # A batch as one state: block-diagonal Jacobian, so ‖J‖₂ is the maximum of the
    # per-sample norms.
    batch_fn = lambda z: jnp.tanh(z @ w.T + b[None, :])
    per_sample = [jnp.linalg.norm(dense_jacobian(fn, z), 2) for z in zs]
    whole = reg.jacobian_spectral_norm(batch_fn, zs, key=getkey(), num_iters=300)
    assert relative_error(whole, max(per_sample)) < 1e-3


def test_float32(getkey):
    w, b, z = tanh_params(getkey(), dtype=jnp.float32)
    fn = tanh_map(w, b)
    w64, b64, z64 = (x.astype(jnp.float64) for x in (w, b, z))
    jac = dense_jacobian(tanh_map(w64, b64), z64)
    key = getkey()

    frobenius = reg.jacobian_frobenius(fn, z, key=key)
    norm = reg.jacobian_spectral_norm(fn, z, key=key, num_iters=100)
    radius = reg.jacobian_spectral_radius(fn, z, key=key, num_iters=100)
    energy = reg.denoising_energy(fn, z, key=key, sigma=jnp.float32(0.1))
    for value in [frobenius, norm, radius, energy]:
        assert value.dtype == jnp.float32 and jnp.isfinite(value)
    assert relative_error(norm, jnp.linalg.norm(jac, 2)) < 1e-5

    mean, se, _ = monte_carlo(
        lambda k: reg.jacobian_frobenius(fn, z, key=k, probe="rademacher"), getkey()
    )
    assert abs(mean - float(jnp.sum(jac**2))) < SE * se + 1e-5

    grad = jax.grad(
        lambda w: reg.jacobian_spectral_norm(tanh_map(w, b), z, key=key, num_iters=100)
    )(w)
    assert grad.dtype == jnp.float32 and jnp.all(jnp.isfinite(grad))


def test_zero_jacobian_gradients_finite():
    # ‖J v‖ at J = 0 has a zero, not NaN, derivative.
    z = jnp.ones(4)
    grad = jax.grad(
        lambda s: reg.jacobian_spectral_norm(lambda z: s * z, z, key=jr.PRNGKey(0))
    )(0.0)
    assert jnp.isfinite(grad)


#
# Errors
#


def test_errors(getkey):
    w, b, z = tanh_params(getkey())
    fn = tanh_map(w, b)
    key = getkey()
    with pytest.raises(ValueError, match="num_samples"):
        reg.jacobian_frobenius(fn, z, key=key, num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        reg.denoising_energy(fn, z, key=key, sigma=0.1, num_samples=-1)
    with pytest.raises(ValueError, match="estimator"):
        reg.jacobian_frobenius(fn, z, key=key, estimator="hutch++")
    with pytest.raises(ValueError, match="probe"):
        reg.jacobian_frobenius(fn, z, key=key, probe="uniform")
    for sigma in [0.0, -0.1, jnp.array(-1.0)]:
        with pytest.raises(ValueError, match="sigma"):
            reg.denoising_energy(fn, z, key=key, sigma=sigma)
    # (A wrong type is a `TypeError` under the test-suite's jaxtyping hook, a
    # `ValueError` without it.)
    with pytest.raises((ValueError, TypeError), match="sigma"):
        reg.denoising_energy(fn, z, key=key, sigma=jnp.ones(2))
    for f in [reg.jacobian_spectral_norm, reg.jacobian_spectral_radius]:
        with pytest.raises(ValueError, match="num_iters"):
            f(fn, z, key=key, num_iters=0)
        with pytest.raises((ValueError, TypeError), match="num_iters"):
            f(fn, z, key=key, num_iters=2.5)
        with pytest.raises(ValueError, match="key"):
            f(fn, z)
        with pytest.raises(ValueError, match="init"):
            f(fn, z, init=jnp.ones(3))
    with pytest.raises(ValueError, match="init"):
        reg.jacobian_spectral_radius(fn, z, init=z, two_sided=True)
    with pytest.raises(ValueError, match="same pytree structure"):
        reg.jacobian_spectral_radius(lambda z: z[:3], z, key=key)
    with pytest.raises(ValueError, match="same pytree structure"):
        reg.denoising_energy(lambda z: {"z": z}, z, key=key, sigma=0.1)
    with pytest.raises(ValueError, match="floating-point"):
        reg.jacobian_frobenius(fn, jnp.arange(6), key=key)
    with pytest.raises(ValueError, match="floating-point"):
        reg.jacobian_spectral_norm(lambda z: jnp.round(z).astype(int), z, key=key)
