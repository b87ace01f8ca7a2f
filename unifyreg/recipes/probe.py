"""Recipe ``probe``: the paper's two-level entropy probe on one model.

Load the model through its adapter -> read the probe set (the toy world's fixed probe
sets, or a JSONL manifest) -> :func:`unifyreg.probing.run_probe` -> write ``result.json``
(per-sample values), ``summary.json`` (statistics and scores), ``table.md``/``table.csv``
(Table-1 style), ``stats.csv`` (every statistic) and two figures to ``output_dir``.
Skipped bad manifest lines (``on_bad_example=skip``) are printed, counted in the output
and in ``result.json`` (``meta.skipped_examples``).
"""

from __future__ import annotations

import sys
import time

from unifyreg.config import ProbeRunConfig
from unifyreg.probing import run_probe
from unifyreg.recipes.common import drop_examples_that_do_not_fit, load_adapter, load_probe_set

__all__ = ["run"]


def run(cfg: ProbeRunConfig) -> int:
    """Command ``unifyreg probe``."""
    examples, skipped = load_probe_set(cfg.probe_set, cfg.pretrain.world, cfg.on_bad_example)
    adapter = load_adapter(cfg.model, cfg.pretrain)
    examples, too_long = drop_examples_that_do_not_fit(
        adapter, examples, cfg.on_bad_example, "probe_set"
    )
    skipped += too_long
    if skipped:
        print(f"probe_set: {skipped} bad example(s) skipped (on_bad_example=skip)")
    start = time.perf_counter()
    result = run_probe(adapter, examples, cfg.probe, progress=sys.stderr.isatty())
    result.meta.update(
        {
            "probe_set": cfg.probe_set,
            "skipped_examples": skipped,
            "seconds": time.perf_counter() - start,
        }
    )
    paths = result.write(cfg.output_dir, figures=cfg.figures)
    print(result.table())
    for name, value in result.scores().items():
        print(f"unify/{name} = {value:.4f}")
    print(f"probe of {len(examples)} examples in {result.meta['seconds']:.1f} s; wrote:")
    for path in paths.values():
        print(f"  {path}")
    return 0
