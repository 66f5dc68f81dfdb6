"""The documentation site: it builds with warnings as errors, every public name has a rendered API entry, and a
real browser (headless Chromium) renders the pages: title, a MathJax formula, a plot, no missing resource.

Slow (the build executes the guides and both notebooks). Needs the ``docs`` extra
(``pip install -e ".[docs]"``) and Chromium; when the ``chromium`` command is missing, the browser test tries
``apt-get install -y chromium`` once (root, Debian) and otherwise fails saying how to install it.
"""

import functools
import http.server
import pathlib
import shutil
import subprocess
import sys
import threading

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_COMMAND = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """The site built by the documented command (into a temporary folder)."""
  pytest.importorskip("sphinx", reason='the docs extra is not installed: pip install -e ".[docs]"')
  out = tmp_path_factory.mktemp("html")
  # A fresh execution cache: every guide and notebook runs against the library as it is now (the notebooks are
  # executed here only, not by nbmake), so a cell that raises fails the build.
  cache = tmp_path_factory.mktemp("jupyter_cache")
  command = BUILD_COMMAND + ["-D", f"nb_execution_cache_path={cache}", str(out)]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, f"docs build failed:\n{result.stdout[-5000:]}\n{result.stderr[-10000:]}"
  return out


def _public_entries():
  sys.path.insert(0, str(ROOT / "docs" / "_ext"))
  try:
    import public_api
  finally:
    sys.path.pop(0)
  top_level, modules = public_api.public_api()
  entries = [(f"optax_shampoo4.{name}", f"api/optax_shampoo4.{name}.html") for name in top_level]
  for module_name, names in modules.items():
    entries += [(f"{module_name}.{name}", f"api/{module_name}.html") for name in names]
  return entries


def test_every_public_name_has_a_non_empty_api_entry(site):
  from bs4 import BeautifulSoup

  pages, missing, empty = {}, [], []
  for full_name, page in _public_entries():
    if page not in pages:
      pages[page] = BeautifulSoup((site / page).read_text(), "html.parser")
    term = pages[page].find("dt", id=full_name)
    if term is None:
      missing.append(full_name)
      continue
    body = term.find_next_sibling("dd")
    if body is None or not body.get_text(strip=True):
      empty.append(full_name)
  assert not missing, f"public names without an API entry: {missing}"
  assert not empty, f"public names with an empty API entry: {empty}"


@pytest.mark.parametrize("notebook", sorted(path.stem for path in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebooks_are_executed_with_outputs(site, notebook):
  from bs4 import BeautifulSoup

  page = BeautifulSoup((site / "notebooks" / f"{notebook}.html").read_text(), "html.parser")
  outputs = page.select("div.cell_output")
  assert outputs, f"{notebook}: no executed cell outputs on the page"
  assert not page.select("div.cell_output .output.traceback, div.cell_output .output.error"), notebook
  assert page.select("div.cell_output img"), f"{notebook}: no plot in the outputs"


def test_results_pages_hold_generated_tables_and_plots(site):
  page = (site / "results" / "quality.html").read_text()
  assert page.count("<table") >= 3 and "quality.png" in page
  assert (site / "_images" / "quality.png").stat().st_size > 10_000


# --- the browser check -------------------------------------------------------------------------------------


def _chromium():
  """The Chromium command, installed with apt-get once if missing (root on Debian); None if that fails."""
  for name in ("chromium", "chromium-browser"):
    if shutil.which(name):
      return shutil.which(name)
  if shutil.which("apt-get"):
    install = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"
    subprocess.run(["bash", "-c", install], capture_output=True, timeout=900)
  return shutil.which("chromium")


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
  """Serves the site and records ``(path, status)`` of every request."""

  requests = []

  def log_request(self, code="-", size="-"):
    self.requests.append((self.path, int(code)))

  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def server(site):
  handler = functools.partial(_LoggingHandler, directory=str(site))
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()
  httpd.server_close()


def _browse(chromium, url, screenshot):
  """Loads ``url`` twice in headless Chromium: a screenshot, then the DOM after scripts ran."""
  flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--window-size=1280,1600", "--virtual-time-budget=15000"]
  subprocess.run(flags + [f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
  result = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=180, check=True)
  return result.stdout


PAGES = {
    "index": ("index.html", "optax_shampoo4"),
    "api_adamw_shampoo4": ("api/optax_shampoo4.adamw_shampoo4.html", "optax_shampoo4.adamw_shampoo4"),
    "results_quality": ("results/quality.html", "Training quality"),
}


@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_renders_in_a_browser(name, server, tmp_path_factory):
  chromium = _chromium()
  if chromium is None:
    pytest.fail("Chromium is needed for the browser check and apt-get could not install it: "
                "run `apt-get update && apt-get install -y chromium` (Debian) and rerun.")
  page, title = PAGES[name]
  out = tmp_path_factory.mktemp("screenshots")
  _LoggingHandler.requests.clear()
  dom = _browse(chromium, f"{server}/{page}", out / f"{name}.png")

  assert f"<title>{title}" in dom, f"{page}: title {title!r} not found"
  assert (out / f"{name}.png").stat().st_size > 20_000, "the screenshot looks blank"
  requests = list(_LoggingHandler.requests)
  failed = [(path, status) for path, status in requests if status >= 400]
  assert not failed, f"{page}: resources not found: {failed}"
  assert any("mathjax/tex-chtml.js" in path for path, _ in requests), "MathJax was not loaded from the site"
  if name != "index":
    assert "<mjx-container" in dom, f"{page}: no formula rendered by MathJax"
  else:
    assert "mjx-container" in dom
  if name == "results_quality":
    images = [path for path, status in requests if path.endswith(".png") and status == 200]
    assert any("quality" in path for path in images), f"the plot was not loaded: {requests}"
