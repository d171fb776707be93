"""``tailwise data verify``: check every entry of a list-file dataset (ImageNet-LT, Places-LT, iNaturalist-2018)
before a long streamed run trips over a bad one.

Each line must read ``<relative path> <label>`` (:func:`~tailwise.data.sources.parse_list_line`), the label must
lie in ``[0, num_classes)`` (``num_classes`` given, or one more than the largest label of the first list, the
training list), the path must stay inside the image root (not absolute, no ``..`` part; such an entry is reported
as "outside root" and its file is never opened), and the image must exist under the image root and decode
completely (PIL ``verify`` and a full ``load``). Images are checked in a process pool; an image listed twice is
checked once.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import DataError
from .sources import leaves_root, parse_list_line

KINDS = ("missing", "corrupt", "malformed", "label out of range", "outside root")


@dataclass
class Problem:
    kind: str  # one of KINDS
    where: str  # "<list file>:<line>"
    path: str  # the image path of the entry (the line itself for a malformed line)
    detail: str = ""


@dataclass
class VerifyReport:
    lists: list[str]
    entries: int = 0  # well-formed lines
    images: int = 0  # distinct images checked
    num_classes: int | None = None
    problems: list[Problem] = field(default_factory=list)

    def by_kind(self) -> dict[str, list[Problem]]:
        return {k: [p for p in self.problems if p.kind == k] for k in KINDS}

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: the verdict and the count of every problem kind found."""
        scope = (f"{self.entries} entries in {len(self.lists)} list file{'s' if len(self.lists) != 1 else ''}, "
                 f"{self.images} distinct images")
        if self.ok:
            return f"data verify: OK, {scope}, no problems"
        counts = ", ".join(f"{len(v)} {k}" for k, v in self.by_kind().items() if v)
        return f"data verify: {len(self.problems)} problems ({counts}) in {scope}"

    def details(self, show: int = 5) -> list[str]:
        """Per problem kind: its count and the first ``show`` offending entries."""
        lines = []
        for kind, found in self.by_kind().items():
            if not found:
                continue
            lines.append(f"{kind}: {len(found)}")
            for p in found[:show]:
                lines.append(f"  {p.where}: {p.path}" + (f" ({p.detail})" if p.detail else ""))
            if len(found) > show:
                lines.append(f"  ... and {len(found) - show} more")
        return lines


def check_image(path: str) -> tuple[str, str] | None:
    """None when ``path`` is an image that decodes completely; else ``(kind, detail)``."""
    from PIL import Image

    if not os.path.isfile(path):
        return "missing", "no such file"
    try:
        with Image.open(path) as img:
            img.verify()  # structure and checksums, without decoding the pixels
        with Image.open(path) as img:  # verify() leaves the image unusable: open again and decode it all
            img.load()
    except Exception as exc:  # noqa: BLE001 -- any decoder failure means the file is unusable
        return "corrupt", str(exc) or type(exc).__name__
    return None


def _read_entries(list_file: Path, report: VerifyReport) -> list[tuple[str, int, str]]:
    """(path, label, where) of the well-formed lines of ``list_file``; malformed lines go to ``report``."""
    if not list_file.is_file():
        raise DataError(f"list file {list_file} not found")
    entries = []
    for lineno, line in enumerate(list_file.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{list_file.name}:{lineno}"
        entry = parse_list_line(line)
        if entry is None:
            report.problems.append(Problem("malformed", where, repr(line), "expected '<relative path> <label>'"))
        else:
            entries.append((entry[0], entry[1], where))
    return entries


def verify_lists(lists: Sequence[str | Path], root: str | Path, num_classes: int | None = None, workers: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check the list files ``lists`` (the training list first) against the image root ``root``.
    ``progress(done, total)`` is called as images are checked; ``workers`` > 1 checks them in a process pool."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image root {root} is not a directory")
    report = VerifyReport([str(p) for p in lists])
    parsed = [_read_entries(Path(p), report) for p in lists]
    if num_classes is None and parsed and parsed[0]:
        num_classes = max(0, max(label for _, label, _ in parsed[0]) + 1)
    report.num_classes = num_classes
    where_of: dict[str, list[str]] = {}
    for entries in parsed:
        for path, label, where in entries:
            report.entries += 1
            if label < 0 or (num_classes is not None and label >= num_classes):
                report.problems.append(Problem("label out of range", where, path,
                                               f"label {label} not in [0, {num_classes})"))
            if leaves_root(path):
                report.problems.append(Problem("outside root", where, path, "absolute or '..' path; not read"))
            else:
                where_of.setdefault(path, []).append(where)
    paths = list(where_of)
    report.images = len(paths)
    for path, result in zip(paths, _check_all([str(root / p) for p in paths], workers, progress)):
        if result is not None:
            kind, detail = result
            report.problems.extend(Problem(kind, where, path, detail) for where in where_of[path])
    report.problems.sort(key=lambda p: (KINDS.index(p.kind), p.where))
    return report


def _check_all(paths: list[str], workers: int, progress: Callable[[int, int], None] | None) -> list:
    """``check_image`` of every path, in order; in a pool of ``workers`` processes when > 1."""
    total, results = len(paths), []
    step = max(1, min(1000, total // 100))

    def collect(iterator):
        for result in iterator:
            results.append(result)
            if progress is not None and (len(results) % step == 0 or len(results) == total):
                progress(len(results), total)

    if workers > 1 and total > 1:
        with multiprocessing.Pool(workers) as pool:
            collect(pool.imap(check_image, paths, chunksize=max(1, min(64, total // (4 * workers)))))
    else:
        collect(map(check_image, paths))
    return results
