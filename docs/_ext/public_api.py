"""The package's public names, read from the package itself, and the API pages made from them.

Public means: every name in ``optax_shampoo4.__all__``; for each public submodule listed there, every name in the
submodule's ``__all__`` (or, without one, each public function and class defined in it). The API pages follow
the package's layout, so a new module or name appears in the reference without editing the docs.
"""

import importlib
import inspect
import pathlib
import types

PACKAGE = "optax_shampoo4"


def _module_public_names(module):
  names = getattr(module, "__all__", None)
  if names is not None:
    return sorted(names)
  return sorted(
      name for name, value in vars(module).items()
      if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
      and getattr(value, "__module__", None) == module.__name__)


def public_api(package_name=PACKAGE):
  """Returns ``(top_level, modules)``: the top-level names that are not modules, and for each public submodule
  (by its full name) the sorted list of its public names."""
  package = importlib.import_module(package_name)
  top_level, modules = [], {}
  for name in sorted(package.__all__):
    value = getattr(package, name)
    if isinstance(value, types.ModuleType):
      modules[value.__name__] = _module_public_names(value)
    else:
      top_level.append(name)
  return top_level, modules


def _object_kind(value):
  if inspect.isclass(value):
    return "class"
  if callable(value):
    return "function"
  return "data"


def missing_docstrings(package_name=PACKAGE):
  """Full names of public functions, classes and modules whose docstring is missing or empty."""
  package = importlib.import_module(package_name)
  top_level, modules = public_api(package_name)
  missing = [] if inspect.getdoc(package) else [package_name]
  entries = [(package, name) for name in top_level]
  for module_name, names in modules.items():
    module = importlib.import_module(module_name)
    if not inspect.getdoc(module):
      missing.append(module_name)
    entries += [(module, name) for name in names]
  for owner, name in entries:
    value = getattr(owner, name)
    if _object_kind(value) != "data" and not (inspect.getdoc(value) or "").strip():
      missing.append(f"{owner.__name__}.{name}")
  return missing


_PAGE = {
    "class": ".. autoclass:: {full}\n   :members:\n   :show-inheritance:\n",
    "function": ".. autofunction:: {full}\n",
    "data": ".. autodata:: {full}\n",
}


def _title(text):
  return f"{text}\n{'=' * len(text)}\n\n"


def write_api_pages(out_dir, package_name=PACKAGE):
  """Writes ``index.rst`` (a summary table of the top-level names and a list of the submodules), one page per
  top-level name, and one page per submodule into ``out_dir``; returns the paths written."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  package = importlib.import_module(package_name)
  top_level, modules = public_api(package_name)
  pages = {}
  for name in top_level:
    full = f"{package_name}.{name}"
    pages[full] = _title(f"{package_name}.{name}") + _PAGE[_object_kind(getattr(package, name))].format(full=full)
  for module_name in modules:
    pages[module_name] = (_title(module_name) + f".. automodule:: {module_name}\n   :members:\n"
                          "   :show-inheritance:\n")
  index = _title("API reference")
  index += (f"Every public name of ``{package_name}`` (imported as ``s4``), generated from the docstrings.\n\n"
            f".. currentmodule:: {package_name}\n\n.. autosummary::\n\n")
  index += "".join(f"   {name}\n" for name in top_level)
  index += "\nSubmodules\n----------\n\n.. autosummary::\n\n"
  index += "".join(f"   {module_name.removeprefix(package_name + '.')}\n" for module_name in modules)
  index += "\n.. toctree::\n   :hidden:\n\n" + "".join(f"   {full}\n" for full in pages)
  pages["index"] = index
  written = []
  for page, text in pages.items():
    path = out_dir / f"{page}.rst"
    if not path.exists() or path.read_text() != text:  # unchanged pages keep their mtime: no needless rebuilds
      path.write_text(text)
    written.append(path)
  for stale in set(out_dir.glob("*.rst")) - set(written):
    stale.unlink()
  return written
