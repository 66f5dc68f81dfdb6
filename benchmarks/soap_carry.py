"""Research: how 4-bit SOAP carries Adam's moments into a refreshed basis, on ``benchmarks/illcond.py``'s problems.

At a refresh ``soap4`` carries the moments by the change of basis :math:`C = R_{new} R_{old}^\\top` of the
two decoded bases (``m <- C m``, ``v <- (C∘C) v``). With 4-bit rows each basis carries its own rounding,
so :math:`C` holds entries of about 0.02 (rms; up to 0.09, order 64) that are rounding only, and they move
a share of the large coordinates' moments into the small ones at every refresh. This probe replaces
:math:`C` (a patch of ``optax_shampoo4.soap_eigenbasis.rotate_moments`` in this process only) by

* ``perm``: its signed-permutation part (per row, the largest entry's sign; the moments only follow the
  re-sorting, no rotation at all);
* ``thr<t>``: :math:`C` with the entries of magnitude at most ``t`` set to 0.

Rows: ``soap4`` 4-bit / 8-bit / float32 with the patched carry (``BITS=4bit,8bit,fp32`` picks them);
compare with ``soap4_*`` of ``benchmarks/results/illcond.json``. Same sweep, seeds and metric as ``illcond.py``:

  BITS=4bit python benchmarks/soap_carry.py perm --problems ls_power_1e6 ls_logunif_1e6 \\
      --out benchmarks/results/soap_carry.json
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax.numpy as jnp

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import illcond  # noqa: E402
from optax_shampoo4 import soap_eigenbasis  # noqa: E402

_ROTATE_MOMENTS = soap_eigenbasis.rotate_moments
_Q = dict(weight_decay=0.0, min_quant_order=16)


def signed_permutation(change: jnp.ndarray) -> jnp.ndarray:
  """Per row of ``change``, its largest-magnitude entry's sign at that entry, 0 elsewhere."""
  magnitude = jnp.abs(change)
  return jnp.where(magnitude == jnp.max(magnitude, axis=-1, keepdims=True), jnp.sign(change), 0.0)


def carried_by(mode: str):
  """A ``rotate_moments`` that carries by ``mode``'s version of each change of basis."""
  def denoise(change):
    if mode == "perm":
      return signed_permutation(change)
    return jnp.where(jnp.abs(change) > float(mode[3:]), change, 0.0)

  def rotate_moments(factor_engine, plan, moments, change, precision="highest"):
    return _ROTATE_MOMENTS(factor_engine, plan, moments, {k: denoise(c) for k, c in change.items()}, precision)
  return rotate_moments


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode != "perm" and not mode.startswith("thr"):
    raise SystemExit(f"mode must be perm or thr<t>, got {mode!r}")
  soap_eigenbasis.rotate_moments = carried_by(mode)
  candidates = {f"soap4_4bit_{mode}": lambda: s4.soap4(1.0, **_Q),
                f"soap4_8bit_{mode}": lambda: s4.soap4(1.0, bits=8, **_Q),
                f"soap4_fp32_{mode}": lambda: s4.soap4(1.0, state_format="fp32", **_Q)}
  bits = os.environ.get("BITS", "4bit,8bit,fp32").split(",")
  illcond.ROWS.clear()
  illcond.ROWS.update(candidates)
  illcond.NO_PRECISION = tuple(candidates)
  rows = [r for r in candidates if r.split("_")[1] in bits]
  illcond.main(["--rows", *rows, *sys.argv[2:]])
