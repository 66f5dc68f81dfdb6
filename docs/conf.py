"""Sphinx configuration of the optax_shampoo4 documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html

Warnings are errors: a broken reference, a public name without a docstring, a failing notebook or guide cell
fails the build. The API pages, the results tables and plots and the notebooks' copies are generated at build
time (``docs/_ext``); nothing there is edited by hand.
"""

import os
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
# Executed guides and notebooks run in kernels (subprocesses): they import this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
# Their figures are shown inline (this process draws its own plots with Agg, see _ext/results_tables.py).
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"

import optax_shampoo4  # noqa: E402

project = "optax_shampoo4"
author = "optax_shampoo4 contributors"
copyright = "optax_shampoo4 contributors"  # noqa: A001
release = optax_shampoo4.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "sphinx-mathjax-offline",  # serves MathJax from _static: the site renders formulas without a network
    "s4_docs",
]

# The notebooks are copied from notebooks/ at build time (s4_docs) into notebooks/ here.
exclude_patterns = ["_build", "_generated", "README.md", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path = ["_templates"]

# autodoc / napoleon: docstrings are Google style with r-strings holding the maths.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"exclude-members": "_asdict, _fields, _field_defaults, _make, _replace, count, index"}
autosummary_generate = False  # the API pages are written by s4_docs from the package's __all__
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # NamedTuple fields are documented once, by autodoc

# Broken references fail the build; names of other libraries are not resolved (no inventories offline).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|chex|numpy|np|jnp|flax|orbax|typing|collections|types|enum|builtins)(\..*)?"),
    (r"py:.*", r"(Array|ArrayLike|ArrayTree|Numeric|Scalar|ScalarOrSchedule|Shape|PyTree|Params|Updates|OptState|Mesh|NamedSharding|PartitionSpec|Sharding)"),
    (r"py:class", r"(optional|callable|None|NoneType|Any|Callable|Sequence|Mapping|Iterable|NamedTuple)"),
]

# myst / myst-nb: guides are executed MyST notebooks; a failing cell fails the build.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "cache"
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = "optax_shampoo4"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
html_last_updated_fmt = None

# Notebooks (the repository's copies are the source of truth).
for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
  target = DOCS / "notebooks" / notebook.name
  target.parent.mkdir(exist_ok=True)
  if not target.exists() or target.read_bytes() != notebook.read_bytes():
    shutil.copyfile(notebook, target)
