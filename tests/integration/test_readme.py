"""The README's Quickstart snippet runs as written."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_quickstart_snippet_trains():
  text = README.read_text()
  snippet = re.search(r"## Quickstart.*?```python\n(.*?)```", text, re.S).group(1)
  namespace = {}
  exec(compile(snippet, "README-quickstart", "exec"), namespace)  # noqa: S102
  x, y = jnp.ones((8, 64)), jnp.arange(8) % 10
  losses = [float(namespace["train_step"](namespace["model"], namespace["optimizer"], x, y))
            for _ in range(3)]
  assert losses[-1] < losses[0]
