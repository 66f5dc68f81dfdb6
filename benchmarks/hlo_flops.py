"""Matrix-product flops per device, counted in a compiled program's HLO.

``jax.jit(f).lower(...).compile().as_text()`` is the per-device program after
XLA's SPMD partitioning (and ``shard_map`` bodies are per-device already), so
the ``dot`` instructions in it have per-device shapes. :func:`dot_flops`
sums ``2 · prod(output shape) · prod(contracted sizes)`` over them, split into
the dots that run on every call and those inside ``conditional`` branches
(e.g. Shampoo's gated statistics and root refreshes), which run only when
their branch is taken. Deterministic: no timing involved.
"""

from __future__ import annotations

import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_SHAPE = r"(?:[a-z]+\d*)\[([\d,]*)\]"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*" + _SHAPE)
_PARAM = re.compile(r"([\w.\-]+):\s*" + _SHAPE)
_DOT = re.compile(r"=\s*" + _SHAPE + r"\S*\s+dot\(%([\w.\-]+),\s*%([\w.\-]+)\)(.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COND_TARGETS = re.compile(r"(?:true_computation|false_computation)=%([\w.\-]+)")


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def dot_flops(hlo_text: str) -> dict[str, int]:
  """Flops of the ``dot`` instructions of an HLO module, per call of the entry computation.

  Args:
    hlo_text: ``compiled.as_text()`` (or any HLO module text).

  Returns:
    ``{"every_call": flops outside conditional branches, "in_branches": flops
    inside them (all branches summed), "dots": number of dot instructions}``.
  """
  computations: dict[str, list[str]] = {}
  shapes: dict[str, tuple[int, ...]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      computations[current] = []
      for name, dims in _PARAM.findall(header.group(2)):
        shapes[name] = _dims(dims)
      continue
    if current is None:
      continue
    if line.startswith("}"):
      current = None
      continue
    computations[current].append(line)
    instruction = _INSTRUCTION.match(line)
    if instruction:
      shapes[instruction.group(1)] = _dims(instruction.group(2))

  callees: dict[str, set[str]] = {name: set() for name in computations}
  branch_roots: set[str] = set()
  for name, lines in computations.items():
    for line in lines:
      callees[name].update(_CALLS.findall(line))
      branch_roots.update(_COND_TARGETS.findall(line))
      for group in _BRANCHES.findall(line):
        targets = [t.strip().lstrip("%") for t in group.split(",") if t.strip()]
        branch_roots.update(targets)
        callees[name].update(targets)
  in_branch, stack = set(), list(branch_roots)
  while stack:
    name = stack.pop()
    if name in in_branch or name not in computations:
      continue
    in_branch.add(name)
    stack.extend(callees[name])

  totals = {"every_call": 0, "in_branches": 0, "dots": 0}
  for name, lines in computations.items():
    for line in lines:
      dot = _DOT.search(line)
      if not dot:
        continue
      out_dims, lhs, attributes = _dims(dot.group(1)), dot.group(2), dot.group(4)
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attributes)
      lhs_dims = shapes[lhs]
      contracted = math.prod(lhs_dims[i] for i in _dims(contracting.group(1))) if contracting else 1
      flops = 2 * math.prod(out_dims) * contracted
      totals["in_branches" if name in in_branch else "every_call"] += flops
      totals["dots"] += 1
  return totals


_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+(all-gather(?:-start)?)\(")
_TYPED_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


def all_gathers(hlo_text: str) -> list[dict]:
  """The ``all-gather`` instructions of an HLO module with their result types.

  Args:
    hlo_text: ``compiled.as_text()`` (the per-device program).

  Returns:
    One ``{"name", "dtype", "shape", "elements"}`` per all-gather (for an
    asynchronous ``all-gather-start``, its gathered result: the last array of
    its result tuple), in program order. ``elements`` is the product of the
    per-device result shape: what every device holds after the gather.
  """
  found = []
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.match(line)
    if not match:
      continue
    typed = _TYPED_SHAPE.findall(match.group(2))
    if not typed:
      continue
    dtype, dims = typed[-1]
    shape = _dims(dims)
    found.append({"name": match.group(1), "dtype": dtype, "shape": shape, "elements": math.prod(shape)})
  return found
