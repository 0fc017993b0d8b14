"""Smoke tests of the scripts in examples/: each runs its `main(argv)` with tiny
settings, in-process (so under this suite's float64 and strict promotion rules)."""

import importlib.util
import pathlib

import jax


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_neural_ode(capsys):
    """A DEQ in a diffrax vector field, trained with optax: three steps lower the
    loss, and the script ends with the `final loss:` line."""
    # optax's Adam raises a float to an integer power (its bias correction), which
    # strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        losses = _load("neural_ode").main(["--steps", "3"])
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"final loss: {losses[-1]:.6f}"
