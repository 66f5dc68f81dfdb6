"""Research: how a refresh rectifies 4-bit SOAP's low-bit basis rows, on ``benchmarks/illcond.py``'s problems.

Rows (``min_quant_order=16`` as illcond's quantized rows; the authors' dense float32 SOAP as the reference):

* ``soap_ref``: the authors' SOAP (``benchmarks/soap_reference.py``);
* ``tail_bjorck``: ``soap4`` with ``tail_rectify="bjorck"`` (the 4-bit rows projected out of the 8-bit head,
  then one Björck step, before the statistic is rebuilt from the basis at a refresh);
* ``tail_qr``: ``tail_rectify="qr"`` (projected out of the head, then Gram–Schmidt in descending-eigenvalue
  order by one QR per factor: exactly orthonormal);
* ``tail_qr_every_step``: ``"qr"`` at refreshes and the same Gram–Schmidt at every step's use of the basis
  (a QR per factor per step);
* ``tail_qr_head1/4``: the same with a quarter of the rows in the 8-bit head;
* ``beta0.36`` / ``beta0.36_tail_qr``: a shorter statistic memory (``shampoo_beta`` 0.36 per refresh, the
  default's square), with each tail rectification;
* ``tail_qr_every_step_head1/4``: per-step Gram–Schmidt with a quarter of the rows in the 8-bit head;
* ``project_nu_off`` / ``8bit_project_nu_off`` / ``tail_qr_project_nu_off``: ``v`` only permuted at a
  refresh (as the authors' SOAP), 4-bit / 8-bit / 4-bit with ``tail_rectify="qr"``.

Same sweep, seeds and metric as ``illcond.py``:

  python benchmarks/soap_tail.py --problems ls_logunif_1e6 ls_power_1e6 ls_logunif_1e4 deeplinear mlp \\
      --out benchmarks/results/soap_tail.json
"""

from __future__ import annotations

import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import illcond  # noqa: E402
from benchmarks.soap_reference import soap_reference  # noqa: E402

_Q = dict(weight_decay=0.0, min_quant_order=16)
CANDIDATES = {
    "soap_ref": lambda: soap_reference(1.0, weight_decay=0.0),
    "tail_bjorck": lambda: s4.soap4(1.0, tail_rectify="bjorck", **_Q),
    "tail_qr": lambda: s4.soap4(1.0, tail_rectify="qr", **_Q),
    "tail_qr_every_step": lambda: s4.soap4(1.0, tail_rectify="qr_every_step", **_Q),
    "tail_qr_head1/4": lambda: s4.soap4(1.0, tail_rectify="qr", head_fraction=0.25, **_Q),
    "beta0.36": lambda: s4.soap4(1.0, shampoo_beta=0.36, **_Q),
    "beta0.36_tail_qr": lambda: s4.soap4(1.0, shampoo_beta=0.36, tail_rectify="qr", **_Q),
    "project_nu_off": lambda: s4.soap4(1.0, project_nu=False, **_Q),
    "8bit_project_nu_off": lambda: s4.soap4(1.0, bits=8, project_nu=False, **_Q),
    "tail_qr_project_nu_off": lambda: s4.soap4(1.0, tail_rectify="qr", project_nu=False, **_Q),
    "tail_qr_every_step_head1/4": lambda: s4.soap4(1.0, tail_rectify="qr_every_step", head_fraction=0.25, **_Q),
}

if __name__ == "__main__":
  illcond.ROWS.clear()
  illcond.ROWS.update(CANDIDATES)
  illcond.NO_PRECISION = tuple(CANDIDATES)
  illcond.main(sys.argv[1:])
