"""How much the last layer moves when it is taken after the final norm.

Probes a toy model (default: the cached base of ``configs/toy/pretrain.yaml``, built
first if absent) on the toy probe set with ``probe.final_norm`` false and true, and
prints the scores and the last layer's normalised and raw values of each quantity.
Usage: ``python scripts/measure_final_norm.py [MODEL_DIR]``.
"""

from __future__ import annotations

import sys

import numpy as np

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.config import PretrainToyConfig, ProbeConfig
from unifyreg.probing import run_probe
from unifyreg.quantities import QUANTITIES
from unifyreg.sources import load_examples
from unifyreg.toy.base import default_model_path


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else default_model_path(PretrainToyConfig())
    adapter = ToyAdapter.load(path)
    examples, _ = load_examples("toy", "probe_set")
    results = {}
    for final_norm in (False, True):
        result = run_probe(adapter, examples, ProbeConfig(final_norm=final_norm, batch_size=64))
        results[final_norm] = result
        scores = ", ".join(f"{k} {v:.4f}" for k, v in result.scores().items())
        print(f"final_norm={str(final_norm).lower()}: {scores}")
    last = adapter.num_layers
    print(f"\n| quantity | layer {last} normalised: before -> after the norm | raw bits |")
    print("|---|---|---|")
    for q in QUANTITIES:
        before, after = (results[v].pooled_mean(q, normalized=True) for v in (False, True))
        raw_before, raw_after = (results[v].pooled_mean(q, normalized=False) for v in (False, True))
        assert np.allclose(before[:-1], after[:-1])  # only the last layer differs
        print(
            f"| {q} | {before[-1]:.4f} -> {after[-1]:.4f} ({after[-1] - before[-1]:+.4f}) "
            f"| {raw_before[-1]:.3f} -> {raw_after[-1]:.3f} |"
        )


if __name__ == "__main__":
    main()
