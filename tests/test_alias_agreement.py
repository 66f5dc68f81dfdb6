"""Every alias agrees with the transform it wraps: same keywords, same defaults, all forwarded.

An alias repeats its transform's keywords explicitly (so that
``optax.inject_hyperparams`` sees them); these tests keep the copies honest.
"""

from __future__ import annotations

import inspect

import pytest

import optax_shampoo4 as s4

# Alias keyword -> transform keyword, where the alias renames one.
DISTRIBUTED_RENAMES = {"eps": "grafting_eps", "b2": "grafting_beta2", "b1": "filter_beta",
                       "use_bias_correction": "filter_bias_correction"}
# Transform keywords an alias does not expose, and why.
NOT_EXPOSED = {
    # The filtered gradient is Distributed Shampoo's; its alias exposes it as b1 / use_bias_correction.
    "adamw_shampoo4": {"filter_beta", "filter_bias_correction"},
    "sgdm_shampoo4": {"filter_beta", "filter_bias_correction"},
    "adagrad_shampoo4": {"filter_beta", "filter_bias_correction"},
    # Meta's use_bias_correction covers the filtered gradient and the statistics; the alias forwards it to both.
    "distributed_shampoo4": {"stats_bias_correction"},
    "soap4": set(),
}
# Defaults an alias sets on purpose (documented in its docstring).
OVERRIDES = {"distributed_shampoo4": {"stats_every": 10, "root_every": 100, "grafting": "adam", "beta": 1.0,
                                      "epsilon": 1e-12, "epsilon_mode": "absolute", "precondition_1d": True,
                                      "quant_damping": 1e-6, "store_root": None, "bjorck_steps": None}}
# Alias defaults the alias resolves before forwarding (None -> a value that depends on other options).
RESOLVED = {"distributed_shampoo4": {"start_preconditioning_step", "store_root", "bits", "bjorck_steps"}}
ALIASES = {"adamw_shampoo4": s4.scale_by_shampoo4, "sgdm_shampoo4": s4.scale_by_shampoo4,
           "adagrad_shampoo4": s4.scale_by_shampoo4, "distributed_shampoo4": s4.scale_by_shampoo4,
           "soap4": s4.scale_by_soap4}


def _defaults(fn) -> dict:
  return {name: p.default for name, p in inspect.signature(fn).parameters.items()}


def _shared(alias_name: str) -> dict[str, str]:
  """``{alias keyword: transform keyword}`` of the keywords the alias forwards to its transform."""
  transform = _defaults(ALIASES[alias_name])
  renames = DISTRIBUTED_RENAMES if alias_name == "distributed_shampoo4" else {}
  return {a: renames.get(a, a) for a in _defaults(getattr(s4, alias_name)) if renames.get(a, a) in transform}


@pytest.mark.parametrize("alias_name", sorted(ALIASES))
def test_alias_exposes_every_transform_keyword(alias_name):
  transform = set(_defaults(ALIASES[alias_name]))
  assert transform - set(_shared(alias_name).values()) == NOT_EXPOSED[alias_name]


@pytest.mark.parametrize("alias_name", sorted(ALIASES))
def test_alias_defaults_equal_the_transforms(alias_name):
  alias_defaults, transform = _defaults(getattr(s4, alias_name)), _defaults(ALIASES[alias_name])
  overrides = OVERRIDES.get(alias_name, {})
  for a, t in _shared(alias_name).items():
    if a in overrides:
      assert alias_defaults[a] == overrides[a] != transform[t], (alias_name, a)
    elif a in DISTRIBUTED_RENAMES and alias_name == "distributed_shampoo4":
      continue  # the base method's own defaults (b1=0.9, b2=0.999, eps=1e-8), documented in the alias
    else:
      assert alias_defaults[a] == transform[t], f"{alias_name}({a}={alias_defaults[a]!r}) vs {t}={transform[t]!r}"


@pytest.mark.parametrize("alias_name", sorted(ALIASES))
def test_alias_forwards_every_shared_keyword(alias_name, monkeypatch):
  """The transform receives each shared keyword with the alias' value (here: its default)."""
  received = {}
  transform = ALIASES[alias_name]
  attribute = "scale_by_soap4" if alias_name == "soap4" else "scale_by_shampoo4"

  def recording(*args, **kwargs):
    received.update(zip(inspect.signature(transform).parameters, args))
    received.update(kwargs)
    return transform(*args, **kwargs)

  # Patched where the alias is defined (optax_shampoo4.alias or optax_shampoo4.reference_aliases).
  monkeypatch.setattr(inspect.getmodule(getattr(s4, alias_name)), attribute, recording)
  getattr(s4, alias_name)()
  alias_defaults = _defaults(getattr(s4, alias_name))
  for a, t in _shared(alias_name).items():
    assert t in received, f"{alias_name} does not forward {a}"
    if t not in RESOLVED.get(alias_name, set()):
      assert received[t] == alias_defaults[a], (alias_name, a, received[t])
