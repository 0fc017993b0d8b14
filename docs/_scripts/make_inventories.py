"""Regenerate the Sphinx inventories vendored in `docs/_inventories/`.

The documentation cross-references other projects (`` [`optimistix.Solution`][] ``,
`` [`lineax.GMRES`][] ``, and the type annotations in signatures). mkdocstrings
resolves such references from Sphinx `objects.inv` inventories, normally downloaded
when the site is built. The build has to work offline, so `mkdocs.yml` loads
inventories kept in this repository instead (`docs/_hooks.py` turns their paths into
`file://` URLs), and their `base_url`s make every link point at the real online
documentation. This script writes those inventories:

- `optimistix.inv`, `lineax.inv`, `equinox.inv`: every `::: name` directive in the
  project's `docs/**/*.md`, and the `members:` listed under it, on the page of the
  Markdown file the directive is in, as mkdocs lays it out (a directive in
  `docs/api/solution.md` becomes `api/solution/#optimistix.Solution`).
- `jax.inv`: every `autosummary` (with `:toctree:`), `autofunction`, `autoclass`, ...
  entry in JAX's `docs/*.rst` (the API reference `docs/jax*.rst` first), at
  `_autosummary/<name>.html#<name>` (autosummary) or `<file>.html#<name>`.
- `python.inv`: the public names of `builtins`, `typing` and `collections.abc` of the
  running interpreter, on the pages of the Python documentation for those modules.

Public top-level names documented under another path (`jax.NamedSharding` as
`jax.sharding.NamedSharding`) link to that page.

Only objects that exist in the *installed* packages are written, so the inventories
match the versions eqxdeq is built against; names documented upstream but missing
locally, and public top-level names with no documentation page, are reported on
stderr.

The projects' documentation sources are read from a git repository (a clone or a
bare mirror; by default at the tag `v<installed version>`, where that tag exists,
else at `HEAD`: JAX's tags are named otherwise, and its inventory links to the
`latest` docs, built from `HEAD`) or from a checked-out work tree (a folder with a
`docs/` folder).

Refreshing, e.g. after raising a dependency's version:

    git clone --bare https://github.com/patrick-kidger/optimistix /tmp/optimistix
    git clone --bare https://github.com/patrick-kidger/lineax /tmp/lineax
    git clone --bare https://github.com/patrick-kidger/equinox /tmp/equinox
    git clone --bare --filter=blob:none https://github.com/jax-ml/jax /tmp/jax
    .venv/bin/python docs/_scripts/make_inventories.py \
        --source optimistix=/tmp/optimistix --source lineax=/tmp/lineax \
        --source equinox=/tmp/equinox --source jax=/tmp/jax
    .venv/bin/mkdocs build --strict

(`--source NAME=PATH@REF` picks another ref; `--only NAME` regenerates one
inventory; `python.inv` needs no source.) Commit the changed `.inv` files. Run it with
the docs environment (`pip install -e '.[docs]'`): it imports the installed packages
and PyYAML (a dependency of mkdocs), and nothing else outside the standard library.
"""

from __future__ import annotations

import argparse
import builtins
import collections.abc
import dataclasses
import importlib
import importlib.metadata
import inspect
import pathlib
import posixpath
import re
import subprocess
import sys
import textwrap
import types
import typing
import zlib
from collections.abc import Iterator

import yaml


_HERE = pathlib.Path(__file__).resolve().parent
_OUT = _HERE.parent / "_inventories"

# The inventories written. Their URIs are relative to the online documentation of
# each project: the `base_url`s next to them in mkdocs.yml.
PROJECTS = ("equinox", "jax", "lineax", "optimistix", "python")


@dataclasses.dataclass(frozen=True)
class Item:
    name: str
    role: str
    uri: str  # relative to the project's base URL


def _warn(msg: str) -> None:
    print(f"make_inventories: {msg}", file=sys.stderr)


#
# Reading a project's documentation sources, from a work tree or from git.
#


class _Source:
    def __init__(self, spec: str, project: str):
        path, _, ref = spec.partition("@")
        self.path = pathlib.Path(path).expanduser().resolve()
        if (self.path / "docs").is_dir() and not ref:
            self.git_dir = None
            self.ref = None
            where = "work tree"
        else:
            self.git_dir = self._find_git_dir(self.path)
            if not ref:
                ref = "HEAD"
                version = _version(project)
                if version is not None and self._git("tag", "-l", f"v{version}"):
                    ref = f"v{version}"
            self.ref = ref
            where = f"git {self._git('rev-parse', '--short', ref + '^{commit}')}"
            where += f" ({ref})"
        _warn(f"{project}: reading {self.path} [{where}]")

    @staticmethod
    def _find_git_dir(path: pathlib.Path) -> pathlib.Path:
        for candidate in (path / ".git", path):
            if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
                return candidate
        raise SystemExit(f"{path} is neither a git repository nor a work tree")

    def _git(self, *args: str) -> str:
        return subprocess.run(
            ["git", f"--git-dir={self.git_dir}", *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def files(self) -> list[str]:
        """All paths under docs/, relative to the repository root."""
        if self.git_dir is None:
            return sorted(
                p.relative_to(self.path).as_posix()
                for p in (self.path / "docs").rglob("*")
                if p.is_file()
            )
        names = self._git("ls-tree", "-r", "--name-only", self.ref, "docs/")
        return sorted(names.splitlines())

    def read(self, name: str) -> str:
        if self.git_dir is None:
            return (self.path / name).read_text(encoding="utf-8")
        return self._git("show", f"{self.ref}:{name}")


def _version(project: str) -> str | None:
    try:
        return importlib.metadata.version(project)
    except importlib.metadata.PackageNotFoundError:
        return None


#
# Resolving names in the installed packages.
#

_MISSING = object()


def _resolve(name: str) -> object:
    """The installed object called `name` (a dotted path), or `_MISSING`."""
    pieces = name.split(".")
    for i in range(len(pieces), 0, -1):
        try:
            obj = importlib.import_module(".".join(pieces[:i]))
        except Exception:
            continue
        for attr in pieces[i:]:
            try:
                obj = inspect.getattr_static(obj, attr)
            except AttributeError:
                return _MISSING
        return obj
    return _MISSING


def _role(obj: object, *, member: bool) -> str:
    if isinstance(obj, types.ModuleType):
        return "module"
    if isinstance(obj, type):
        return "exception" if issubclass(obj, BaseException) else "class"
    if isinstance(obj, (staticmethod, classmethod)):
        return "method"
    if isinstance(obj, property):
        return "property"
    if callable(obj):
        return "method" if member else "function"
    return "attribute" if member else "data"


def _public_names(module: str) -> list[str]:
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in vars(mod) if not n.startswith("_")]
    return sorted(
        n for n in names if not isinstance(getattr(mod, n, None), types.ModuleType)
    )


def _finish(project: str, items: dict[str, Item]) -> list[Item]:
    """Add the public top-level names that are documented under another name.

    (`jax.NamedSharding` is documented as `jax.sharding.NamedSharding`, say.) Report
    those that are documented nowhere, and sort.
    """
    documented = {}
    for name, item in items.items():
        obj = _resolve(name)
        if isinstance(obj, (type, types.FunctionType)):
            documented.setdefault(id(obj), item)
    undocumented = []
    for name in _public_names(project):
        full = f"{project}.{name}"
        if full in items:
            continue
        item = documented.get(id(_resolve(full)))
        if item is None:
            undocumented.append(full)
        else:
            items[full] = Item(full, item.role, item.uri)
    if undocumented:
        _warn(f"{project}: public but on no page: {', '.join(undocumented)}")
    return sorted(items.values(), key=lambda item: item.name)


#
# mkdocs projects: `::: name` directives in docs/**/*.md.
#

_DIRECTIVE = re.compile(r"^(?P<indent>\s*)::: (?P<name>[\w.]+)\s*$")


def _page_url(md_path: str) -> str:
    """mkdocs' URL (with `use_directory_urls: true`) of `docs/<md_path>`."""
    page = posixpath.splitext(posixpath.relpath(md_path, "docs"))[0]
    if page == "index":
        return ""
    if page.endswith("/index"):
        return page[: -len("index")]
    return page + "/"


def _directives(text: str) -> Iterator[tuple[str, dict]]:
    """`(name, options)` for each `::: name` directive in a Markdown file."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if match is None:
            continue
        indent = len(match["indent"].expandtabs())
        block = []
        for next_line in lines[i + 1 :]:
            if next_line.strip() and len(next_line) - len(next_line.lstrip()) <= indent:
                break
            block.append(next_line)
        config = yaml.safe_load(textwrap.dedent("\n".join(block))) if block else None
        options = (config or {}).get("options") or {}
        yield match["name"], options


def _mkdocs_items(project: str, source: _Source) -> list[Item]:
    items: dict[str, Item] = {}
    missing = []

    def add(name: str, uri: str, *, member: bool) -> None:
        obj = _resolve(name)
        if obj is _MISSING:
            missing.append(name)
        elif name in items:
            if items[name].uri != uri:
                _warn(f"{name}: on {items[name].uri} and {uri}; keeping the first")
        else:
            items[name] = Item(name, _role(obj, member=member), uri)

    for md in (f for f in source.files() if f.endswith(".md")):
        page = _page_url(md)
        for name, options in _directives(source.read(md)):
            if not name.startswith(project + ".") and name != project:
                continue
            add(name, f"{page}#{name}", member=False)
            members = options.get("members", True)
            if isinstance(members, list):
                for member in members:
                    add(f"{name}.{member}", f"{page}#{name}.{member}", member=True)
            elif members is True:
                # No `members:` option: mkdocstrings shows the object's own public
                # members.
                obj = _resolve(name)
                if isinstance(obj, type):
                    for member in vars(obj):
                        if not member.startswith("_"):
                            full = f"{name}.{member}"
                            add(full, f"{page}#{full}", member=True)
    if missing:
        _warn(f"{project}: documented but not installed: {', '.join(missing)}")
    return _finish(project, items)


#
# JAX: Sphinx reST in docs/*.rst.
#

_RST_DIRECTIVE = re.compile(
    r"^(?P<indent>\s*)\.\. (?P<directive>[\w:-]+)::\s*(?P<arg>.*)$"
)
_AUTODOC = {
    "autoclass": "class",
    "autoexception": "exception",
    "autofunction": "function",
    "autodata": "data",
    "automethod": "method",
    "autoattribute": "attribute",
    "autoproperty": "property",
}


def _rst_blocks(lines: list[str], start: int, indent: int) -> Iterator[str]:
    """The lines after `lines[start]` that are indented more than `indent`."""
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            return
        yield line


def _jax_items(source: _Source) -> list[Item]:
    items: dict[str, Item] = {}
    missing = []

    def add(name: str, uri: str, role: str | None = None) -> None:
        obj = _resolve(name)
        if obj is _MISSING:
            missing.append(name)
        elif name not in items:
            member = not isinstance(_resolve(name.rpartition(".")[0]), types.ModuleType)
            items[name] = Item(name, role or _role(obj, member=member), uri)

    def full_name(module: str, name: str) -> str:
        name = name.lstrip("~")
        if module and not name.startswith(module + "."):
            candidate = f"{module}.{name}"
            if _resolve(candidate) is not _MISSING or _resolve(name) is _MISSING:
                return candidate
        return name

    # The API reference (docs/jax*.rst) first, so that its pages win over other pages
    # (docs/errors.rst, ...) documenting the same object.
    rsts = [f for f in source.files() if re.fullmatch(r"docs/[\w.-]+\.rst", f)]
    rsts.sort(key=lambda f: (not f.startswith("docs/jax"), f))
    for rst in rsts:
        page = posixpath.splitext(posixpath.relpath(rst, "docs"))[0] + ".html"
        lines = source.read(rst).splitlines()
        module = ""
        for i, line in enumerate(lines):
            match = _RST_DIRECTIVE.match(line)
            if match is None:
                continue
            directive, arg = match["directive"], match["arg"].strip()
            indent = len(match["indent"])
            if directive in ("currentmodule", "module", "py:module", "automodule"):
                module = arg
                if directive != "currentmodule":
                    add(module, f"{page}#module-{module}", "module")
            elif directive in _AUTODOC or directive.removeprefix("py:") in _AUTODOC:
                name = full_name(module, arg.split("(")[0].strip())
                add(name, f"{page}#{name}")
            elif directive == "autosummary":
                body = list(_rst_blocks(lines, i, indent))
                if not any(b.strip().startswith(":toctree:") for b in body):
                    continue  # a table of objects documented elsewhere
                for entry in body:
                    entry = entry.strip()
                    if entry and not entry.startswith((":", "..")):
                        name = full_name(module, entry.split()[0])
                        add(name, f"_autosummary/{name}.html#{name}")
    if missing:
        _warn(f"jax: documented but not installed: {', '.join(missing)}")
    return _finish("jax", items)


#
# Python: a small inventory of the builtins, `typing` and `collections.abc`.
#


def _python_items() -> list[Item]:
    items = []
    for name in dir(builtins):
        obj = getattr(builtins, name)
        if name.startswith("_") and name != "__import__":
            continue
        if isinstance(obj, type) and issubclass(obj, BaseException):
            items.append(Item(name, "exception", f"library/exceptions.html#{name}"))
        elif name in ("copyright", "credits", "exit", "license", "quit"):
            items.append(Item(name, "data", f"library/constants.html#{name}"))
        elif isinstance(obj, type) or callable(obj):
            role = "class" if isinstance(obj, type) else "function"
            items.append(Item(name, role, f"library/functions.html#{name}"))
    for name in ("None", "True", "False", "Ellipsis", "NotImplemented"):
        items.append(Item(name, "data", f"library/constants.html#{name}"))
    for module in (typing, collections.abc):
        page = f"library/{module.__name__}.html"
        items.append(
            Item(module.__name__, "module", f"{page}#module-{module.__name__}")
        )
        for name in module.__all__:
            if name.startswith("_") or not hasattr(module, name):
                continue
            full = f"{module.__name__}.{name}"
            obj = getattr(module, name)
            role = "class" if isinstance(obj, type) else "data"
            if isinstance(obj, types.FunctionType):
                role = "function"
            items.append(Item(full, role, f"{page}#{full}"))
    return sorted(set(items), key=lambda item: item.name)


#
# Writing.
#


def _write(project: str, version: str, items: list[Item]) -> None:
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{i.name} py:{i.role} 1 {i.uri} -\n" for i in items)
    path = _OUT / f"{project}.inv"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(header.encode() + zlib.compress(body.encode(), 9))
    _warn(f"wrote {path.relative_to(_HERE.parent.parent)}: {len(items)} objects")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for how to refresh the inventories.",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=PATH[@REF]",
        help="documentation sources of optimistix, lineax, equinox or jax",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=PROJECTS,
        help="inventories to write",
    )
    args = parser.parse_args()
    sources = dict(spec.split("=", 1) for spec in args.source)
    for project in args.only or PROJECTS:
        if project == "python":
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            _write(project, version, _python_items())
            continue
        if project not in sources:
            raise SystemExit(f"needs --source {project}=PATH (see --help)")
        source = _Source(sources[project], project)
        if project == "jax":
            items = _jax_items(source)
        else:
            items = _mkdocs_items(project, source)
        _write(project, _version(project) or "", items)


if __name__ == "__main__":
    main()
