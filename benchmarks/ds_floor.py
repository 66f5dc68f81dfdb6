"""Research: ``distributed_shampoo4``'s damping floor ``quant_damping`` on ``benchmarks/illcond.py``'s problems.

Rows: the float32 twin (Meta's algorithm) and the 4-bit alias with :math:`\\delta` = 0 (Meta's
:math:`\\epsilon = 10^{-12}` alone), 1e-6 (the default), 1e-5 and 1e-4; illcond's DS schedule (statistics
every step, roots every 10) and quantized rows (``min_quant_order=16``); ``ds10_*``: the float32 twin and the
4-bit alias without and with the floor, statistics every 10 steps and roots every 50. Same sweep, seeds and
metric:

  python benchmarks/ds_floor.py --problems ls_logunif_1e4 ls_logunif_1e6 ls_power_1e6 ls_power_1e8 deeplinear mlp \\
      --out benchmarks/results/ds_floor.json
"""

from __future__ import annotations

import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import illcond  # noqa: E402

_DS = dict(stats_every=1, root_every=10)
_DS10 = dict(stats_every=10, root_every=50)
_Q = dict(min_quant_order=16)
CANDIDATES = {
    "ds_fp32": lambda: s4.distributed_shampoo4(1.0, state_format="fp32", **_DS),
    "ds_4bit_floor0": lambda: s4.distributed_shampoo4(1.0, quant_damping=0.0, **_DS, **_Q),
    "ds_4bit_floor1e-6": lambda: s4.distributed_shampoo4(1.0, quant_damping=1e-6, **_DS, **_Q),
    "ds_4bit_floor1e-5": lambda: s4.distributed_shampoo4(1.0, quant_damping=1e-5, **_DS, **_Q),
    "ds_4bit_floor1e-4": lambda: s4.distributed_shampoo4(1.0, quant_damping=1e-4, **_DS, **_Q),
    # Statistics every 10 steps, roots every 50 (illcond's Shampoo schedule), where the 4-bit alias without
    # the floor was unstable at large learning rates:
    "ds10_fp32": lambda: s4.distributed_shampoo4(1.0, state_format="fp32", **_DS10),
    "ds10_4bit_floor0": lambda: s4.distributed_shampoo4(1.0, quant_damping=0.0, **_DS10, **_Q),
    "ds10_4bit_floor1e-6": lambda: s4.distributed_shampoo4(1.0, quant_damping=1e-6, **_DS10, **_Q),
}

if __name__ == "__main__":
  illcond.ROWS.clear()
  illcond.ROWS.update(CANDIDATES)
  illcond.NO_PRECISION = tuple(CANDIDATES)
  illcond.main(sys.argv[1:])
