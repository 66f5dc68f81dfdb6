"""Research: how 4-bit SOAP carries Adam's moments into a refreshed basis, on ``benchmarks/illcond.py``'s problems.

At a refresh ``soap4`` carries the moments by a change of basis :math:`C` (``m <- C m``, ``v <- (C∘C) v``).
Carried by the two decoded bases, :math:`C = R_{new} R_{old}^\\top` (``carry="decoded"``), each basis
brings its own 4-bit rounding, so :math:`C` holds entries of about 0.02 (rms; up to 0.09, order 64) that
are rounding only, and they move a share of the large coordinates' moments into the small ones at every
refresh. Modes (the first word on the command line):

* ``decoded``: ``carry="decoded"`` (the carry above);
* ``refreshed``: ``carry="refreshed"`` (an option; the default is ``"decoded"``):
  :math:`C = P^\\top R_{old}^\\top` with :math:`P` the refresh's float32 eigenvectors before they are
  quantized: the refresh's rotation, no rounding;
* ``refreshed_vperm``: the same with ``project_nu=False`` (``v`` only permuted by the sort, as the
  authors' SOAP);
* ``refresh_rows``: :math:`C = P^\\top V^\\top`, with :math:`V` the old basis as the refresh decodes it
  (one Björck step per tier) in place of the steps' decoding :math:`R_{old}` (tiers projected): the QR
  step's own rotation only (a patch of ``factors.update_eigen_stats`` and
  ``soap_eigenbasis.basis_change`` in this process only);
* ``perm``: the decoded :math:`C`'s signed-permutation part (per row, the largest entry's sign; the moments
  only follow the re-sorting, no rotation at all; a patch of ``soap_eigenbasis.rotate_moments``);
* ``thr<t>``: the decoded :math:`C` with the entries of magnitude at most ``t`` set to 0 (the same patch).

Rows: ``soap4`` 4-bit / 8-bit / float32 with that carry (``BITS=4bit,8bit,fp32`` picks them);
compare with ``soap4_*`` of ``benchmarks/results/illcond.json``. Same sweep, seeds and metric as ``illcond.py``:

  BITS=4bit python benchmarks/soap_carry.py refreshed_vperm --problems ls_logunif_1e4 mlp \\
      --out benchmarks/results/soap_carry.json --merge
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
from optax_shampoo4 import factors as fct  # noqa: E402
from optax_shampoo4 import linalg, soap_eigenbasis  # noqa: E402

_ROTATE_MOMENTS = soap_eigenbasis.rotate_moments
_UPDATE_EIGEN_STATS = fct.update_eigen_stats
_Q = dict(weight_decay=0.0, min_quant_order=16)
# Modes that are options of soap4 (no patch).
OPTION_MODES = {"decoded": dict(carry="decoded"), "refreshed": dict(carry="refreshed"),
                "refreshed_vperm": dict(carry="refreshed", project_nu=False)}


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
    dense = soap_eigenbasis.rows_of(change)  # one device: formed already
    denoised = soap_eigenbasis.Rows({k: denoise(c) for k, c in dense.items()}, None)
    return _ROTATE_MOMENTS(factor_engine, plan, moments, denoised, precision)
  return rotate_moments


def refresh_own_rotation(config, bucket, grams, beta, row_order=None):
  """``update_eigen_stats`` returning, in place of the refreshed rows, :math:`P^\\top V^\\top`: the QR step's rotation."""
  new, ok, refreshed = _UPDATE_EIGEN_STATS(config, bucket, grams, beta, row_order)
  rows = fct.rectified(bucket.eigvecs, config.bjorck_steps[0], tail_qr=config.tail_rectify != "bjorck")
  if row_order is not None:
    rows = jnp.take_along_axis(rows, row_order[:, :, None], axis=1)
  return new, ok, linalg.matmul(refreshed, linalg.transpose(rows))


def change_as_refreshed(opts, factor_engine, buckets, current, refreshed, accepted):
  """``basis_change`` for :func:`refresh_own_rotation`: its rotation where accepted, the identity elsewhere."""
  return soap_eigenbasis.Rows({name: jnp.where(accepted[name][:, None, None], c, jnp.eye(c.shape[-1], dtype=c.dtype))
                               for name, c in refreshed.items()}, None)


def patch(mode: str) -> dict:
  """Patches this process for ``mode``; returns soap4's options for it."""
  if mode in OPTION_MODES:
    return OPTION_MODES[mode]
  if mode == "refresh_rows":
    fct.update_eigen_stats = refresh_own_rotation
    soap_eigenbasis.basis_change = change_as_refreshed
    return {}
  if mode == "perm" or mode.startswith("thr"):
    soap_eigenbasis.rotate_moments = carried_by(mode)
    return dict(carry="decoded")
  raise SystemExit(f"mode must be one of {[*OPTION_MODES, 'refresh_rows', 'perm']} or thr<t>, got {mode!r}")


if __name__ == "__main__":
  mode = sys.argv[1]
  extra = patch(mode)
  candidates = {f"soap4_4bit_{mode}": lambda: s4.soap4(1.0, **_Q, **extra),
                f"soap4_8bit_{mode}": lambda: s4.soap4(1.0, bits=8, **_Q, **extra),
                f"soap4_fp32_{mode}": lambda: s4.soap4(1.0, state_format="fp32", **_Q, **extra)}
  bits = os.environ.get("BITS", "4bit,8bit,fp32").split(",")
  illcond.ROWS.clear()
  illcond.ROWS.update(candidates)
  illcond.NO_PRECISION = tuple(candidates)
  rows = [r for r in candidates if r.split("_")[1] in bits]
  illcond.main(["--rows", *rows, *sys.argv[2:]])
