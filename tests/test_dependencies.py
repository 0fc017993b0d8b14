"""Canaries for the optimistix, lineax and equinox internals that eqxdeq relies on.

eqxdeq pins these libraries to narrow version ranges in `pyproject.toml` because it
uses parts of them that are not public API. Each case below checks one such internal,
and fails with a message naming it, the installed versions and the tested ranges, so
that a version bump that moves an internal is caught here rather than deep inside a
solver.
"""

import ast
import importlib.metadata
import inspect
import pathlib
import textwrap
import tomllib
from collections.abc import Callable
from typing import NoReturn

import equinox.internal as eqxi
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
import pytest


_WATCHED = ("optimistix", "lineax", "equinox")


def _tested_ranges() -> str:
    """The requirements on the watched libraries, read from `pyproject.toml`."""
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        with pyproject.open("rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "see pyproject.toml"
    return ", ".join(d for d in deps if d.split(">")[0].split("<")[0] in _WATCHED)


def _installed() -> str:
    versions = []
    for name in _WATCHED:
        try:
            versions.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return ", ".join(versions)


def _fail(internal: str, detail: str) -> NoReturn:
    pytest.fail(
        f"eqxdeq relies on `{internal}`, which has moved or changed: {detail}.\n"
        f"Installed: {_installed()}.\n"
        f"eqxdeq is tested against: {_tested_ranges()}.\n"
        "Update eqxdeq for the new version, or install one in the tested range.",
        pytrace=False,
    )


def _resolve(dotted: str) -> object:
    """Import `a.b.c` by importing the longest module prefix, then `getattr`."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _get(dotted: str) -> object:
    try:
        return _resolve(dotted)
    except (ImportError, AttributeError) as e:
        _fail(dotted, f"it can no longer be imported ({type(e).__name__}: {e})")


def _check_abstract_methods(dotted: str, methods: tuple[str, ...]) -> Callable:
    def check():
        cls = _get(dotted)
        assert isinstance(cls, type)
        missing = [m for m in methods if m not in cls.__abstractmethods__]
        if missing:
            _fail(
                dotted,
                f"abstract methods {missing} are no longer abstract methods "
                f"(it now has {sorted(cls.__abstractmethods__)})",
            )

    return check


def _check_exists(dotted: str, base: str | None = None) -> Callable:
    def check():
        obj = _get(dotted)
        if base is not None:
            base_cls = _get(base)
            assert isinstance(base_cls, type)
            if not (isinstance(obj, type) and issubclass(obj, base_cls)):
                _fail(dotted, f"it is no longer a subclass of `{base}`")

    return check


def _unpacked_names(fn: Callable, source_name: str) -> list[str] | None:
    """The names in the first `(a, b, ...) = source_name` assignment in `fn`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Name)
            and node.value.id == source_name
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Tuple)
        ):
            return [
                elt.id if isinstance(elt, ast.Name) else ast.unparse(elt)
                for elt in node.targets[0].elts
            ]
    return None


def _packed_names(fn: Callable, target_name: str) -> list[str] | None:
    """The names in the first `target_name = a, b, ...` assignment in `fn`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == target_name
            and isinstance(node.value, ast.Tuple)
        ):
            return [
                elt.id if isinstance(elt, ast.Name) else ast.unparse(elt)
                for elt in node.value.elts
            ]
    return None


# The layout of the `inputs` tuple that optimistix's adjoints pass to `_iterate`.
# eqxdeq's adjoints index into it, and append their own `while_loop` as the last
# element, as optimistix's own adjoints do.
_ITERATE_INPUTS = [
    "fn",
    "solver",
    "y0",
    "args",
    "options",
    "max_steps",
    "f_struct",
    "aux_struct",
    "tags",
    "while_loop",
]


def _check_iterate_unpacks_inputs():
    internal = "optimistix._iterate._iterate"
    fn = _get(internal)
    assert callable(fn)
    names = _unpacked_names(fn, "inputs")
    if names is None:
        _fail(internal, "it no longer unpacks an `inputs` tuple")
    elif names != _ITERATE_INPUTS:
        _fail(
            internal,
            f"its `inputs` tuple is now unpacked as {names}, not {_ITERATE_INPUTS}",
        )


def _check_iterative_solve_packs_inputs():
    internal = "optimistix._iterate.iterative_solve"
    fn = _get(internal)
    assert callable(fn)
    names = _packed_names(fn, "inputs")
    expected = _ITERATE_INPUTS[:-1]
    if names != expected:
        _fail(
            internal,
            f"it now passes `inputs = {names}` to `adjoint.apply`, not {expected} "
            "(to which the adjoint appends `while_loop`)",
        )


def _check_adjoint_apply_signature():
    internal = "optimistix.AbstractAdjoint.apply"
    expected = ["self", "primal_fn", "rewrite_fn", "inputs", "tags"]
    params = list(inspect.signature(_get(internal)).parameters)  # pyright: ignore[reportArgumentType]
    if params != expected:
        _fail(internal, f"its parameters are now {params}, not {expected}")


def _check_implicit_jvp():
    internal = "optimistix.internal.implicit_jvp"
    fn = _get(internal)
    assert callable(fn)
    expected = ["fn_primal", "fn_rewrite", "inputs", "tags", "linear_solver"]
    params = list(inspect.signature(fn).parameters)
    if len(params) != len(expected):
        _fail(
            internal,
            f"it now takes parameters {params}; eqxdeq calls it positionally as "
            f"{expected}",
        )


def _check_results_member(name: str) -> Callable:
    def check():
        if not hasattr(optx.RESULTS, name):
            _fail(
                f"optimistix.RESULTS.{name}", "`optimistix.RESULTS` has no such member"
            )

    return check


def _check_while_loop(kind: str) -> Callable:
    def check():
        internal = f'equinox.internal.while_loop(..., kind="{kind}")'
        max_steps = None if kind == "lax" else 8
        try:
            out = eqxi.while_loop(
                lambda c: c < 3,
                lambda c: c + 1,
                jnp.array(0),
                max_steps=max_steps,
                kind=kind,  # pyright: ignore[reportArgumentType]
            )
        except Exception as e:
            _fail(internal, f"calling it raised {type(e).__name__}: {e}")
        if int(out) != 3:
            _fail(internal, f"a 3-step loop returned {out}")

    return check


def _check_omega():
    internal = "equinox.internal.ω"
    omega = _get(internal)
    assert callable(omega)
    try:
        out = ((omega({"a": jnp.array(1.0)}) + 1) * 2).ω  # pyright: ignore[reportAttributeAccessIssue,reportOperatorIssue]
        ok = float(out["a"]) == 4.0
    except Exception as e:
        _fail(internal, f"tree arithmetic raised {type(e).__name__}: {e}")
    if not ok:
        _fail(internal, f"`((ω({{'a': 1.0}}) + 1) * 2).ω` gave {out}")


def _check_linear_solver_abstract_methods_unchanged():
    # eqxdeq's linear solvers and solver wrappers implement exactly these; a new
    # abstract method would make them uninstantiable.
    internal = "lineax.AbstractLinearSolver"
    known = {"init", "compute", "transpose", "conj", "assume_full_rank"}
    extra = set(lx.AbstractLinearSolver.__abstractmethods__) - known
    if extra:
        _fail(internal, f"it has new abstract methods {sorted(extra)}")


def _check_operator_mv(dotted: str, make: Callable) -> Callable:
    def check():
        cls = _get(dotted)
        assert isinstance(cls, type) and issubclass(cls, lx.AbstractLinearOperator)
        x = jnp.array([1.0, 2.0])
        try:
            out = make(cls, x).mv(x)
        except Exception as e:
            _fail(dotted, f"constructing it or calling `mv` raised {e!r}")
        if not bool(jnp.allclose(out, 2 * x)):
            _fail(dotted, f"`mv` of the map `x ↦ 2x` gave {out}")

    return check


_CASES: dict[str, Callable[[], None]] = {
    # optimistix
    "optimistix.internal.implicit_jvp": _check_implicit_jvp,
    "optimistix._iterate._iterate inputs": _check_iterate_unpacks_inputs,
    "optimistix._iterate.iterative_solve inputs": _check_iterative_solve_packs_inputs,
    "optimistix.AbstractAdjoint.apply": _check_adjoint_apply_signature,
    "optimistix.AbstractFixedPointSolver": _check_abstract_methods(
        "optimistix.AbstractFixedPointSolver",
        ("init", "step", "terminate", "postprocess"),
    ),
    "optimistix.AbstractDescent": _check_abstract_methods(
        "optimistix.AbstractDescent", ("init", "query", "step")
    ),
    "optimistix.AbstractSearch": _check_abstract_methods(
        "optimistix.AbstractSearch", ("init", "step")
    ),
    "optimistix.FunctionInfo.Residual": _check_exists(
        "optimistix.FunctionInfo.Residual", base="optimistix.FunctionInfo"
    ),
    "optimistix.LearningRate": _check_exists(
        "optimistix.LearningRate", base="optimistix.AbstractSearch"
    ),
    **{
        f"optimistix.RESULTS.{name}": _check_results_member(name)
        for name in (
            "successful",
            "nonlinear_max_steps_reached",
            "nonlinear_divergence",
            "nonfinite",
        )
    },
    # equinox
    **{
        f"equinox.internal.while_loop[{kind}]": _check_while_loop(kind)
        for kind in ("lax", "checkpointed", "bounded")
    },
    "equinox.internal.ω": _check_omega,
    # lineax
    **{
        f"lineax.AbstractLinearSolver.{name}": _check_abstract_methods(
            "lineax.AbstractLinearSolver", (name,)
        )
        for name in ("init", "compute", "transpose", "conj", "assume_full_rank")
    },
    "lineax.AbstractLinearSolver no new abstract methods": (
        _check_linear_solver_abstract_methods_unchanged
    ),
    "lineax.internal.max_norm": _check_exists("lineax.internal.max_norm"),
    "lineax.JacobianLinearOperator": _check_operator_mv(
        "lineax.JacobianLinearOperator", lambda cls, x: cls(lambda y, _: 2 * y, x)
    ),
    "lineax.FunctionLinearOperator": _check_operator_mv(
        "lineax.FunctionLinearOperator",
        lambda cls, x: cls(lambda y: 2 * y, jnp.zeros_like(x)),
    ),
}


@pytest.mark.parametrize("check", list(_CASES.values()), ids=list(_CASES))
def test_internal(check):
    check()


def test_oldest_constraints_pin_the_lower_bounds():
    """CI's oldest-versions run installs with `.ci/oldest-constraints.txt`: it must
    pin every lower bound of `[project] dependencies` exactly, and jaxlib to jax."""
    from packaging.requirements import Requirement

    root = pathlib.Path(__file__).resolve().parents[1]
    with (root / "pyproject.toml").open("rb") as f:
        deps = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    lower = {r.name: s.version for r in deps for s in r.specifier if s.operator == ">="}
    pins = {}
    for line in (root / ".ci" / "oldest-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    assert pins.pop("jaxlib") == lower["jax"]
    assert pins == lower
