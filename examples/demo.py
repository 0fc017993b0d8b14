"""eqxdeq demo: solve a deep-equilibrium layer with each solver, then differentiate.

The layer is `z ↦ tanh(z W + x U)` on 32 handwritten digits from scikit-learn
(8×8 images, so x has 64 features), with W (64×64) scaled to spectral norm 0.95 so the
fixed point is hard for plain iteration. Prints, for each solver, the number of
steps and evaluations of f, the final residuals and the time per solve; then the
gradient of a loss w.r.t. W with each adjoint, against the exact (dense) gradient.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
from sklearn.datasets import load_digits

import eqxdeq


def layer(z, args):
    weight, injection = args
    return jnp.tanh(z @ weight + injection)


def make_problem(key, hidden=64, batch=32, radius=0.95):
    digits = load_digits()
    x = jnp.asarray(digits.data[:batch] / 16.0, jnp.float32)  # (batch, 64)
    wkey, ukey = jr.split(key)
    weight = jr.normal(wkey, (hidden, hidden))
    weight = radius * weight / jnp.linalg.norm(weight, 2)
    inject = jr.normal(ukey, (x.shape[1], hidden)) / (4 * jnp.sqrt(x.shape[1]))
    return (weight, x @ inject), jnp.zeros((batch, hidden))


@eqx.filter_jit
def solve(solver, y0, args):
    return optx.fixed_point(layer, solver, y0, args, max_steps=2000, throw=False)


def main():
    args, y0 = make_problem(jr.PRNGKey(0))
    tol = 1e-5
    solvers = {
        "Picard": eqxdeq.Picard(tol, tol),
        "Picard(relaxation=0.8)": eqxdeq.Picard(tol, tol, relaxation=0.8),
        "Anderson (memory=8)": eqxdeq.Anderson(tol, tol),
        "Broyden (memory=8)": eqxdeq.Broyden(tol, tol),
        "Broyden(line_search=True)": eqxdeq.Broyden(tol, tol, line_search=True),
        "NewtonKrylov": eqxdeq.NewtonKrylov(tol, tol),
        "optx.FixedPointIteration": optx.FixedPointIteration(tol, tol),
    }
    print("Fixed point of tanh(zW + xU): W is 64x64 with |W|_2 = 0.95, x = 32 digits")
    print()
    header = (
        f"| {'solver':<27} | steps | f-evals | abs residual | rel residual | ms/solve |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, solver in solvers.items():
        sol = solve(solver, y0, args)
        jax.block_until_ready(sol.value)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(solve(solver, y0, args).value)
            times.append(time.perf_counter() - start)
        stats = sol.stats
        fy = layer(sol.value, args)
        abs_res = float(jnp.linalg.norm(fy - sol.value))
        rel_res = abs_res / float(jnp.linalg.norm(fy))
        evals = str(int(stats.get("num_fn_evals", stats["num_steps"])))
        if "num_jvps" in stats:  # Newton–Krylov: f-evals + Jacobian-vector products
            evals += f"+{int(stats['num_jvps'])}jvp"
        print(
            f"| {name:<27} | {int(stats['num_steps']):5d} | {evals:>7} | "
            f"{abs_res:12.2e} | {rel_res:12.2e} | {1e3 * np.median(times):8.2f} |"
        )

    print()
    print(
        "Gradient of sum(z*) w.r.t. W, relative error against the dense IFT gradient:"
    )
    weight, injection = args

    def loss(weight, adjoint, solver):
        sol = optx.fixed_point(
            layer, solver, y0, (weight, injection), adjoint=adjoint, max_steps=2000
        )
        return jnp.sum(sol.value)

    z = solve(eqxdeq.Anderson(1e-6, 1e-6), y0, args).value
    n = z.size
    jac = jax.jacfwd(lambda v: layer(v.reshape(z.shape), args).reshape(-1))(z.ravel())
    w = jnp.linalg.solve((jnp.eye(n) - jac).T, jnp.ones(n))
    exact = jax.vjp(lambda wt: layer(z, (wt, injection)), weight)[1](
        w.reshape(z.shape)
    )[0]
    adjoints = {
        "ImplicitAdjoint (GMRES)": eqxdeq.ImplicitAdjoint(),
        "ImplicitAdjoint (Richardson)": eqxdeq.ImplicitAdjoint(
            eqxdeq.Richardson(rtol=1e-6, atol=1e-6, max_steps=2000)
        ),
        "ShineAdjoint (Broyden)": eqxdeq.ShineAdjoint(),
        "PhantomAdjoint(steps=5)": eqxdeq.PhantomAdjoint(steps=5),
        "JFB": eqxdeq.JFB(),
    }
    for name, adjoint in adjoints.items():
        solver = eqxdeq.Broyden(1e-6, 1e-6)
        grad = eqx.filter_jit(jax.grad(loss))(weight, adjoint, solver)
        err = float(jnp.linalg.norm(grad - exact) / jnp.linalg.norm(exact))
        print(f"  {name:<30} {err:.2e}")


if __name__ == "__main__":
    main()
