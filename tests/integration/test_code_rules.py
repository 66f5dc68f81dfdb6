"""The library's code rules, checked on its source with ``ast``.

* every function of ``optax_shampoo4/`` has at most 60 lines of code
  (docstrings, comments and blank lines aside);
* no module imports another module's ``_private`` name (``from m import _x``
  or ``m._x``);
* the imports between the library's modules form no cycle.
"""

from __future__ import annotations

import ast
import io
import pathlib
import tokenize

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "optax_shampoo4"
MODULES = {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}
MAX_CODE_LINES = 60


def _tree(name: str) -> ast.Module:
  return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def _code_lines(source: str, node: ast.AST) -> int:
  """Lines of ``node`` that hold code: not blank, not only a comment, not in a docstring."""
  lines = set(range(node.lineno, node.end_lineno + 1))
  body = getattr(node, "body", [])
  if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
      and isinstance(body[0].value.value, str):
    lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
  with_code = set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      with_code.update(range(token.start[0], token.end[0] + 1))
  return len(lines & with_code)


def _functions():
  for name in MODULES:
    source = MODULES[name].read_text()
    for node in ast.walk(_tree(name)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield name, node, source


def test_code_line_counter_skips_docstrings_and_comments():
  source = 'def f():\n  """Doc.\n\n  More.\n  """\n  # a comment\n\n  x = 1\n  return x\n'
  node = ast.parse(source).body[0]
  assert _code_lines(source, node) == 3  # def, x = 1, return


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_have_at_most_60_code_lines(module):
  long = [f"{node.name} (line {node.lineno}): {count}" for name, node, source in _functions() if name == module
          for count in [_code_lines(source, node)] if count > MAX_CODE_LINES]
  assert not long, f"functions over {MAX_CODE_LINES} lines of code in {module}.py: {long}"


def _library_imports(name: str) -> tuple[set[str], list[str]]:
  """(library modules ``name`` imports, private names it takes from them)."""
  imported, private = set(), []
  aliases = {}
  for node in ast.walk(_tree(name)):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optax_shampoo4"):
      if node.module == "optax_shampoo4":
        for alias in node.names:
          if alias.name in MODULES:
            imported.add(alias.name)
            aliases[alias.asname or alias.name] = alias.name
      else:
        module = node.module.split(".")[1]
        imported.add(module)
        private += [f"{module}.{a.name}" for a in node.names if a.name.startswith("_")]
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("optax_shampoo4."):
          imported.add(alias.name.split(".")[1])
  for node in ast.walk(_tree(name)):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
        and node.attr.startswith("_") and not node.attr.startswith("__"):
      private.append(f"{aliases[node.value.id]}.{node.attr}")
  imported.discard(name)
  return imported, private


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_modules(module):
  _, private = _library_imports(module)
  assert not private, f"{module}.py uses private names of other modules: {private}"


def test_imports_are_acyclic():
  graph = {name: _library_imports(name)[0] for name in MODULES if name != "__init__"}
  graph = {name: {m for m in deps if m != "__init__"} for name, deps in graph.items()}
  order, visiting, done = [], set(), set()

  def visit(name, path):
    if name in done:
      return
    assert name not in visiting, f"import cycle: {' -> '.join(path + [name])}"
    visiting.add(name)
    for dep in sorted(graph[name]):
      visit(dep, path + [name])
    visiting.discard(name)
    done.add(name)
    order.append(name)

  for name in sorted(graph):
    visit(name, [])
  assert len(order) == len(graph)
