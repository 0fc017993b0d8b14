"""Train a deep equilibrium classifier on scikit-learn's handwritten digits.

    python examples/digits.py                      # train, evaluate, write plots
    python examples/digits.py --solver broyden --adjoint jfb --epochs 10
    python examples/digits.py --jac-reg 0          # no Jacobian regularisation

The model is `decoder(z*)` with `z* = cell(z*, encoder(x))` (a small convolutional
encoder), the cell
`z ↦ tanh(W z + u) ⊙ mask` with a variational-dropout mask fixed for the whole solve,
solved per sample (`jax.vmap`) with `eqxdeq.nn.DEQ`. It trains with optax's Adam under
`eqx.filter_jit`, with `throw=False` solves (a sample that does not converge does not
stop training; the fraction that converged is reported), and an optional Jacobian
penalty (`eqxdeq.regularization.jacobian_frobenius`) that keeps the cell contractive
and the solves short.

After training it writes PNG plots (see `--plots`): the training curves; residual vs
iteration for Picard, Anderson and Broyden on the trained model; each gradient method's
time against its cosine similarity with the exact gradient; and, unless
`--no-compare`, a second model trained without (or with) the Jacobian penalty, for the
mean forward f-evaluations at the accuracy each reaches. Everything runs on CPU;
nothing is downloaded (the digits ship with scikit-learn).
"""

import argparse
import json
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import optimistix as optx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import eqxdeq


SOLVERS = {
    "anderson": lambda tol: eqxdeq.Anderson(tol, tol),
    "broyden": lambda tol: eqxdeq.Broyden(tol, tol),
    "picard": lambda tol: eqxdeq.Picard(tol, tol),
}
ADJOINTS = {
    # Exact implicit gradient: the default backward solver, `eqxdeq.GMRES` to a
    # relative residual of 1e-5 in float32.
    "implicit": lambda: eqxdeq.ImplicitAdjoint(),
    "jfb": lambda: eqxdeq.JFB(),
    # Anderson's inverse-Jacobian estimate in place of JFB's identity.
    "shine": lambda: eqxdeq.ShineAdjoint(),
    "phantom": lambda: eqxdeq.PhantomAdjoint(steps=5, damping=0.8),
    "bptt": lambda: optx.RecursiveCheckpointAdjoint(),
}


class Cell(eqx.Module):
    """`z ↦ tanh(W z + u) ⊙ mask`: `u` is the input injection, the mask a
    variational-dropout mask (one per solve)."""

    linear: eqx.nn.Linear
    dropout: eqxdeq.nn.VariationalDropout

    def __init__(self, width, dropout, *, key):
        self.linear = eqx.nn.Linear(width, width, key=key)
        # Start contractive: ‖W‖₂ ≈ 0.5.
        weight = self.linear.weight
        self.linear = eqx.tree_at(
            lambda lin: lin.weight,
            self.linear,
            0.5 * weight / jnp.linalg.norm(weight, 2),
        )
        self.dropout = eqxdeq.nn.VariationalDropout(dropout)

    def __call__(self, z, u, *, key=None):
        return self.dropout(jnp.tanh(self.linear(z) + u), key=key)


class Stem(eqx.Module):
    """A small convolutional stem: the 8×8 image to the injection of the DEQ."""

    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, width, channels=32, *, key):
        ckey, lkey = jr.split(key)
        self.conv = eqx.nn.Conv2d(1, channels, 3, padding=1, key=ckey)
        self.linear = eqx.nn.Linear(channels * 16, width, key=lkey)

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x.reshape(1, 8, 8)))
        h = h.reshape(h.shape[0], 4, 2, 4, 2).max(axis=(2, 4))  # 2×2 max-pool
        return self.linear(h.reshape(-1))


class Classifier(eqx.Module):
    encoder: Stem
    deq: eqxdeq.nn.DEQ
    decoder: eqx.nn.Linear

    def __init__(self, width, solver, adjoint, dropout, max_steps, *, key):
        ekey, ckey, dkey = jr.split(key, 3)
        # A small explicit stem, then the implicit layer, then a linear read-out.
        self.encoder = Stem(width, key=ekey)
        self.deq = eqxdeq.nn.DEQ(
            Cell(width, dropout, key=ckey),
            (width,),
            solver,
            adjoint=adjoint,
            max_steps=max_steps,
            # Test time: twice the step budget (torchdeq's eval_factor).
            inference_max_steps=2 * max_steps,
        )
        self.decoder = eqx.nn.Linear(width, 10, key=dkey)

    def __call__(self, x, *, key=None):
        """Logits, the fixed point, the injection and the solve's statistics for
        one sample."""
        u = self.encoder(x)
        z, stats = self.deq(u, key=key)
        return self.decoder(z), z, u, stats


def cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def loss_fn(model, x, y, key, jac_reg):
    batch = x.shape[0]
    keys = jr.split(key, 2 * batch)
    logits, z, u, stats = jax.vmap(model)(x, key=keys[:batch])
    loss = cross_entropy(logits, y)
    if jac_reg > 0:
        # ‖∂f/∂z‖_F² / n at z* by Hutchinson's estimator, per sample (one vjp each).
        # The cell sees the same dropout key as in the solve.
        def penalty(z_i, u_i, solve_key, probe_key):
            cell_key = jr.split(solve_key)[1]
            return eqxdeq.regularization.jacobian_frobenius(
                lambda zz: model.deq.cell(zz, u_i, key=cell_key),
                z_i,
                key=probe_key,
                normalise=True,
            )

        reg = jax.vmap(penalty)(z, u, keys[:batch], keys[batch:])
        loss = loss + jac_reg * jnp.mean(reg)
    return loss, stats


@eqx.filter_jit
def train_step(model, opt_state, x, y, key, optimiser, jac_reg):
    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
    (loss, stats), grads = grad_fn(model, x, y, key, jac_reg)
    updates, opt_state = optimiser.update(
        grads, opt_state, eqx.filter(model, eqx.is_array)
    )
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss, stats


@eqx.filter_jit
def evaluate(model, x, y):
    model = eqx.nn.inference_mode(model)
    logits, _, _, stats = jax.vmap(model)(x)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return accuracy, stats


@eqx.filter_jit
def ema_update(averaged, model, decay):
    """Polyak averaging of the parameters: the model evaluated at the end."""
    params = eqx.filter(model, eqx.is_inexact_array)
    old = eqx.filter(averaged, eqx.is_inexact_array)
    new = jax.tree_util.tree_map(lambda a, p: decay * a + (1 - decay) * p, old, params)
    return eqx.combine(new, eqx.filter(model, eqx.is_inexact_array, inverse=True))


def load_data(seed):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    return tuple(map(jnp.asarray, (x_train, y_train, x_test, y_test)))


def train(args, jac_reg, *, desc="train", quiet=False):
    """Train one model; returns it with its history (per-epoch loss, accuracies,
    mean forward f-evaluations)."""
    x_train, y_train, x_test, y_test = load_data(args.seed)
    key = jr.PRNGKey(args.seed)
    mkey, key = jr.split(key)
    model = Classifier(
        args.width,
        SOLVERS[args.solver](args.tol),
        ADJOINTS[args.adjoint](),
        args.dropout,
        args.max_steps,
        key=mkey,
    )
    steps_per_epoch = len(x_train) // args.batch_size
    schedule = optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch)
    optimiser = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))
    averaged = model
    history = {"loss": [], "train_acc": [], "test_acc": [], "fn_evals": []}
    rng = np.random.default_rng(args.seed)
    bar = tqdm(range(args.epochs), desc=desc, disable=quiet)
    for _ in bar:
        order = rng.permutation(len(x_train))
        losses, evals, converged = [], [], []
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            key, skey = jr.split(key)
            model, opt_state, loss, stats = train_step(
                model, opt_state, x_train[idx], y_train[idx], skey, optimiser, jac_reg
            )
            averaged = ema_update(averaged, model, args.ema)
            losses.append(loss)
            evals.append(jnp.mean(stats.num_fn_evals))
            converged.append(jnp.mean(stats.successful))
        train_acc, _ = evaluate(averaged, x_train, y_train)
        test_acc, test_stats = evaluate(averaged, x_test, y_test)
        history["loss"].append(float(np.mean(losses)))
        history["train_acc"].append(float(train_acc))
        history["test_acc"].append(float(test_acc))
        history["fn_evals"].append(float(np.mean(evals)))
        bar.set_postfix(
            loss=f"{history['loss'][-1]:.3f}",
            acc=f"{float(test_acc):.3f}",
            steps=f"{history['fn_evals'][-1]:.1f}",
            conv=f"{float(np.mean(converged)):.2f}",
        )
    _, test_stats = evaluate(averaged, x_test, y_test)
    history["test_fn_evals"] = float(jnp.mean(test_stats.num_fn_evals))
    history["test_converged"] = float(jnp.mean(test_stats.successful))
    return averaged, history


def residual_traces(model, x, tol, steps=60):
    """Residual ‖f(z) − z‖₂ per iteration, mean over test samples, for each solver
    on the trained cell (no tolerance stop: `rtol = atol = 0`)."""
    cell = eqx.nn.inference_mode(model.deq.cell)
    u = jax.vmap(model.encoder)(x)
    traces = {}
    for name, make in SOLVERS.items():
        solver = make(0.0)
        solver = eqx.tree_at(lambda s: s.history_length, solver, steps)

        @eqx.filter_jit
        def solve(solver, u):
            def one(u_i):
                return optx.fixed_point(
                    lambda z, a: cell(z, a),
                    solver,
                    jnp.zeros(u_i.shape),
                    u_i,
                    max_steps=steps,
                    throw=False,
                ).stats["residual_history"]

            return jax.vmap(one)(u)

        history = np.asarray(solve(solver, u))
        # Mean over the samples still running at each iteration (a sample that
        # stopped early, e.g. on a stall, is NaN-padded).
        valid = np.isfinite(history) & (history > 0)
        count = valid.sum(axis=0)
        total = np.where(valid, history, 0).sum(axis=0)
        traces[name] = (total / np.maximum(count, 1))[count > 0]
    return traces


def gradient_comparison(model, x, y, tol, repeats=5):
    """For each adjoint: time of one forward+backward pass on a batch (best of
    `repeats`) and cosine similarity of the gradient with the exact implicit one."""
    results = {}
    flat = {}
    for name, make in ADJOINTS.items():
        m = eqx.tree_at(lambda mm: mm.deq.adjoint, model, make())
        m = eqx.tree_at(
            lambda mm: mm.deq.solver, m, SOLVERS["anderson"](min(tol, 1e-5))
        )
        m = eqx.nn.inference_mode(m, value=False)
        m = eqx.tree_at(lambda mm: mm.deq.cell.dropout.p, m, 0.0)

        @eqx.filter_jit
        def grad(m, x, y):
            return eqx.filter_grad(lambda mm: loss_fn(mm, x, y, jr.PRNGKey(0), 0.0)[0])(
                m
            )

        g = grad(m, x, y)
        jax.block_until_ready(g)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(grad(m, x, y))
            times.append(time.perf_counter() - start)
        leaves = jax.tree_util.tree_leaves(eqx.filter(g, eqx.is_inexact_array))
        flat[name] = np.concatenate([np.ravel(a) for a in leaves])
        results[name] = {"time_ms": 1e3 * min(times)}
    exact = flat["implicit"]
    for name, vec in flat.items():
        cosine = vec @ exact / (np.linalg.norm(vec) * np.linalg.norm(exact))
        results[name]["cosine"] = float(cosine)
    return results


def make_plots(outdir, history, traces, grads, comparison):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    ax1.plot(epochs, history["loss"], "o-")
    ax1.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax2.plot(epochs, history["train_acc"], "o-", label="train")
    ax2.plot(epochs, history["test_acc"], "s-", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0.8, 1.0))
    ax2.legend()
    fig.tight_layout()
    paths.append(os.path.join(outdir, "digits_training.png"))
    fig.savefig(paths[-1], dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, trace in traces.items():
        ax.semilogy(np.arange(1, len(trace) + 1), trace, label=name)
    ax.set(
        xlabel="iteration (evaluations of f)",
        ylabel="mean ‖f(z) − z‖₂",
        title="Forward solvers on the trained cell",
    )
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(outdir, "digits_residuals.png"))
    fig.savefig(paths[-1], dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in grads.items():
        ax.scatter(r["time_ms"], r["cosine"], s=60)
        # Each label to the right of its point (the exact methods share a cosine
        # of 1 but not a time).
        ax.annotate(
            name,
            (r["time_ms"], r["cosine"]),
            textcoords="offset points",
            xytext=(8, -4),
        )
    ax.margins(x=0.15)  # room for the labels of the rightmost points
    ax.set(
        xlabel="forward + backward time per batch (ms)",
        ylabel="cosine similarity to the exact gradient",
        title="Gradient methods",
    )
    fig.tight_layout()
    paths.append(os.path.join(outdir, "digits_gradients.png"))
    fig.savefig(paths[-1], dpi=120)

    if comparison is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, h in comparison.items():
            ax.plot(
                np.arange(1, len(h["fn_evals"]) + 1),
                h["fn_evals"],
                "o-",
                label=f"{label} (test acc {h['test_acc'][-1]:.3f})",
            )
        ax.set(
            xlabel="epoch",
            ylabel="mean forward f-evaluations (training)",
            title="Effect of Jacobian regularisation",
        )
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(outdir, "digits_regularisation.png"))
        fig.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solver", choices=sorted(SOLVERS), default="anderson")
    parser.add_argument("--adjoint", choices=sorted(ADJOINTS), default="implicit")
    parser.add_argument(
        "--jac-reg",
        type=float,
        default=0.5,
        help="weight of the Jacobian penalty (0 disables it)",
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ema",
        type=float,
        default=0.98,
        help="decay of the parameter average that is evaluated (0: the last iterate)",
    )
    parser.add_argument(
        "--plots", default="plots", help="folder for the PNG plots ('' for none)"
    )
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="skip training the second model for the regularisation comparison",
    )
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    model, history = train(args, args.jac_reg, quiet=args.quiet)
    train_time = time.perf_counter() - start
    print(
        f"trained {args.epochs} epochs in {train_time:.1f} s; forward f-evaluations "
        f"per sample: {history['fn_evals'][-1]:.1f} (train, last epoch), "
        f"{history['test_fn_evals']:.1f} (test); converged at test: "
        f"{history['test_converged']:.3f}"
    )
    summary = {"train_time_s": train_time, "history": history, "args": vars(args)}
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        _, _, x_test, y_test = load_data(args.seed)
        traces = residual_traces(model, x_test[:128], args.tol)
        grads = gradient_comparison(model, x_test[:64], y_test[:64], args.tol)
        for name, r in grads.items():
            print(
                f"gradient {name:9s}: {r['time_ms']:7.1f} ms, cosine to exact "
                f"{r['cosine']:.4f}"
            )
        comparison = None
        if not args.no_compare:
            other = 0.0 if args.jac_reg > 0 else 0.5
            _, other_history = train(
                args, other, desc=f"jac-reg {other}", quiet=args.quiet
            )
            comparison = {
                f"jac-reg {args.jac_reg}": history,
                f"jac-reg {other}": other_history,
            }
            for label, h in comparison.items():
                print(
                    f"{label}: test accuracy {h['test_acc'][-1]:.3f}, forward "
                    f"f-evaluations {h['fn_evals'][-1]:.1f} (train) "
                    f"{h['test_fn_evals']:.1f} (test)"
                )
            summary["comparison"] = comparison
        summary["gradients"] = grads
        paths = make_plots(args.plots, history, traces, grads, comparison)
        with open(os.path.join(args.plots, "digits_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print("plots written to: " + ", ".join(paths))
    print(f"test accuracy: {history['test_acc'][-1]:.3f}")
    return summary


if __name__ == "__main__":
    main()
