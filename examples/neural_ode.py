"""A DEQ inside a neural ODE: fit a damped spiral with diffrax, optax and eqxdeq.

The model is the ODE dy/dt = g(y) with a vector field that contains an implicit layer,

    g(y) = V z* + c,    z* = tanh(W z* + U y + b),

whose fixed point z* is solved at every evaluation of g by `eqxdeq.nn.DEQ` (Anderson
acceleration, exact implicit gradients by `eqxdeq.ImplicitAdjoint`). diffrax
integrates the ODE with Tsit5 and differentiates the solve with its default
`diffrax.RecursiveCheckpointAdjoint`, so the gradient of the loss flows through the ODE
steps into the implicit layer's adjoint. W is rescaled to Frobenius norm at most 0.9,
so the layer stays a contraction (tanh is 1-Lipschitz) and the fixed point exists
throughout training; for the same reason the backward linear solve can be the plain
fixed-point iteration `eqxdeq.Richardson`, which converges at rate at most 0.9 (it
compiles faster than the default GMRES).

The target is the damped spiral dy/dt = A y, A = [[-0.1, -1], [1, -0.1]], observed
from four initial conditions at 40 times in [0, 6] (closed form, nothing downloaded).
The loss is the mean squared error of the predicted trajectories; `main(argv)` returns
the loss of every training step.

Run: `python examples/neural_ode.py [--steps N] [--plot PATH]`.
"""

import argparse
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, Float

import eqxdeq


HIDDEN = 16
T_END = 6.0
NUM_TIMES = 40
NUM_TRAJECTORIES = 4


def damped_spiral(ts: Float[Array, " times"], y0: Float[Array, "2"]):
    """The exact solution of dy/dt = [[-0.1, -1], [1, -0.1]] y."""
    decay = jnp.exp(-0.1 * ts)
    cos, sin = jnp.cos(ts), jnp.sin(ts)
    return jnp.stack(
        [decay * (cos * y0[0] - sin * y0[1]), decay * (sin * y0[0] + cos * y0[1])],
        axis=-1,
    )


def make_data():
    ts = jnp.linspace(0.0, T_END, NUM_TIMES)
    angles = jnp.linspace(0.0, 2 * jnp.pi, NUM_TRAJECTORIES, endpoint=False)
    y0s = 2.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    ys = jax.vmap(damped_spiral, in_axes=(None, 0))(ts, y0s)
    return ts, y0s, ys  # (times,), (batch, 2), (batch, times, 2)


class Cell(eqx.Module):
    """z ↦ tanh(W z + x), with W rescaled to Frobenius norm at most 0.9."""

    weight: Float[Array, "hidden hidden"]

    def __call__(self, z, x, *, key=None):
        del key
        norm = jnp.sqrt(jnp.sum(self.weight**2))
        weight = self.weight * (0.9 / jnp.maximum(norm, 0.9))
        return jnp.tanh(weight @ z + x)


class ImplicitField(eqx.Module):
    """The vector field g(y) = V z*(y) + c, z*(y) = tanh(W z* + U y + b)."""

    deq: eqxdeq.nn.DEQ
    inject: eqx.nn.Linear  # y ↦ U y + b
    readout: eqx.nn.Linear  # z* ↦ V z* + c

    def __init__(self, key):
        wkey, ukey, vkey = jr.split(key, 3)
        weight = jr.normal(wkey, (HIDDEN, HIDDEN)) / HIDDEN
        self.deq = eqxdeq.nn.DEQ(
            Cell(weight),
            (HIDDEN,),
            eqxdeq.Anderson(rtol=1e-5, atol=1e-5),
            adjoint=eqxdeq.ImplicitAdjoint(
                linear_solver=eqxdeq.Richardson(rtol=1e-6, atol=1e-6, max_steps=200)
            ),
            max_steps=50,
        )
        self.inject = eqx.nn.Linear(2, HIDDEN, key=ukey)
        self.readout = eqx.nn.Linear(HIDDEN, 2, key=vkey)

    def __call__(self, t, y, args):
        del t, args
        z_star, _ = self.deq(self.inject(y))
        return self.readout(z_star)


def predict(field, ts, y0):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Tsit5(),
        t0=ts[0],
        t1=ts[-1],
        dt0=ts[1] - ts[0],
        y0=y0,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.ConstantStepSize(),
        # The default, written out: backpropagation through the ODE solver's steps.
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
    )
    assert sol.ys is not None
    return sol.ys


def loss_fn(field, ts, y0s, ys):
    pred = jax.vmap(predict, in_axes=(None, None, 0))(field, ts, y0s)
    return jnp.mean((pred - ys) ** 2)


@eqx.filter_jit
def train_step(field, opt_state, optimiser, ts, y0s, ys):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(field, ts, y0s, ys)
    updates, opt_state = optimiser.update(
        grads, opt_state, eqx.filter(field, eqx.is_array)
    )
    return eqx.apply_updates(field, updates), opt_state, loss


def plot(field, ts, y0s, ys, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = jnp.linspace(ts[0], ts[-1], 200)
    pred = jax.vmap(predict, in_axes=(None, None, 0))(field, fine, y0s)
    fig, ax = plt.subplots(figsize=(5, 5))
    for b in range(ys.shape[0]):
        ax.plot(ys[b, :, 0], ys[b, :, 1], "o", ms=3, color=f"C{b}")
        ax.plot(pred[b, :, 0], pred[b, :, 1], "-", color=f"C{b}")
    ax.set_title("damped spiral (dots) and the DEQ neural ODE (lines)")
    ax.set_aspect("equal")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Fit a damped spiral with a neural ODE whose vector field is a DEQ."
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--lr", type=float, default=3e-2, help="Adam learning rate")
    parser.add_argument("--plot", default=None, help="write a PNG of the fit here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    ts, y0s, ys = make_data()
    field = ImplicitField(jr.PRNGKey(0))
    optimiser = optax.adam(args.lr)
    opt_state = optimiser.init(eqx.filter(field, eqx.is_array))
    every = max(1, args.steps // 10)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        field, opt_state, loss = train_step(field, opt_state, optimiser, ts, y0s, ys)
        losses.append(float(loss))
        if step % every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:4d}  loss {losses[-1]:.5f}  ({elapsed:.1f} s)")
    if args.plot is not None:
        plot(field, ts, y0s, ys, args.plot)
        print(f"wrote {args.plot}")
    # The loss of the last training step (before its update): evaluating the trained
    # model once more would compile the forward solve a second time.
    print(f"final loss: {losses[-1]:.6f}")
    return losses


if __name__ == "__main__":
    main()
