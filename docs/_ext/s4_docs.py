"""Sphinx extension of the optax_shampoo4 docs: generated API pages, the public-docstring check, and the
results tables and plots made from ``benchmarks/results/*.json``.

At ``builder-inited`` (before autosummary and before the sources are read) it

* writes ``docs/api/*.rst`` from the package's ``__all__`` (``public_api.write_api_pages``);
* warns for every public name without a docstring (an error under ``-W``);
* writes ``docs/_generated/*.md`` and ``*.png`` from the benchmark JSON files (``results_tables.write_all``, ``notes_tables.write_all``).
"""

import importlib
import pathlib
import sys

import notes_tables
import public_api
import results_tables
from sphinx.util import logging

logger = logging.getLogger(__name__)


def _generate(app):
  docs = pathlib.Path(app.srcdir)
  public_api.write_api_pages(docs / "api")
  for name in public_api.missing_docstrings():
    logger.warning("public name without a docstring: %s", name, type="s4_docs", subtype="docstring")
  results_tables.write_all(docs.parent / "benchmarks" / "results", docs / "_generated")
  notes_tables.write_all(docs.parent / "benchmarks" / "results", docs / "_generated")


def _find_object(full_name):
  """The object named ``full_name`` (a module, or attributes of one), or None when it does not exist."""
  parts = full_name.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      value = importlib.import_module(".".join(parts[:cut]))
    except ImportError:
      continue
    try:
      for part in parts[cut:]:
        value = getattr(value, part)
    except AttributeError:
      return None
    return value
  return None


def _candidate_names(node):
  target = node["reftarget"].lstrip("~.")
  module, cls = node.get("py:module"), node.get("py:class")
  candidates = [target]
  if module and cls:
    candidates.append(f"{module}.{cls}.{target}")
  candidates += [f"{context}.{target}" for context in (cls, module) if context]
  # A docstring shown at its top-level alias (``optax_shampoo4.X``) names its own module's functions unqualified.
  candidates += [f"{name}.{target}" for name in sorted(sys.modules) if name.startswith(public_api.PACKAGE + ".")]
  return [name for name in candidates if name.startswith(public_api.PACKAGE)]


def _resolve_in_package(app, env, node, contnode):
  """Resolves a reference that Python's lookup rules miss because a docstring is shown away from its module:
  to the name's API entry when it has one; a name of this package that exists but has no API entry (an internal
  function, a module constant) renders as code. A name that does not exist still fails the build."""
  if node.get("refdomain") != "py":
    return None
  domain = env.get_domain("py")
  existing = [name for name in _candidate_names(node) if _find_object(name) is not None]
  for name in existing:
    for role in (node["reftype"], "obj"):
      resolved = domain.resolve_xref(env, node["refdoc"], app.builder, role, name, node, contnode)
      if resolved is not None:
        return resolved
  return contnode if existing else None


def setup(app):
  app.connect("builder-inited", _generate, priority=400)
  app.connect("missing-reference", _resolve_in_package)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
