"""Collectives in compiled XLA programs: whether each is ordered with the conditionals that hold collectives.

For ``tests/integration/test_collective_order.py`` (the reason is there)
and the fuzz of ``tests/integration/test_properties.py``.
"""

import re

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "collective-permute", "reduce-scatter")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")


def _opcode(rest):
  """The opcode of an instruction's right-hand side ``<shape> <opcode>(<operands>), <attributes>``."""
  if not rest.startswith("("):
    return re.match(r"\S+\s+([\w\-]+)\(", rest).group(1)
  depth = 0
  for position, ch in enumerate(rest):  # a tuple shape: up to its closing parenthesis
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return re.match(r"\s*([\w\-]+)\(", rest[position + 1:]).group(1)
  raise ValueError(f"unbalanced shape in {rest!r}")


def _is_collective(opcode):
  return opcode.removesuffix("-start") in COLLECTIVES


def _computations(hlo_text):
  """``{name: [instruction lines]}`` and the entry computation's name."""
  bodies, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      bodies[current] = []
      entry = current if header.group(1) else entry
    elif current is not None and _INSTRUCTION.match(line):
      bodies[current].append(line)
  return bodies, entry


def _holds_collectives(name, bodies, seen=None):
  """Whether computation ``name`` or one it calls has a collective."""
  seen = set() if seen is None else seen
  if name in seen or name not in bodies:
    return False
  seen.add(name)
  for line in bodies[name]:
    if _is_collective(_opcode(_INSTRUCTION.match(line).group(2))):
      return True
    if any(_holds_collectives(callee, bodies, seen) for callee in re.findall(r"%([\w.\-]+)", line)):
      return True
  return False


def unordered_collectives(hlo_text):
  """Pairs (conditional holding collectives, top-level collective) with no data path between them."""
  bodies, entry = _computations(hlo_text)
  operands, kinds = {}, {}
  for line in bodies[entry]:
    name, rest = _INSTRUCTION.match(line).groups()
    operands[name] = re.findall(r"%([\w.\-]+)", rest)
    opcode = _opcode(rest)
    branches = [n for n in operands[name] if n in bodies] if opcode == "conditional" else []
    if any(_holds_collectives(b, bodies) for b in branches):
      kinds[name] = "conditional"
    elif _is_collective(opcode):
      kinds[name] = "collective"
  for name in operands:
    operands[name] = [o for o in operands[name] if o in operands]

  def ancestors(name):
    found, todo = set(), [name]
    while todo:
      for o in operands[todo.pop()]:
        if o not in found:
          found.add(o)
          todo.append(o)
    return found

  up = {name: ancestors(name) for name in kinds}
  conditionals = [n for n, k in kinds.items() if k == "conditional"]
  return [(c, x) for c in conditionals for x in kinds if x != c and c not in up[x] and x not in up[c]]
