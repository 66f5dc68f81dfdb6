"""Every public name (``optax_shampoo4.__all__`` and the public submodules' functions and classes) has a
docstring: the API reference is generated from them (docs/_ext/public_api.py, shared with the docs build)."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def public_api():
  sys.path.insert(0, str(ROOT / "docs" / "_ext"))
  try:
    import public_api
  finally:
    sys.path.pop(0)
  return public_api


def test_every_public_name_has_a_docstring(public_api):
  assert public_api.missing_docstrings() == []


def test_public_api_lists_the_top_level_names_and_submodules(public_api):
  import optax_shampoo4

  top_level, modules = public_api.public_api()
  assert "adamw_shampoo4" in top_level and "scale_by_shampoo4" in top_level
  assert "optax_shampoo4.quantization" in modules and "quantize" in modules["optax_shampoo4.quantization"]
  assert set(top_level) | {m.rsplit(".", 1)[1] for m in modules} == set(optax_shampoo4.__all__)


def test_a_name_without_docstring_is_reported(public_api, monkeypatch):
  import optax_shampoo4.linalg

  def undocumented():
    pass

  undocumented.__module__ = "optax_shampoo4.linalg"
  monkeypatch.setattr(optax_shampoo4.linalg, "undocumented", undocumented, raising=False)
  assert public_api.missing_docstrings() == ["optax_shampoo4.linalg.undocumented"]
