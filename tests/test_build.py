"""Keeps BUILD true to the tree: each source in one target, imports that point down.

BUILD is Starlark, which for our purposes is Python: a list of calls with literal
keyword arguments, so ``ast`` reads it without Bazel. The layering rules are checked on
the imports themselves (``ast`` over every source, function-level imports included), so
adding a dep to BUILD cannot make a forbidden edge legal.

  pallas_kernels   imports nothing of ours
  specjax          imports no experiments, checkpoints or tests
  checkpoints      imports specjax; never experiments or tests
  experiments      imports specjax, pallas_kernels; never tests
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import pathlib

import pytest

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_BUILD = _ROOT / "BUILD"

# Package directory -> the py_library that owns its sources.
_LIBRARY_OF_PACKAGE = {
    "specjax": "specjax",
    "pallas_kernels": "pallas_kernels",
    "checkpoints": "checkpoints",
    "experiments": "experiments",
    "tests": "test_support",  # tests/test_*.py are py_tests instead.
}
# Package -> our packages it must never import. Code outside tests/ never imports tests.
_FORBIDDEN_IMPORTS = {
    "specjax": {"experiments", "checkpoints", "tests"},
    "pallas_kernels": {"specjax", "experiments", "checkpoints", "tests"},
    "checkpoints": {"experiments", "tests"},
    "experiments": {"tests"},
    "tests": set(),
}
# Data, not code: git-ignored checkpoints and benchmark outputs.
_SKIPPED_DIRS = {"checkpoints/store", "experiments/results"}
_RULES = ("py_library", "py_binary", "py_test")


@dataclasses.dataclass(frozen=True)
class Target:
  kind: str  # "py_library", "py_binary" or "py_test".
  name: str
  srcs: tuple[str, ...]  # Repo-relative paths, as written in BUILD.
  deps: tuple[str, ...]  # Target names, without the leading ":".
  line: int  # Where the rule starts in BUILD.

  def __str__(self) -> str:
    return f'{self.kind}(name = "{self.name}") at BUILD:{self.line}'


def _parse_build(text: str) -> dict[str, Target]:
  """The py_* rules of a BUILD file, by name."""
  targets = {}
  for node in ast.parse(text, filename="BUILD").body:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id in _RULES):
      continue  # load(), package() and comments' neighbours.
    call = node.value
    kwargs = {}
    for kw in call.keywords:
      try:
        kwargs[kw.arg] = ast.literal_eval(kw.value)
      except ValueError:
        raise ValueError(
            f"BUILD:{kw.value.lineno}: `{kw.arg}` of {call.func.id} is not a literal;"
            " tests/test_build.py reads BUILD without Bazel, so write lists out in full"
            " (no glob() or variables).") from None
    name = kwargs.get("name")
    if not name:
      raise ValueError(f"BUILD:{node.lineno}: {call.func.id} has no name.")
    if name in targets:
      raise ValueError(f"BUILD:{node.lineno}: a second target named {name!r}"
                       f" (first at BUILD:{targets[name].line}); names must be unique.")
    deps = tuple(d.removeprefix(":") for d in kwargs.get("deps", ()))
    targets[name] = Target(call.func.id, name, tuple(kwargs.get("srcs", ())), deps,
                           node.lineno)
  return targets


@pytest.fixture(scope="module")
def targets() -> dict[str, Target]:
  return _parse_build(_BUILD.read_text())


def _package_sources() -> list[str]:
  """Every .py file under the package directories, repo-relative, sorted."""
  found = []
  for package in _LIBRARY_OF_PACKAGE:
    for path in (_ROOT / package).rglob("*.py"):
      rel = path.relative_to(_ROOT).as_posix()
      if "__pycache__" in path.parts or any(rel.startswith(d + "/") for d in _SKIPPED_DIRS):
        continue
      found.append(rel)
  return sorted(found)


def _is_test_file(rel: str) -> bool:
  name = rel.rsplit("/", 1)[-1]
  return rel.startswith("tests/") and name.startswith("test_") and name.endswith(".py")


def _imported_packages(rel: str) -> dict[str, int]:
  """Our top-level packages that a file imports, each with the first line doing so."""
  own = rel.split("/", 1)[0]
  tree = ast.parse((_ROOT / rel).read_text(), filename=rel)
  found = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      names = [own] if node.level else [node.module]  # Relative imports stay home.
    else:
      continue
    for name in names:
      top = name.split(".", 1)[0]
      if top in _LIBRARY_OF_PACKAGE:
        found.setdefault(top, node.lineno)
  return found


def _missing_rule_hint(rel: str) -> str:
  if _is_test_file(rel):
    name = rel.rsplit("/", 1)[-1].removesuffix(".py")
    return (f"add to BUILD:\n\npy_test(\n    name = \"{name}\",\n    srcs = [\"{rel}\"],\n"
            "    deps = [\n        \":specjax\",\n        \":test_support\",\n    ],\n)\n")
  library = _LIBRARY_OF_PACKAGE[rel.split("/", 1)[0]]
  return f'add "{rel}" to the srcs of py_library(name = "{library}") in BUILD (kept sorted).'


def test_build_has_a_library_per_package(targets):
  missing = sorted(set(_LIBRARY_OF_PACKAGE.values()) - {
      t.name for t in targets.values() if t.kind == "py_library"})
  assert not missing, f"BUILD lacks a py_library for: {missing}"


def test_every_listed_file_exists(targets):
  missing = [f"  {src}  (listed in {t})" for t in targets.values() for src in t.srcs
             if not (_ROOT / src).is_file()]
  assert not missing, (
      "BUILD lists files that do not exist; create them, or remove them from BUILD if they"
      " were renamed or deleted:\n" + "\n".join(missing))


def test_every_source_is_in_exactly_one_target(targets):
  owners = collections.defaultdict(list)
  for t in targets.values():
    if t.kind != "py_binary":  # A binary's main is also in its library's srcs.
      for src in t.srcs:
        owners[src].append(t)
  problems = []
  for rel in _package_sources():
    if _is_test_file(rel):
      expected = ("py_test", rel.rsplit("/", 1)[-1].removesuffix(".py"))
    else:
      expected = ("py_library", _LIBRARY_OF_PACKAGE[rel.split("/", 1)[0]])
    home = f'{expected[0]}(name = "{expected[1]}")'
    if not owners[rel]:
      if not _is_test_file(rel):  # Those are test_every_test_file_has_its_own_py_test's.
        problems.append(f"{rel} is in no target: {_missing_rule_hint(rel)}")
    elif len(owners[rel]) > 1:
      problems.append(f"{rel} is in the srcs of {len(owners[rel])} targets"
                      f" ({'; '.join(map(str, owners[rel]))}); keep it only in {home}.")
    elif (owners[rel][0].kind, owners[rel][0].name) != expected:
      problems.append(f"{rel} is listed in {owners[rel][0]}, but belongs in {home};"
                      " move it there.")
  assert not problems, "BUILD is out of date:\n" + "\n".join(problems)


def test_every_test_file_has_its_own_py_test(targets):
  tests = [t for t in targets.values() if t.kind == "py_test"]
  problems = [f"{t} should have exactly srcs = [\"tests/{t.name}.py\"], found {list(t.srcs)}"
              for t in tests if t.srcs != (f"tests/{t.name}.py",)]
  have = {t.srcs[0] for t in tests if t.srcs}
  problems += [f"{rel} has no py_test: {_missing_rule_hint(rel)}"
               for rel in _package_sources() if _is_test_file(rel) and rel not in have]
  assert not problems, "\n".join(problems)


def test_srcs_and_deps_are_sorted(targets):
  unsorted = [f"{t}: {field} should read {sorted(values)}"
              for t in targets.values()
              for field, values in (("srcs", t.srcs), ("deps", t.deps))
              if list(values) != sorted(values)]
  assert not unsorted, "Keep BUILD lists sorted:\n" + "\n".join(unsorted)


def test_deps_name_existing_targets_and_respect_the_layering(targets):
  problems = []
  package_of_library = {lib: pkg for pkg, lib in _LIBRARY_OF_PACKAGE.items()}
  for t in targets.values():
    for dep in t.deps:
      if dep not in targets:
        problems.append(f"{t} depends on :{dep}, which BUILD does not define.")
      elif t.name in package_of_library and package_of_library.get(dep) in (
          _FORBIDDEN_IMPORTS[package_of_library[t.name]]):
        problems.append(f"{t} depends on :{dep}, which the layering forbids.")
  assert not problems, "\n".join(problems)


def test_imports_respect_the_layering():
  problems = []
  for rel in _package_sources():
    package = rel.split("/", 1)[0]
    for imported, line in sorted(_imported_packages(rel).items()):
      if imported in _FORBIDDEN_IMPORTS[package]:
        problems.append(f"{rel}:{line} imports {imported}, but {package}/ must not"
                        f" (layers only point down; see the top of BUILD).")
  assert not problems, "\n".join(problems)


def test_imports_are_declared_as_deps(targets):
  problems = []
  for t in targets.values():
    for rel in t.srcs:
      if not (_ROOT / rel).is_file():
        continue  # Reported by test_every_listed_file_exists.
      package = rel.split("/", 1)[0]
      for imported, line in sorted(_imported_packages(rel).items()):
        if imported in _FORBIDDEN_IMPORTS[package]:
          continue  # Reported by test_imports_respect_the_layering: no dep can fix it.
        library = _LIBRARY_OF_PACKAGE[imported]
        if library != t.name and library not in t.deps and t.kind != "py_binary":
          problems.append(f"{rel}:{line} imports {imported}: add \":{library}\" to the deps"
                          f" of {t}.")
  assert not problems, "\n".join(problems)


def test_binaries_are_built_from_their_library(targets):
  problems = []
  for t in (t for t in targets.values() if t.kind == "py_binary"):
    from_deps = {src for dep in t.deps if dep in targets for src in targets[dep].srcs}
    problems += [f"{t}: {src} is in no library among its deps {list(t.deps)}."
                 for src in t.srcs if src not in from_deps]
  assert not problems, "\n".join(problems)


def test_parser_rejects_what_it_cannot_read():
  with pytest.raises(ValueError, match="not a literal"):
    _parse_build('py_library(name = "a", srcs = glob(["*.py"]))')
  with pytest.raises(ValueError, match="second target named 'a'"):
    _parse_build('py_library(name = "a")\npy_test(name = "a")')
  parsed = _parse_build('load("x", "py_test")\npy_test(name = "t", deps = [":a"])')
  assert parsed == {"t": Target("py_test", "t", (), ("a",), 2)}
