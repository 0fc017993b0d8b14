"""The README's main job, `examples/digits.py`: a short smoke run in the default
suite, the full training run (accuracy target, plots) in the slow step."""

import importlib.util
import os

import jax
import pytest


# `jax.enable_x64` (a context manager) is recent; older jax has it only as
# `jax.experimental.enable_x64`, which newer jax no longer has.
try:
    _enable_x64 = jax.enable_x64
except AttributeError:
    from jax.experimental import enable_x64 as _enable_x64  # pyright: ignore

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "digits.py")


def _load():
    spec = importlib.util.spec_from_file_location("digits_example", _PATH)
    assert spec is not None and spec.loader is not None, _PATH
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def float32_standard():
    # The example runs as users run it: float32, standard dtype promotion.
    with _enable_x64(False), jax.numpy_dtype_promotion("standard"):
        yield


def test_digits_smoke(float32_standard, tmp_path):
    digits = _load()
    summary = digits.main(
        ["--epochs", "2", "--width", "32", "--plots", "", "--quiet", "--no-compare"]
    )
    history = summary["history"]
    assert history["loss"][1] < history["loss"][0]
    assert history["test_acc"][-1] > 0.5
    assert history["test_converged"] > 0.9


@pytest.mark.slow
def test_digits_full_run(float32_standard, tmp_path):
    digits = _load()
    summary = digits.main(["--plots", str(tmp_path), "--quiet"])
    assert summary["history"]["test_acc"][-1] >= 0.97
    for name in ("training", "residuals", "gradients", "regularisation"):
        assert (tmp_path / f"digits_{name}.png").stat().st_size > 10_000
    grads = summary["gradients"]
    assert grads["implicit"]["cosine"] == pytest.approx(1.0)
    assert grads["jfb"]["cosine"] < grads["phantom"]["cosine"] < 1.0
    # Anderson's inverse-Jacobian estimate beats JFB's identity.
    assert grads["jfb"]["cosine"] < grads["shine"]["cosine"] < 1.0
