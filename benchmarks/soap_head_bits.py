"""Research: how precise 4-bit SOAP's head rows must be, on ``benchmarks/illcond.py``'s problems.

``soap4`` keeps the rows of each basis' largest eigenvalues (``head_fraction``, 1/8) in more bits and
projects them out of the 4-bit rows. A coordinate whose row overlaps a dominant direction by
:math:`\\delta` sees about :math:`\\delta^2\\lambda_{\\max}` of it in Adam's second moment; where the statistic
spans many decades this swamps the small coordinates unless the dominant rows are precise to about
:math:`\\kappa^{-1/2}`. Rows (same sweep, seeds and metric as ``illcond.py``, ratios to the authors' SOAP):

* ``soap4_head8``: an 8-bit head, no second tier (``head_bits=8``: the default before);
* ``soap4_head16``: a 16-bit head, no second tier (``head_bits=16, mid_fraction=0``);
* ``soap4_head16_mid8``: a 16-bit head and the next 1/8 of the rows in 8 bits (the defaults), each tier
  rectified after the ones before it.

  python benchmarks/soap_head_bits.py [--problems ls_power_1e6 ls_logunif_1e6] \\
      [--out benchmarks/results/soap_head_bits.json]
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
CANDIDATES = {
    "soap4_head8": lambda **kw: s4.soap4(1.0, head_bits=8, mid_fraction=0.0, **_Q, **kw),
    "soap4_head16": lambda **kw: s4.soap4(1.0, head_bits=16, mid_fraction=0.0, **_Q, **kw),
    "soap4_head16_mid8": lambda **kw: s4.soap4(1.0, head_bits=16, mid_fraction=1 / 8, **_Q, **kw),
}


def main(argv: list[str] | None = None) -> dict:
  """Runs ``illcond.main`` with the reference SOAP and the head variants as its rows."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--out" not in argv:
    argv += ["--out", str(_ROOT / "benchmarks" / "results" / "soap_head_bits.json")]
  illcond.ROWS.update(CANDIDATES)
  return illcond.main(["--rows", "soap_ref", *CANDIDATES, *argv])


if __name__ == "__main__":
  main()
