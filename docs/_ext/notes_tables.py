"""The tables of the design-notes page (``docs/results/notes.md``), made from their benchmark JSON files.

Like :mod:`results_tables`, each ``write_*`` function reads its JSON files and writes ``<name>.md`` into the output
folder, which the page includes; no number on the page is typed by hand.
"""

import pathlib

from results_tables import load_json, markdown_table

# (label, fp32-moments row, 8-bit-moments row) of benchmarks/results/speed_moments*.json
MOMENT_SPEED_ROWS = (
    ("AdamW (`s4.moments.scale_by_adam(bits=8)`)", "adamw", "adamw m8"),
    ("AdamW + 4-bit Shampoo", "ours eigen", "ours eigen m8"),
    ("same, `store_root=False`", "ours eigen no root", "ours eigen no root m8"),
    ("4-bit SOAP", "ours soap4", "ours soap4 m8"),
)
# (file, label of its base optimizer) of the momentum ensembles, in the order shown
ENSEMBLES = (
    ("momentum_sensitivity_ensemble_sgdm.json", "SGDM alone"),
    ("momentum_sensitivity_ensemble_sgdm_shampoo32.json", "SGDM + 32-bit Shampoo"),
    ("momentum_sensitivity_ensemble.json", "SGDM + 4-bit Shampoo (the example)"),
    ("momentum_sensitivity_ensemble_lr0.03.json", "SGDM + 4-bit Shampoo"),
)


def write_speed_moments(results_dir, out_dir):
  """Plain optimizer steps with fp32 and 8-bit moments, and 8-bit before the faster moment store."""
  now = load_json(results_dir, "speed_moments.json")["rows"]
  before = load_json(results_dir, "speed_moments_before.json")["rows"]
  rows = [[label, f"{now[fp32]['plain_ms']:.3g} ms", f"{now[m8]['plain_ms']:.3g} ms", f"{before[m8]['plain_ms']:.3g} ms"]
          for label, fp32, m8 in MOMENT_SPEED_ROWS]
  text = markdown_table(["plain step", "fp32 moments", "8-bit moments", "8-bit, before"], rows)
  (pathlib.Path(out_dir) / "speed_moments.md").write_text(text)


def _relative_gaps(per_seed_runs, reference, prefix):
  """``+x.y %`` (or ``diverged (step N)``) of each run named ``prefix #k`` against the ``reference`` run."""
  base = per_seed_runs[reference]["final_train_loss"]
  cells = []
  for name, run in per_seed_runs.items():
    if not name.startswith(prefix + " #"):
      continue
    if run["diverged"]:
      cells.append(f"diverged (step {run['first_blowup_step']})")
    else:
      cells.append(f"{100 * (run['final_train_loss'] / base - 1):+.1f} %")
  return " / ".join(cells)


def write_momentum_ensemble(results_dir, out_dir):
  """Per seed of the example's ensemble: fp32, fp32 with ulp-sized noise streams, and 8-bit rounding streams."""
  data = load_json(results_dir, "momentum_sensitivity_ensemble.json")
  rows = []
  for seed in data["seeds"]:
    runs = data["runs"][str(seed)]
    rows.append([seed, f"{runs['fp32']['final_train_loss']:.4f}", _relative_gaps(runs, "fp32", "fp32 + noise 1e-6"),
                 _relative_gaps(runs, "fp32", "m8")])
  streams = data["streams"]
  header = ["seed", "fp32", f"fp32 × (1 + 1e-6·N), {streams} streams", f"8-bit, {streams} rounding streams"]
  (pathlib.Path(out_dir) / "momentum_ensemble.md").write_text(markdown_table(header, rows))


def write_momentum_summary(results_dir, out_dir):
  """8-bit against fp32 momentum as distributions, for each base optimizer and learning rate."""
  rows = []
  for name, label in ENSEMBLES:
    data = load_json(results_dir, name)
    ensemble = data["ensemble"]
    per_seed = " / ".join(f"{100 * g:+.1f}" for g in ensemble["relative_gap_per_seed"])
    diverged = ensemble["diverged"]
    rows.append([f"{data['lr']:g}", label,
                 f"{100 * ensemble['relative_gap']:+.1f} % ± {100 * ensemble['relative_gap_stderr']:.1f} % "
                 f"(per seed {per_seed} %)", f"{diverged['reference']} / {diverged['m8']}", f"`{name}`"])
  header = ["`--ensemble`, lr", "base", "8-bit vs fp32 (+ 1e-6 streams)", "diverged (fp32 / 8-bit)", "file"]
  (pathlib.Path(out_dir) / "momentum_summary.md").write_text(markdown_table(header, rows))


def write_all(results_dir, out_dir):
  """Writes the notes page's generated tables."""
  write_speed_moments(results_dir, out_dir)
  write_momentum_ensemble(results_dir, out_dir)
  write_momentum_summary(results_dir, out_dir)
