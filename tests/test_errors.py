"""Bad input is rejected with a `ValueError` naming the argument; unusual but valid
input (integer `y0`, `max_steps=0`) behaves as documented here."""

import pathlib

import jax.numpy as jnp
import optimistix as optx
import pytest

import eqxdeq


def _halve(y, args):
    del args
    return 0.5 * y + 1


#
# `fn` and `y0` disagree.
#


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda y, args: (y, y), id="structure"),
        pytest.param(lambda y, args: jnp.concatenate([y, y]), id="shape"),
        pytest.param(lambda y, args: y.astype(jnp.float32), id="dtype"),
    ],
)
@pytest.mark.parametrize(
    "solver",
    [
        eqxdeq.Picard(1e-6, 1e-6),
        eqxdeq.Anderson(1e-6, 1e-6),
        eqxdeq.Broyden(1e-6, 1e-6),
    ],
)
def test_output_must_match_input(fn, solver):
    with pytest.raises(ValueError, match="must have the same structure"):
        optx.fixed_point(fn, solver, jnp.zeros(3))


#
# Constructor arguments.
#


@pytest.mark.parametrize(
    "make,argument",
    [
        (lambda: eqxdeq.Anderson(1e-6, 1e-6, memory=0), "memory"),
        (lambda: eqxdeq.Broyden(1e-6, 1e-6, memory=0), "memory"),
        (lambda: eqxdeq.AndersonDescent(memory=0), "memory"),
        (lambda: eqxdeq.BroydenDescent(memory=0), "memory"),
        (lambda: eqxdeq.Picard(1e-6, 1e-6, relaxation=0.0), "relaxation"),
        (lambda: eqxdeq.Picard(1e-6, 1e-6, relaxation=1.5), "relaxation"),
        (lambda: eqxdeq.Anderson(1e-6, 1e-6, relaxation=-1.0), "relaxation"),
        (lambda: eqxdeq.Picard(-1e-6, 1e-6), "rtol"),
        (lambda: eqxdeq.Anderson(1e-6, -1e-6), "atol"),
        (lambda: eqxdeq.Broyden(float("nan"), 1e-6), "rtol"),
        (lambda: eqxdeq.Picard(1e-6, 1e-6, history_length=-1), "history_length"),
        (lambda: eqxdeq.Termination(stall_patience=0), "stall_patience"),
        (lambda: eqxdeq.Termination(divergence_factor=0.5), "divergence_factor"),
        (lambda: eqxdeq.Termination(stall_tol=1.0), "stall_tol"),
        (
            lambda: eqxdeq.DerivativeFreeBacktracking(decrease_factor=1.5),
            "decrease_factor",
        ),
        (lambda: eqxdeq.DerivativeFreeBacktracking(step_init=0.0), "step_init"),
        (
            lambda: eqxdeq.DerivativeFreeBacktracking(max_backtracks=0),
            "max_backtracks",
        ),
        (
            lambda: eqxdeq.DescentSearchSolver(
                -1.0,
                1e-6,
                descent=eqxdeq.PicardDescent(),
                search=optx.LearningRate(1.0),
            ),
            "rtol",
        ),
    ],
)
def test_bad_value(make, argument):
    with pytest.raises(ValueError, match=rf"\({argument}=\.\.\.\)"):
        make()


@pytest.mark.parametrize(
    "make,argument",
    [
        (lambda: eqxdeq.Termination(criterion="foo"), "criterion"),  # pyright: ignore
        (lambda: eqxdeq.Picard(1e-6, 1e-6, termination="norm"), "termination"),  # pyright: ignore
        (lambda: eqxdeq.Broyden(1e-6, 1e-6, history_length=2.5), "history_length"),  # pyright: ignore
        (
            lambda: eqxdeq.DescentSearchSolver(
                1e-6,
                1e-6,
                descent=object(),  # pyright: ignore
                search=optx.LearningRate(1.0),
            ),
            "descent",
        ),
        (
            lambda: eqxdeq.DescentSearchSolver(
                1e-6,
                1e-6,
                descent=eqxdeq.PicardDescent(),
                search=0.5,  # pyright: ignore
            ),
            "search",
        ),
    ],
)
def test_bad_type(make, argument):
    # A `ValueError` from `__check_init__`; under the test-suite's jaxtyping import
    # hook the annotation is checked first and a `TypeError` (`TypeCheckError`) is
    # raised instead. Both name the argument.
    with pytest.raises((ValueError, TypeError), match=argument):
        make()


def test_good_arguments():
    # The boundaries of the valid ranges are accepted.
    eqxdeq.Picard(0.0, 0.0, relaxation=1.0, history_length=0)
    eqxdeq.Anderson(1e-6, 1e-6, memory=1, relaxation=1e-3)
    eqxdeq.Broyden(1e-6, 1e-6, memory=1, line_search=True)
    eqxdeq.Termination(stall_patience=1, divergence_factor=None)


#
# Unusual but valid input.
#


def test_integer_y0_is_cast_to_float():
    # optimistix casts an integer `y0` to the default floating dtype (float64 here).
    sol = optx.fixed_point(_halve, eqxdeq.Picard(1e-10, 1e-10), jnp.array(0))
    assert sol.value.dtype == jnp.float64
    assert jnp.abs(sol.value - 2) < 1e-9


@pytest.mark.parametrize(
    "solver",
    [
        eqxdeq.Picard(1e-8, 1e-8),
        eqxdeq.Anderson(1e-8, 1e-8),
        eqxdeq.Broyden(1e-8, 1e-8),
    ],
)
def test_max_steps_zero(solver):
    # No evaluation at all: y0 is returned, the residuals are unknown (+∞), and the
    # solve has run out of steps.
    y0 = jnp.array([0.0, 1.0])
    sol = optx.fixed_point(_halve, solver, y0, max_steps=0, throw=False)
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert sol.stats["result"] == eqxdeq.RESULTS.nonlinear_max_steps_reached
    assert sol.stats["num_steps"] == sol.stats["num_fn_evals"] == 0
    assert jnp.array_equal(sol.value, y0)
    assert sol.stats["abs_residual"] == jnp.inf
    assert sol.stats["best_abs_residual"] == jnp.inf


#
# Results: the documented list, and how to read them.
#

_RESULTS_PAGE = (
    pathlib.Path(__file__).resolve().parents[1] / "docs/api/results_stats.md"
)
_BEGIN = "<!-- BEGIN RESULTS: generated by `python tests/test_errors.py` -->"
_END = "<!-- END RESULTS -->"


def results_list() -> str:
    """Every `eqxdeq.RESULTS` member with its message, as the markdown list of the
    results page."""
    lines = []
    for name, item in eqxdeq.RESULTS._name_to_item.items():
        message = " ".join(eqxdeq.RESULTS[item].split())
        lines.append(f"- `RESULTS.{name}`: {message or '(no message)'}")
    return "\n".join(lines)


def _documented_list() -> str:
    text = _RESULTS_PAGE.read_text()
    start = text.index(_BEGIN) + len(_BEGIN)
    return text[start : text.index(_END)].strip()


def test_results_page_lists_every_result():
    assert _documented_list() == results_list(), (
        "docs/api/results_stats.md is out of date with eqxdeq.RESULTS; regenerate "
        "its list with `python tests/test_errors.py`."
    )


def test_reading_results():
    # The snippets of the results page.
    solver = eqxdeq.Picard(1e-8, 1e-8, termination=eqxdeq.Termination(stall_patience=5))
    good = optx.fixed_point(_halve, solver, jnp.zeros(2), throw=False)
    assert good.result == optx.RESULTS.successful
    assert eqxdeq.RESULTS[good.stats["result"]] == ""
    stall = lambda y, args: 2 * jnp.cos(3 * y)
    bad = optx.fixed_point(stall, solver, jnp.zeros(2), throw=False)
    assert not bad.result == optx.RESULTS.successful
    assert bad.result == optx.RESULTS.nonlinear_divergence
    assert bad.stats["result"] == eqxdeq.RESULTS.stalled
    assert eqxdeq.RESULTS[bad.stats["result"]].startswith(
        "The fixed-point iteration stalled"
    )
    assert eqxdeq.RESULTS.promote(bad.result) == eqxdeq.RESULTS.nonlinear_divergence


if __name__ == "__main__":
    # Regenerate the list of results in docs/api/results_stats.md.
    text = _RESULTS_PAGE.read_text()
    start = text.index(_BEGIN) + len(_BEGIN)
    end = text.index(_END)
    _RESULTS_PAGE.write_text(
        text[:start] + "\n\n" + results_list() + "\n\n" + text[end:]
    )
    print(f"wrote {_RESULTS_PAGE}")
