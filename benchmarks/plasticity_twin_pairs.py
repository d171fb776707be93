"""The twin pairs of a finished plasticity run's final model: every pair of block-internal channels whose incoming
weights have cosine > 0.99 (the twin diagnostic's threshold), with each member's BatchNorm |gamma| and incoming-weight
norm over their layer's median -- whether the channels that stayed twins are dead (small gamma) or working ones.

    PYTHONPATH=src python benchmarks/plasticity_twin_pairs.py benchmarks/runs/<plasticity run>
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from tailwise.compress.groups import channel_groups
from tailwise.deploy import load_model
from tailwise.errors import TailwiseError
from tailwise.methods.plasticity.twins import channel_cosines, incoming_vectors


def twin_pairs(model: torch.nn.Module, threshold: float) -> list[tuple]:
    """``(layer, i, j, cosine, |γ_i|/med, |γ_j|/med, ||w_i||/med, ||w_j||/med)`` for every twin pair ``i < j``."""
    rows = []
    for g in channel_groups(model, torch.zeros(1, 3, 32, 32), "internal"):
        v = incoming_vectors(model, g)
        norm, cos = v.norm(dim=1), channel_cosines(v)
        bn = next(s for s in g.slices if s.module_name in g.norms and s.tensor_name == "weight")
        gamma = model.get_submodule(bn.module_name).weight.detach().abs().index_select(0, bn.index).double()
        for i, j in (cos > threshold).nonzero().tolist():
            if i < j:
                rows.append((g.name, i, j, float(cos[i, j]), float(gamma[i] / gamma.median()),
                             float(gamma[j] / gamma.median()), float(norm[i] / norm.median()),
                             float(norm[j] / norm.median())))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run directory (its model/ is read)")
    ap.add_argument("--threshold", type=float, default=0.99, help="incoming-weight cosine that makes a twin")
    args = ap.parse_args(argv)
    try:
        model = load_model(args.run / "model").eval()
    except (TailwiseError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = twin_pairs(model, args.threshold)
    print(f"{len(rows)} twin pairs ({2 * len(rows)} channels if no channel is in two pairs)")
    for r in rows:
        print("%-16s %3d %3d  cos %.4f  |gamma|/median %.2f %.2f  |w|/median %.2f %.2f" % r)
    if rows:
        print("median over the members: |gamma|/median %.2f, |w|/median %.2f"
              % (statistics.median(x for r in rows for x in r[4:6]),
                 statistics.median(x for r in rows for x in r[6:8])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
