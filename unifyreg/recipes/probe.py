"""Recipe ``probe``: the paper's two-level entropy probe on one model.

Read the probe set (an example source such as the toy world's fixed probe sets, or a
JSONL manifest; the adapter's default when empty) -> load the model through its adapter
-> check the probed layers -> :func:`unifyreg.probing.run_probe` -> write ``result.json``
(per-sample values), ``summary.json`` (statistics and scores), ``table.md``/``table.csv``
(Table-1 style), ``stats.csv`` (every statistic) and two figures to ``output_dir``
(:func:`unifyreg.report.write_probe_result`). Skipped bad manifest lines
(``on_bad_example=skip``) are printed, counted in the output and in ``result.json``
(``meta.skipped_examples``). ``--dry-run`` stops before the first forward pass.
"""

from __future__ import annotations

import sys
import time

from unifyreg.config import ProbeRunConfig
from unifyreg.probing import run_probe
from unifyreg.recipes.common import (
    check_layers,
    drop_examples_that_do_not_fit,
    load_adapter,
    load_probe_set,
    model_directory,
)
from unifyreg.report import probe_table, write_probe_result

__all__ = ["run"]


def run(cfg: ProbeRunConfig, dry_run: bool = False) -> int:
    """Command ``unifyreg probe`` (``dry_run``: load and check everything, probe nothing)."""
    examples, skipped = load_probe_set(
        cfg.probe_set, cfg.model.adapter, cfg.pretrain, cfg.on_bad_example
    )
    if dry_run and not model_directory(cfg.model, cfg.pretrain, build=False).exists():
        where = model_directory(cfg.model, cfg.pretrain, build=False)
        print(f"dry run: the default model would be built first ({where}); probe set checked")
        return 0
    adapter = load_adapter(cfg.model, cfg.pretrain)
    layers = check_layers(adapter, cfg.probe.layers, "probe.layers")
    examples, too_long = drop_examples_that_do_not_fit(
        adapter, examples, cfg.on_bad_example, "probe_set"
    )
    skipped += too_long
    if skipped:
        print(f"probe_set: {skipped} bad example(s) skipped (on_bad_example=skip)")
    if dry_run:
        print(f"dry run: {len(examples)} probe examples, layers {list(layers)}; nothing probed")
        return 0
    start = time.perf_counter()
    result = run_probe(adapter, examples, cfg.probe, progress=sys.stderr.isatty())
    result.meta.update(
        {
            "probe_set": cfg.probe_set,
            "skipped_examples": skipped,
            "seconds": time.perf_counter() - start,
        }
    )
    paths = write_probe_result(result, cfg.output_dir, figures=cfg.figures)
    print(probe_table(result))
    for name, value in result.scores().items():
        print(f"unify/{name} = {value:.4f}")
    print(f"probe of {len(examples)} examples in {result.meta['seconds']:.1f} s; wrote:")
    for path in paths.values():
        print(f"  {path}")
    return 0
