r"""The optimizer variants the examples and benchmarks compare: one registry, one spelling per variant.

A name is built from three parts:

* a first-order **base**, ``"adamw"`` (``optax.adamw``) or ``"sgdm"`` (SGD with heavy-ball momentum and
  coupled L2 weight decay, the paper's SGDM);
* optionally ``"+<shampoo variant>"``, a key of :data:`SHAMPOO_VARIANTS`: the same base fed with the grafted
  Shampoo direction (``s4.adamw_shampoo4`` / ``s4.sgdm_shampoo4`` with that variant's options), e.g.
  ``"adamw+shampoo4"``; or, instead of base and variant, a key of :data:`SOAP_VARIANTS`
  (``s4.soap4``, Adam in Shampoo's eigenbasis, which replaces the base), e.g. ``"soap4"``;
* optionally a moment suffix of :data:`MOMENT_SUFFIXES`, ``"_m8"`` / ``"_m4"``: the first-order moments
  stored in 8 / 4 bits (``moment_bits``, ``s4.moments``), e.g. ``"sgdm_m8"``, ``"adamw+shampoo4_m4"``,
  ``"soap4_m8"``.

:func:`parse` turns a name into a :class:`Variant` (and raises ``ValueError`` for anything else),
:data:`NAMES` lists every name, :func:`make` builds the optimizer. :data:`LEGACY_NAMES` maps the row
labels of earlier ``benchmarks/speed.py`` and ``memory.py`` runs (``"ours eigen"``, ``"soap 4-bit (ours)"``, ...), which
the result files in ``benchmarks/results/`` still hold, to these names.

Example::

  tx = make("adamw+shampoo4_m8", 1e-3, 1e-4, shampoo={"stats_every": 10, "root_every": 20})
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import optax

try:
  import optax_shampoo4 as s4
except ModuleNotFoundError:  # Running from a source checkout without `pip install -e .`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import optax_shampoo4 as s4

BASES = ("adamw", "sgdm")
# Shampoo variant -> its options of s4.adamw_shampoo4 / s4.sgdm_shampoo4 (the rest: library defaults).
SHAMPOO_VARIANTS: dict[str, dict[str, Any]] = {
    "shampoo32": {"state_format": "fp32"},  # 32-bit Shampoo (dense float32 factors)
    "naive4": {"state_format": "naive"},  # naive 4-bit (quantized statistic and root)
    "shampoo4": {},  # 4-bit Shampoo (quantized eigenvectors), library defaults
    "shampoo4_qr": {"refresh_method": "qr"},  # the paper's refresh: one warm-started QR step
    "shampoo4_qr4": {"refresh_method": "qr", "qr_iterations": 4},
    "shampoo4_eigh": {"refresh_method": "eigh"},  # exact eigendecomposition at every refresh
    "shampoo4_adaptive": {"refresh_method": "adaptive"},
    # The adaptive rule at its extremes: tolerance 0 decomposes at every refresh, 1 always keeps the basis.
    "shampoo4_adaptive_tol0": {"refresh_method": "adaptive", "refresh_tol": 0.0},
    "shampoo4_adaptive_tol1": {"refresh_method": "adaptive", "refresh_tol": 1.0},
    "shampoo4_noroot": {"store_root": False},  # the root formed from the eigenpairs at every step
    # distributed_shampoo4's quantized layout: an 8-bit basis, the root applied from the eigenpairs at every step
    "shampoo8_noroot": {"bits": 8, "store_root": False, "bjorck_steps": (1, 0)},
    # the paper layout's bytes as an 8-bit basis with a 16-bit head and the roots' eigenvalues, one Björck step
    # per applied root (the same quality as the default four: docs/results/illcond.md)
    "shampoo8_eigvals_head": {"bits": 8, "store_root": "eigvals", "head_fraction": 1 / 16, "head_bits": 16,
                              "tail_rectify": "qr", "bjorck_steps": (1, 1)},
    "shampoo8": {"bits": 8},  # 8-bit eigenvectors, default refresh
    "shampoo8_eigh": {"bits": 8, "refresh_method": "eigh"},
    "shampoo8_tol2": {"bits": 8, "refresh_tol": 1e-2},  # the adaptive tolerance before it was set to 1e-3
    "shampoo3": {"bits": 3},  # 3-bit eigenvectors, default refresh
    "shampoo4_caspr": {"combine": "caspr"},  # CASPR's combination of the 4-bit roots
    "naive4_jorge": {"state_format": "naive", "root_method": "jorge"},  # Jorge: 4-bit roots, no statistic
    # The every-step products at bf16x3 ("high") and with bf16 operands ("default"); see benchmarks/precision.py.
    "shampoo4_bf16x3": {"precision": "high"},
    "shampoo4_bf16": {"precision": "default"},
}
# SOAP variant -> its options of s4.soap4.
SOAP_VARIANTS: dict[str, dict[str, Any]] = {
    "soap32": {"state_format": "fp32"},
    "soap32_ref": {"state_format": "fp32", "statistic": "dense"},  # the SOAP authors' algorithm (reference semantics)
    "soap8": {"bits": 8},
    "soap4": {"bits": 4},  # the default: 1/8 of each basis (largest eigenvalues) in 16 bits, the next 1/8 in 8
    "soap4_head8": {"bits": 4, "head_bits": 8, "mid_fraction": 0.0},  # an 8-bit head of 1/8, no second tier
    "soap4_nohead": {"bits": 4, "head_fraction": 0.0},  # every basis row in 4 bits
    # the default's bytes with more 8-bit rows: a 16-bit head of 1/16, then 5/16 in 8 bits
    "soap4_h16m516": {"bits": 4, "head_fraction": 1 / 16, "mid_fraction": 5 / 16},
    "soap4_bjorck22": {"bits": 4, "bjorck_steps": (2, 2)},  # two Björck steps before refreshes and each rotation
    "soap4_bjorck10": {"bits": 4, "bjorck_steps": (1, 0)},  # no per-step Björck (the tiered default)
    "soap4_bjorck11": {"bits": 4, "bjorck_steps": (1, 1)},  # a Björck step on the 16-/8-bit rows each step
    "soap8_keepnu": {"bits": 8, "project_nu": False},  # v only permuted at a refresh, as the SOAP reference
    "soap4_bf16x3": {"bits": 4, "precision": "high"},  # rotations at bf16x3
    "soap4_bf16": {"bits": 4, "precision": "default"},  # rotations with bf16 operands, float32 accumulation
}
# Name suffix -> moment_bits (quantized first-order moments); no suffix: float32 moments.
MOMENT_SUFFIXES = {"_m8": 8, "_m4": 4}
# The Shampoo variants an example runs by default.
DEFAULT_SHAMPOO = ("shampoo32", "naive4", "shampoo4")

# Row labels of earlier benchmark runs (benchmarks/results/speed*.json, memory.json) -> registry names.
LEGACY_NAMES = {
    "adamw m8": "adamw_m8",
    "ours fp32": "adamw+shampoo32",
    "ours naive": "adamw+naive4",
    "ours eigen": "adamw+shampoo4",
    "ours eigen qr (paper)": "adamw+shampoo4_qr",
    "ours eigen qr x4": "adamw+shampoo4_qr4",
    "ours eigen eigh": "adamw+shampoo4_eigh",
    "ours eigen adaptive tol=0": "adamw+shampoo4_adaptive_tol0",
    "ours eigen adaptive tol=1": "adamw+shampoo4_adaptive_tol1",
    "ours eigen no root": "adamw+shampoo4_noroot",
    "ours eigen caspr": "adamw+shampoo4_caspr",
    "ours eigen 3-bit": "adamw+shampoo3",
    "ours naive jorge": "adamw+naive4_jorge",
    "ours eigen m8": "adamw+shampoo4_m8",
    "ours eigen no root m8": "adamw+shampoo4_noroot_m8",
    "ours soap32": "soap32",
    "ours soap4": "soap4",
    "ours soap4 no bjorck": "soap4_bjorck10",
    "ours soap4 m8": "soap4_m8",
    "ours soap4 no head": "soap4_nohead",
    # benchmarks/memory.py (memory.json): optimizers, moment-table families, SOAP table
    "adamw+shampoo fp32": "adamw+shampoo32",
    "adamw+shampoo naive 4-bit": "adamw+naive4",
    "adamw+shampoo 4-bit (ours)": "adamw+shampoo4",
    "adamw+shampoo 8-bit (ours)": "adamw+shampoo8",
    "AdamW": "adamw",
    "AdamW+4-bit Shampoo": "adamw+shampoo4",
    "SGDM+4-bit Shampoo": "sgdm+shampoo4",
    "AdamW+4-bit Shampoo, no root": "adamw+shampoo4_noroot",
    "SGDM+4-bit Shampoo, no root": "sgdm+shampoo4_noroot",
    "4-bit SOAP": "soap4",
    "soap fp32": "soap32",
    "soap 8-bit": "soap8",
    "soap 4-bit (ours)": "soap4",
}


class Variant(NamedTuple):
  """A parsed name: ``name == format_name(base, preconditioner, moment_bits)``.

  Attributes:
    base: ``"adamw"`` or ``"sgdm"``; None for SOAP (it replaces the base).
    preconditioner: a key of :data:`SHAMPOO_VARIANTS` or :data:`SOAP_VARIANTS`; None for a first-order base.
    moment_bits: 8 or 4 (quantized first-order moments) or None (float32).
  """

  base: str | None
  preconditioner: str | None
  moment_bits: int | None

  @property
  def family(self) -> str:
    """``"first_order"``, ``"shampoo"`` or ``"soap"``."""
    if self.base is None:
      return "soap"
    return "first_order" if self.preconditioner is None else "shampoo"

  @property
  def options(self) -> dict[str, Any]:
    """The keyword arguments this variant passes to its ``s4`` alias (empty for a first-order base)."""
    table = SOAP_VARIANTS if self.family == "soap" else SHAMPOO_VARIANTS
    return dict(table.get(self.preconditioner, {}))

  @property
  def name(self) -> str:
    return format_name(self.base, self.preconditioner, self.moment_bits)



def format_name(base: str | None, preconditioner: str | None, moment_bits: int | None) -> str:
  """The one spelling of a variant, e.g. ``("adamw", "shampoo4", 8) -> "adamw+shampoo4_m8"``."""
  stem = preconditioner if base is None else base if preconditioner is None else f"{base}+{preconditioner}"
  suffix = {bits: suffix for suffix, bits in MOMENT_SUFFIXES.items()}
  if moment_bits is not None and moment_bits not in suffix:
    raise ValueError(f"moment_bits must be None or one of {sorted(suffix)}, got moment_bits={moment_bits!r}")
  return stem + ("" if moment_bits is None else suffix[moment_bits])


def parse(name: str) -> Variant:
  """``"adamw+shampoo4_m8"`` -> ``Variant("adamw", "shampoo4", 8)``; ValueError for an unknown name."""
  if not isinstance(name, str):
    raise TypeError(f"optimizer name must be a str, got name={name!r}")
  stem, moment_bits = name, None
  for suffix, bits in MOMENT_SUFFIXES.items():
    if name.endswith(suffix):
      stem, moment_bits = name[: -len(suffix)], bits
  if any(stem.endswith(suffix) for suffix in MOMENT_SUFFIXES):
    raise ValueError(f"optimizer name={name!r} has more than one moment suffix {tuple(MOMENT_SUFFIXES)}")
  if stem in SOAP_VARIANTS:
    return Variant(None, stem, moment_bits)
  base, plus, preconditioner = stem.partition("+")
  if base in BASES and not plus:
    return Variant(base, None, moment_bits)
  if base in BASES and preconditioner in SHAMPOO_VARIANTS:
    return Variant(base, preconditioner, moment_bits)
  raise ValueError(
      f"unknown optimizer name={name!r}: want <base>[+<shampoo variant>][<moment suffix>] or "
      f"<soap variant>[<moment suffix>] with base in {BASES}, shampoo variant in {tuple(SHAMPOO_VARIANTS)}, "
      f"soap variant in {tuple(SOAP_VARIANTS)}, moment suffix in {tuple(MOMENT_SUFFIXES)}")


def with_moment_bits(name: str, moment_bits: int | None) -> str:
  """The same variant with other moments: ``("adamw+shampoo4_m8", None) -> "adamw+shampoo4"``."""
  variant = parse(name)
  return format_name(variant.base, variant.preconditioner, moment_bits)


def canonical(name: str) -> str:
  """``name`` in the registry's spelling: a :data:`LEGACY_NAMES` label is translated, anything else checked."""
  return parse(LEGACY_NAMES.get(name, name)).name


def optimizer_names(base: str, preconditioners: Iterable[str] = DEFAULT_SHAMPOO) -> tuple[str, ...]:
  """``(base, base+shampoo32, base+naive4, base+shampoo4)`` by default, each checked by :func:`parse`."""
  names = (base,) + tuple(f"{base}+{preconditioner}" for preconditioner in preconditioners)
  return tuple(parse(name).name for name in names)


def _all_names() -> tuple[str, ...]:
  stems = [stem for base in BASES for stem in optimizer_names(base, SHAMPOO_VARIANTS)] + list(SOAP_VARIANTS)
  return tuple(stem + suffix for stem in stems for suffix in ("", *MOMENT_SUFFIXES))


NAMES = _all_names()


def _merged(variant: Variant, extra: Mapping[str, Any] | None) -> dict[str, Any]:
  """The variant's options plus ``extra``; ValueError where ``extra`` sets an option the variant fixes."""
  extra = dict(extra or {})
  clash = sorted((set(extra) & set(variant.options)) | ({"moment_bits"} & set(extra)))
  if clash:
    raise ValueError(f"options {clash} are set by the optimizer name {variant.name!r}; got {extra!r}")
  return {**extra, **variant.options, "moment_bits": variant.moment_bits}


def _first_order(variant: Variant, learning_rate: optax.ScalarOrSchedule, weight_decay: float,
                 momentum: float) -> optax.GradientTransformation:
  bits = variant.moment_bits
  if variant.base == "adamw":
    if bits is None:
      return optax.adamw(learning_rate, weight_decay=weight_decay)
    return optax.chain(s4.moments.scale_by_adam(bits=bits), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))
  if bits is None:
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))
  return optax.chain(optax.add_decayed_weights(weight_decay), s4.moments.trace(momentum, bits=bits),
                     optax.scale_by_learning_rate(learning_rate))


def make(name: str, learning_rate: optax.ScalarOrSchedule, weight_decay: float, *, momentum: float = 0.9,
         shampoo: Mapping[str, Any] | None = None,
         soap: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
  """The optimizer called ``name`` (see the module docstring).

  Args:
    name: a name of :data:`NAMES` (translate a :data:`LEGACY_NAMES` label with :func:`canonical` first).
    learning_rate: its learning rate or schedule.
    weight_decay: decoupled (AdamW, SOAP) or coupled L2 (SGDM) weight decay.
    momentum: SGDM's momentum (``sgdm`` bases only).
    shampoo: further keyword arguments of ``s4.adamw_shampoo4`` / ``s4.sgdm_shampoo4`` (e.g.
      ``stats_every``); used by Shampoo variants only.
    soap: further keyword arguments of ``s4.soap4`` (e.g. ``precondition_every``); used by SOAP only.

  Raises:
    ValueError: for an unknown name, or where ``shampoo`` / ``soap`` sets an option the name fixes.
  """
  variant = parse(name)
  if variant.family == "first_order":
    return _first_order(variant, learning_rate, weight_decay, momentum)
  if variant.family == "soap":
    return s4.soap4(learning_rate, weight_decay=weight_decay, **_merged(variant, soap))
  options = _merged(variant, shampoo)
  if variant.base == "adamw":
    return s4.adamw_shampoo4(learning_rate, weight_decay=weight_decay, **options)
  return s4.sgdm_shampoo4(learning_rate, momentum=momentum, weight_decay=weight_decay, **options)
