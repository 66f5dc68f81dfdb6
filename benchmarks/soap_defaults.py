"""Research: the low-memory ``soap4`` defaults, old against new, on ``benchmarks/illcond.py``'s problems.

Rows (4-bit SOAP, ``min_quant_order=16`` as illcond's quantized rows): the former defaults
(``shampoo_beta`` 0.95 per refresh, ``head_fraction`` 1/16), each change alone, and both (the present
defaults at ``precondition_every=10``: ``shampoo_beta`` = 0.95**10, ``head_fraction`` 1/8). Same sweep,
seeds and metric as ``illcond.py``:

  python benchmarks/soap_defaults.py --problems ls_logunif_1e6 ls_logunif_1e4 deeplinear mlp \\
      --out benchmarks/results/soap_defaults.json
"""

from __future__ import annotations

import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import illcond  # noqa: E402

_Q = dict(weight_decay=0.0, min_quant_order=16)
OLD = dict(shampoo_beta=0.95, head_fraction=1 / 16)
CANDIDATES = {
    "old_defaults": lambda: s4.soap4(1.0, **OLD, **_Q),
    "beta_b2^f": lambda: s4.soap4(1.0, **{**OLD, "shampoo_beta": 0.95**10}, **_Q),
    "head_1/8": lambda: s4.soap4(1.0, **{**OLD, "head_fraction": 1 / 8}, **_Q),
    "both (new defaults)": lambda: s4.soap4(1.0, **_Q),
}

if __name__ == "__main__":
  illcond.ROWS.clear()
  illcond.ROWS.update(CANDIDATES)
  illcond.main(sys.argv[1:])
