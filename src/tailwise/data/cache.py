"""Decode-once uint8 cache with a checksummed manifest.

A split is cached under ``<cache_dir>/<key>/`` where ``key`` hashes the source's fingerprint (content checksum
of a file, or the listing with sizes and mtimes of a directory) and the decode options. The entry holds
``images.npy`` (uint8 N x 3 x H x W), ``labels.npy``, and ``manifest.json`` (source, fingerprint, shape,
SHA-256 of the arrays, file names, classes, and the SHA-256 of all of that, so an edited manifest is caught too).
A second run loads the arrays in well under a second; an entry whose checksums do not match is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .sources import RawSplit

CACHE_VERSION = 2  # 2: the manifest is checksummed as a whole; archives with escaping member names are refused


def default_cache_dir() -> Path:
    return Path(os.environ.get("TAILWISE_CACHE", Path.home() / ".cache" / "tailwise"))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(path: str | os.PathLike) -> str:
    """Content SHA-256 of a file; for a directory, SHA-256 of its listing with sizes and mtimes."""
    path = Path(path)
    if path.is_file():
        return "sha256:" + _sha256_file(path)
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "listing-sha256:" + digest.hexdigest()


def _array_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()


def _manifest_sha256(manifest: dict) -> str:
    """SHA-256 of every manifest entry but the checksum itself (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def cached_split(source: str, options: dict, build: Callable[[], RawSplit], cache_dir: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> RawSplit:
    """Return the decoded split, from the cache when a valid entry exists, else ``build()`` it and store it.

    ``source`` is the path read; ``options`` everything else that changes the decoded result (split, image
    size, reader). ``cache_dir=False`` disables caching.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if cache_dir is False:
        return build()
    fingerprint = source_fingerprint(source)
    key_doc = json.dumps({"v": CACHE_VERSION, "fingerprint": fingerprint, **options}, sort_keys=True)
    key = hashlib.sha256(key_doc.encode()).hexdigest()[:24]
    entry = Path(cache_dir or default_cache_dir()) / key
    loaded = _load(entry)
    if loaded is not None:
        return loaded
    if entry.exists():
        log(f"cache entry {entry} is incomplete or corrupt; rebuilding it")
    start = time.perf_counter()
    split = build()
    _store(entry, split, {"source": str(Path(source).resolve()), "fingerprint": fingerprint, **options})
    log(f"decoded {len(split.labels)} images from {source} in {time.perf_counter() - start:.1f}s; cached at {entry}")
    return split


def _load(entry: Path) -> RawSplit | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        images = np.load(entry / "images.npy")
        labels = np.load(entry / "labels.npy")
        # an empty or cut file raises EOFError; a manifest without a key raises KeyError / TypeError
        if (manifest.get("manifest_sha256") != _manifest_sha256(manifest)
                or list(images.shape) != manifest.get("shape") or images.dtype != np.uint8
                or _array_sha256(images) != manifest.get("images_sha256")
                or _array_sha256(labels) != manifest.get("labels_sha256")):
            return None
        return RawSplit(images, labels, list(manifest["files"]), list(manifest["classes"]))
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None


def _store(entry: Path, split: RawSplit, info: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp", dir=entry.parent))
    try:
        np.save(tmp / "images.npy", np.ascontiguousarray(split.images))
        np.save(tmp / "labels.npy", split.labels)
        manifest = {**info, "shape": list(split.images.shape), "dtype": "uint8",
                    "images_sha256": _array_sha256(split.images), "labels_sha256": _array_sha256(split.labels),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "classes": split.classes, "files": split.files}
        manifest["manifest_sha256"] = _manifest_sha256(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _load(entry) is None:  # not another process having stored the same entry meanwhile
            raise
