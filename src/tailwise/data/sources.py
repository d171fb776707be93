"""Readers that turn a dataset on disk into decoded uint8 arrays.

Every reader returns :class:`RawSplit` objects: ``images`` uint8 ``N x 3 x H x W``, ``labels`` int64 ``N``,
``files`` (one name per sample, for error messages and provenance) and ``classes``. List files can also be read
without decoding (:func:`list_file_entries`, ``images`` None) for the streamed path.

Sample order (it defines the CIFAR-LT subset): CIFAR pickles in file order; image folders by class folder
(sorted names = label order), then by file name; list files in line order.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class RawSplit:
    images: np.ndarray | None  # uint8, N x 3 x H x W; None for list-file entries read without decoding
    labels: np.ndarray  # int64, N
    files: list[str]
    classes: list[str]


# --------------------------------------------------------------------------------------------------- decoding
def decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for an image it cannot decode (truncated, not an image, a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    return OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError


def decode_image(data: bytes, name: str, size: int | None) -> np.ndarray:
    """Decode encoded image bytes to a 3 x H x W uint8 array; resize (shorter side) + centre-crop to ``size``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = img.convert("RGB")
            if size is not None and img.size != (size, size):
                w, h = img.size
                scale = size / min(w, h)
                img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
                w, h = img.size
                left, top = (w - size) // 2, (h - size) // 2
                img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.uint8)
    except decode_errors() as exc:
        from PIL import UnidentifiedImageError

        # PIL names the in-memory buffer (<_io.BytesIO object at 0x...>) where it cannot identify the format
        reason = "not an image format PIL can read" if isinstance(exc, UnidentifiedImageError) else exc
        raise DataError(f"cannot decode image {name}: {reason}. Remove or replace the file.") from None
    return arr.transpose(2, 0, 1)


def _stack(arrays: list[np.ndarray], files: list[str], size: int | None) -> np.ndarray:
    if not arrays:
        return np.zeros((0, 3, size or 32, size or 32), dtype=np.uint8)
    shape = arrays[0].shape
    for arr, name in zip(arrays, files):
        if arr.shape != shape:
            raise DataError(
                f"image {name} has size {arr.shape[2]}x{arr.shape[1]} but {files[0]} has {shape[2]}x{shape[1]}; "
                "set data.image_size to resize all images to one size"
            )
    return np.stack(arrays)


def _decode_all(items: Iterable[tuple[str, bytes]], size: int | None, progress: Callable | None) -> tuple[list, list]:
    arrays, names = [], []
    for name, data in items:
        arrays.append(decode_image(data, name, size))
        names.append(name)
        if progress is not None and len(arrays) % 5000 == 0:
            progress(len(arrays))
    return arrays, names


# ----------------------------------------------------------------------------------------------- image folders
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _member_name(archive: Path, name: str) -> str:
    """An archive member's path relative to the archive root (leading ``./`` removed); a :class:`DataError`
    for an absolute name or one with a ``..`` part, which would place the file outside the tree."""
    parts = name.split("/")
    if name.startswith("/") or ".." in parts:
        raise DataError(f"archive {archive} has a member named {name!r}, which points outside the archive "
                        "(an absolute path or '..'); refusing to read the archive. Rebuild it with relative paths")
    while parts[:1] == ["."]:
        parts = parts[1:]
    return "/".join(parts)


class _Tree:
    """A read-only view of an image-folder tree that is a directory or a .tar/.tar.gz archive. Archive member
    names that leave the tree (absolute, ``..``) are refused (:func:`_member_name`)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"data.root {self.root} does not exist")
        self.is_archive = self.root.is_file()
        if self.is_archive and not tarfile.is_tarfile(self.root):
            raise DataError(f"data.root {self.root} is a file but not a .tar/.tar.gz archive")

    def files(self) -> list[str]:
        """All image files as '/'-separated paths relative to the root."""
        return self.listing()[0]

    def listing(self) -> tuple[list[str], list[str]]:
        """(image files, directories) as '/'-separated paths relative to the root. Directories are those the
        tree records (archives without directory entries list none); they reveal class folders without images."""
        if self.is_archive:
            with tarfile.open(self.root) as tar:
                members = [(_member_name(self.root, m.name), m) for m in tar.getmembers()]
            return ([name for name, m in members if m.isfile() and _is_image(name)],
                    [name.rstrip("/") for name, m in members if m.isdir()])
        out, dirs = [], []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            out.extend((rel / f).as_posix() for f in filenames if _is_image(f))
            dirs.extend((rel / d).as_posix() for d in dirnames)
        return out, dirs

    def read(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (path, bytes) for the wanted paths (archive order for tars: one sequential pass)."""
        if self.is_archive:
            with tarfile.open(self.root) as tar:
                for member in tar:
                    name = _member_name(self.root, member.name)
                    if name in wanted:
                        handle = tar.extractfile(member)
                        yield name, handle.read() if handle else b""
        else:
            for name in sorted(wanted):
                yield name, (self.root / name).read_bytes()


def _split_prefix(files: list[str], split: str) -> str:
    """Find the directory holding ``<split>/<class>/...``: the root itself or one top-level folder."""
    prefixes = {f.split("/")[0] + "/" for f in files if f.split("/")[1:2] == [split]}
    if any(f.startswith(split + "/") for f in files):
        return ""
    if len(prefixes) == 1:
        return prefixes.pop()
    return "" if not prefixes else sorted(prefixes)[0]


def read_image_folder(root, split: str, size: int | None = None, classes: list[str] | None = None,
                      progress: Callable | None = None) -> RawSplit:
    """Read ``root/<split>/<class>/*`` (root a directory or a .tar/.tar.gz archive, optionally with one
    top-level folder). Labels follow sorted class folder names, or ``classes`` when given (e.g. the train
    split's classes for the test split)."""
    tree = _Tree(root)
    files, dirs = tree.listing()
    prefix = _split_prefix(files, split) + split + "/"
    by_class: dict[str, list[str]] = {}
    for f in files:
        if f.startswith(prefix):
            parts = f[len(prefix):].split("/")
            if len(parts) >= 2:
                by_class.setdefault(parts[0], []).append(f)
    if not by_class:
        raise DataError(f"no images found under {root} for split '{split}' (expected {split}/<class>/<image>)")
    # class folders without any image still are classes (they must be reported as empty, not silently dropped,
    # which would shift the labels of every later class)
    empty_folders = {d[len(prefix):] for d in dirs if d.startswith(prefix) and "/" not in d[len(prefix):]
                     and not d[len(prefix):].startswith(".")} - set(by_class)
    names = sorted(set(by_class) | empty_folders) if classes is None else list(classes)
    unknown = sorted(set(by_class) - set(names))
    if unknown:
        raise DataError(f"split '{split}' of {root} has class folders not in the training split: {unknown[:5]}")
    ordered = [f for c in names for f in sorted(by_class.get(c, []))]
    label_of = {c: i for i, c in enumerate(names)}
    arrays, decoded_files = _decode_all(tree.read(set(ordered)), size, progress)
    decoded = dict(zip(decoded_files, arrays))  # archives yield members in archive order
    arrays = [decoded[f] for f in ordered]
    labels = np.array([label_of[f[len(prefix):].split("/")[0]] for f in ordered], dtype=np.int64)
    return RawSplit(_stack(arrays, ordered, size), labels, ordered, names)


# ------------------------------------------------------------------------------------------------ CIFAR pickles
# what a malformed (but safely unpickled) CIFAR file raises while its entries are read
_CIFAR_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError, AttributeError)

CIFAR_LAYOUTS = {
    10: {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "labels": b"labels",
         "meta": ("batches.meta", b"label_names"), "dir": "cifar-10-batches-py"},
    100: {"train": ["train"], "test": ["test"], "labels": b"fine_labels",
          "meta": ("meta", b"fine_label_names"), "dir": "cifar-100-python"},
}


def _numpy_globals() -> dict[str, object]:
    """The numpy functions and classes a pickled array or scalar is rebuilt with (taken from live objects, so the
    names of numpy 1 and 2 both resolve without importing numpy's deprecated ``numpy.core``)."""
    arr = np.zeros(1, np.uint8)
    return {"_reconstruct": arr.__reduce__()[0], "_frombuffer": arr.__reduce_ex__(5)[0],
            "scalar": np.uint8(0).__reduce__()[0], "ndarray": np.ndarray, "dtype": np.dtype}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, str/bytes, numbers and numpy arrays. Every other
    global (a function or class a crafted file would call) is refused before it is looked up, so no code from
    the file runs; the refusal is an :class:`pickle.UnpicklingError` naming the global."""

    NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                     "numpy._core.numeric")

    def find_class(self, module: str, name: str):
        if module == "_codecs" and name == "encode":  # bytes pickled by Python 3 at protocol 2
            import codecs

            return codecs.encode
        numpy_globals = _numpy_globals()
        if module in self.NUMPY_MODULES and name in numpy_globals:
            return numpy_globals[name]
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR file never holds (only dicts, "
                                     "lists, strings, bytes, numbers and numpy arrays are read)")


def _load_cifar_pickle(path: Path):
    """The object in the CIFAR pickle ``path``, read with :class:`_CifarUnpickler`."""
    with open(path, "rb") as fh:
        return _CifarUnpickler(fh, encoding="bytes").load()


def read_cifar_pickles(root, num_classes: int, split: str) -> RawSplit:
    """Read the CIFAR-10/100 python pickles (``data_batch_*``/``test_batch`` or ``train``/``test``). The files
    are unpickled with :class:`_CifarUnpickler`: one that refers to anything but plain data is refused with a
    :class:`DataError`, and no code from it runs."""
    layout = CIFAR_LAYOUTS[num_classes]
    root = Path(root)
    if (root / layout["dir"]).is_dir():
        root = root / layout["dir"]
    images, labels = [], []
    for name in layout[split]:
        path = root / name
        if not path.is_file():
            raise DataError(f"CIFAR-{num_classes} pickle {path} not found (expected the python version's files)")
        try:
            entry = _load_cifar_pickle(path)
            images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[layout["labels"]], dtype=np.int64))
        except _CIFAR_ERRORS as exc:
            raise DataError(f"CIFAR pickle {path} is corrupt or not a CIFAR-{num_classes} file: {exc}") from None
    meta_file, meta_key = layout["meta"]
    classes = [str(i) for i in range(num_classes)]
    if (root / meta_file).is_file():
        try:
            classes = [c.decode() for c in _load_cifar_pickle(root / meta_file)[meta_key]]
        except _CIFAR_ERRORS as exc:
            raise DataError(f"CIFAR pickle {root / meta_file} is corrupt or not a CIFAR-{num_classes} file: "
                            f"{exc}") from None
    images_arr, labels_arr = np.concatenate(images), np.concatenate(labels)
    files = [f"{layout[split][0]}#{i}" for i in range(len(labels_arr))]
    return RawSplit(images_arr, labels_arr, files, classes)


def is_cifar_pickle_dir(root, num_classes: int) -> bool:
    layout = CIFAR_LAYOUTS[num_classes]
    root = Path(root)
    return root.is_dir() and ((root / layout["test"][0]).is_file() or (root / layout["dir"]).is_dir())


# --------------------------------------------------------------------------------------------------- list files
def parse_list_line(line: str) -> tuple[str, int] | None:
    """One line of a list file, ``<relative path> <label>`` (the path may contain spaces) -> (path, label);
    None when the line does not have that form. Blank lines are the caller's to skip."""
    parts = line.rsplit(maxsplit=1)
    if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
        return None
    return parts[0], int(parts[1])


def leaves_root(path: str) -> bool:
    """Whether a list file's image path points outside the image root: an absolute path, or one with a ``..``
    part. Such entries are refused; the root's own symbolic links are followed as they are."""
    return Path(path).is_absolute() or ".." in Path(path).parts


def _list_lines(list_file: Path) -> list[str]:
    """The lines of a list file decoded as UTF-8; a :class:`DataError` naming the line of the first byte that
    is not UTF-8."""
    data = list_file.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        lineno = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{list_file}:{lineno}: not UTF-8 text (byte 0x{data[exc.start]:02x}); list files must be "
                        "UTF-8. List every problem with `tailwise data verify`") from None


def list_file_entries(list_file, image_root, num_classes: int | None = None) -> RawSplit:
    """The entries of an ImageNet-LT / Places-LT / iNaturalist-2018 split file (``<relative path> <label>`` per
    line, UTF-8), checked (form, label range, paths confined to ``image_root`` (:func:`leaves_root`), files present
    there) but not decoded: ``images`` is None."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"list file {list_file} not found")
    paths, labels = [], []
    for lineno, line in enumerate(_list_lines(list_file), 1):
        if not line.strip():
            continue
        entry = parse_list_line(line)
        if entry is None:
            raise DataError(f"{list_file}:{lineno}: expected '<relative path> <label>', got {line!r}")
        path, label = entry
        if leaves_root(path):
            raise DataError(f"{list_file}:{lineno}: image path {path!r} points outside the image root {image_root} "
                            "(absolute or '..'); list files name images relative to data.root. List every problem "
                            "with `tailwise data verify`")
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise DataError(f"{list_file}:{lineno}: label {label} out of range [0, {num_classes}) for {path}")
        paths.append(path)
        labels.append(label)
    if not paths:
        raise DataError(f"list file {list_file} has no entries")
    root = Path(image_root)
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} images of {list_file} are missing under {root}, e.g. {root / missing[0]}; "
                        "list every problem with `tailwise data verify`")
    n = num_classes if num_classes is not None else max(labels) + 1
    return RawSplit(None, np.asarray(labels, dtype=np.int64), paths, [str(i) for i in range(n)])


def read_list_file(list_file, image_root, size: int | None, num_classes: int | None = None,
                   progress: Callable | None = None) -> RawSplit:
    """Read and decode a list file's images (:func:`list_file_entries`), in line order."""
    entries = list_file_entries(list_file, image_root, num_classes)
    root = Path(image_root)
    arrays, _ = _decode_all(((p, (root / p).read_bytes()) for p in entries.files), size, progress)
    return RawSplit(_stack(arrays, entries.files, size), entries.labels, entries.files, entries.classes)


# ---------------------------------------------------------------------------------------------------- synthetic
def synthetic_split(num_classes: int, per_class: int, size: int = 32, seed: int = 0, offset: int = 0) -> RawSplit:
    """A learnable synthetic image set: each class is a fixed random low-frequency colour pattern plus noise.

    ``offset`` draws different samples (noise) for the same class patterns, e.g. for the test split.
    """
    proto_rng = np.random.default_rng(seed)
    coarse = proto_rng.uniform(40, 215, size=(num_classes, 3, 4, 4))
    protos = coarse.repeat(size // 4 + 1, axis=2).repeat(size // 4 + 1, axis=3)[:, :, :size, :size]
    rng = np.random.default_rng(seed + 1 + offset)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    images = np.empty((len(labels), 3, size, size), dtype=np.uint8)
    for c in range(num_classes):  # one class at a time keeps memory at one class's float noise
        noise = rng.standard_normal((per_class, 3, size, size), dtype=np.float32) * 40
        images[c * per_class:(c + 1) * per_class] = np.clip(protos[c] + noise, 0, 255).astype(np.uint8)
    files = [f"synthetic#{offset}:{i}" for i in range(len(labels))]
    return RawSplit(images, labels, files, [f"class{c:03d}" for c in range(num_classes)])
