"""Build the embedded demo dataset ``src/tailwise/demo_data/cifar10-lt-demo.tar.gz`` from ../shared/data.

A small real CIFAR-10-LT image-folder tree (JPEG files copied byte for byte from cifar10-jpg.tar.gz):
- train: the Cao et al. exponential profile with n_max = 1000 and imbalance ratio 50, i.e. per-class counts
  1000, 647, 419, 271, 175, 113, 73, 47, 30, 20 (2,795 images), selected with the Cao procedure (seed 0);
- val: 20 images per class from training images the subset did not use (a balanced validation split that is
  not the test set);
- test: the first 100 test images of every class by file name.

Usage: python scripts/make_demo_data.py [--source ../shared/data/cifar10-jpg.tar.gz]
"""
from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np

from tailwise.data.longtail import longtail_indices, profile_counts

OUT = Path(__file__).resolve().parents[1] / "src" / "tailwise" / "demo_data" / "cifar10-lt-demo.tar.gz"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"))
    args = ap.parse_args()
    with tarfile.open(args.source) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")}
    train = sorted((n for n in blobs if n.startswith("cifar10/train/")), key=lambda n: (n.split("/")[2], n.split("/")[3]))
    classes = sorted({n.split("/")[2] for n in train})
    labels = np.array([classes.index(n.split("/")[2]) for n in train])
    selected = longtail_indices(labels, profile_counts(1000, 10, 50), seed=0)
    unused = np.setdiff1d(np.arange(len(train)), selected)
    rng = np.random.default_rng(0)
    val = np.concatenate([rng.permutation(unused[labels[unused] == c])[:20] for c in range(10)])
    test = [n for c in classes for n in sorted(x for x in blobs if x.startswith(f"cifar10/test/{c}/"))[:100]]
    members = [(f"train/{train[i].split('/', 2)[2]}", train[i]) for i in sorted(selected)]
    members += [(f"val/{train[i].split('/', 2)[2]}", train[i]) for i in sorted(val)]
    members += [(f"test/{n.split('/', 2)[2]}", n) for n in test]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(OUT, "w:gz", compresslevel=9) as out:
        for arcname, src in members:
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime, info.mode = len(blobs[src]), 0, 0o644
            out.addfile(info, io.BytesIO(blobs[src]))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB): {len(selected)} train, {len(val)} val, {len(test)} test")


if __name__ == "__main__":
    main()
