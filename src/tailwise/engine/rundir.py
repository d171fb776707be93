"""The run directory: one process at a time, nothing half-written, and a resume that continues exactly the run
that was started.

- :class:`RunLock` holds an exclusive lock on ``DIR/.lock`` for the life of a run; a second process is refused
  with the PID of the holder. The operating system drops the lock when its process dies, so ``kill -9`` never
  leaves a stale one.
- :func:`claim_run_dir` is what :func:`tailwise.run` does around a run: create (or check) the directory, lock
  it, delete the temporary files an interrupted atomic write left, read and check the checkpoint a resume
  continues from, and remove a new run's directory again when the run fails before its first checkpoint.
- :func:`read_resume_checkpoint` refuses a checkpoint written under another config: only the keys in
  :data:`tailwise.config.RESUME_OVERRIDES` may differ (they change how a run executes, not its results).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from ..config import RESUME_OVERRIDES, Config, dump_config, dotted_keys
from ..errors import ConfigError, TailwiseError, TrainingError
from ..atomic import atomic_write_text
from .checkpoint import load_checkpoint

LOCK_NAME = ".lock"
LAST = Path("checkpoints") / "last.pt"
_TEMPORARY = re.compile(r".+\.[a-z0-9_]{8}\.tmp")  # atomic_write_bytes' names: tempfile.mkstemp(NAME., .tmp)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RunLock:
    """An exclusive ``flock`` on ``DIR/.lock``. The file holds the holder's PID and is removed on release."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> "RunLock":
        """Lock ``directory``; a :class:`TrainingError` naming the holder's PID when another process holds it.
        Other OS errors (no permission, no such directory) are raised as they are."""
        path = Path(directory) / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise TrainingError(f"run directory {directory} is in use by another tailwise process (PID {holder}); "
                                    "wait for it to finish or stop it, then try again") from None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed this file while we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (in this order: nobody can lock a removed file)."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


# --------------------------------------------------------------------------------------------- config record
def config_record(cfg: Config) -> dict:
    """What a checkpoint stores about the config it was written under: ``config`` (the resolved config as
    canonical JSON of dotted keys, without :data:`RESUME_OVERRIDES`) and ``config_sha256`` (its SHA-256)."""
    flat = {k: v for k, v in dotted_keys(cfg.to_dict()).items() if k not in RESUME_OVERRIDES}
    text = json.dumps(flat, sort_keys=True)
    return {"config": text, "config_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _check_config(state: dict, cfg: Config, path: Path) -> None:
    """Refuse to continue a checkpoint written under another config. Keys only one side knows (added or removed
    by another tailwise version) are not compared; a checkpoint without a record (older versions) is not checked."""
    if "config_sha256" not in state:
        return
    now = config_record(cfg)
    if state["config_sha256"] == now["config_sha256"]:
        return
    try:
        saved = json.loads(state["config"])
        current = json.loads(now["config"])
        diffs = [f"{k}: {saved[k]!r} when it was trained, {current[k]!r} now" for k in sorted(saved)
                 if k in current and saved[k] != current[k]]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TrainingError(f"checkpoint {path} has a damaged config record; delete it to restart from scratch, or "
                            "restore it from a copy") from None
    if diffs:
        run_dir = path.parent.parent
        raise ConfigError(f"{run_dir / 'config.yaml'} differs from the config {path} was trained under: "
                          f"{'; '.join(diffs)}. --resume continues a run exactly: restore config.yaml, or start a new "
                          f"run with the new settings (only {', '.join(RESUME_OVERRIDES)} may change on resume)")


def read_resume_checkpoint(out: str | os.PathLike, cfg: Config) -> dict:
    """``out/checkpoints/last.pt``, read safely (:func:`~.checkpoint.load_checkpoint`: a corrupt or code-carrying
    file is refused with a message) and written under the same config as ``cfg`` apart from
    :data:`RESUME_OVERRIDES` (else a :class:`ConfigError` naming every differing key)."""
    path = Path(out) / LAST
    if not path.is_file():
        raise TrainingError(f"cannot resume: {path} does not exist (the run never finished an epoch)")
    state = load_checkpoint(path, "cpu")  # RNG states must stay on the CPU; load_state_dict moves the rest
    _check_config(state, cfg, path)
    return state


# ---------------------------------------------------------------------------------------------- the directory
def _refuse_unusable(out: Path) -> None:
    """A new run's directory must be absent or empty (but for a lock file); a file is refused."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory; choose a directory path")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise TrainingError(f"{out} already contains files; choose another --out or continue it with --resume {out}")


def prepare_run_dir(cfg: Config, out: str | os.PathLike) -> None:
    """Create the run directory ``out`` and write ``config.yaml``; refuse a file, a directory holding anything
    (but a lock file) and a path that cannot be created (under a file, under ``/proc``, no permission) with a
    :class:`TrainingError`."""
    out = Path(out)
    try:
        _refuse_unusable(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    except OSError as exc:
        raise TrainingError(f"cannot create the run directory {out}: {exc.strerror or exc}; choose another "
                            "--out") from None


def _remove_temporaries(out: Path, log: Callable[[str], None]) -> None:
    """Delete the temporary files of atomic writes that a kill interrupted (``NAME.XXXXXXXX.tmp`` beside the
    file). Only safe under the run's lock: no other process is writing them."""
    found = [p for folder in (out, out / "checkpoints", out / "model") if folder.is_dir()
             for p in sorted(folder.iterdir()) if p.is_file() and _TEMPORARY.fullmatch(p.name)]
    for p in found:
        p.unlink()
    if found:
        log(f"removed {len(found)} temporary file(s) left by an interrupted write: {', '.join(p.name for p in found)}")


def _prepare_resume(out: Path, log: Callable[[str], None]) -> None:
    """Under the lock: delete stale temporary files; a run without a checkpoint (no epoch finished) starts
    again at epoch 0, without the cut record its metrics.jsonl may hold."""
    _remove_temporaries(out, log)
    if (out / LAST).is_file():
        return
    if (out / "branch.json").is_file():
        raise TrainingError(f"{out} was branched with --branch-from but never finished an epoch, so there is "
                            f"nothing to resume; delete {out} and start the branch again")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    log(f"{out} has no checkpoint yet (no epoch finished): starting it from epoch 0")


def _claim(cfg: Config, out: Path, resume: bool, log: Callable[[str], None]) -> tuple[RunLock, bool]:
    """Lock ``out`` and prepare it (rank 0's part of :func:`claim_run_dir`); returns the lock and whether
    ``out`` was created here. On failure nothing is held and nothing created here is left."""
    created, lock = False, None
    try:
        if not resume:
            _refuse_unusable(out)  # before anything is created
            created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(out)
        if resume:
            _prepare_resume(out, log)
        else:
            prepare_run_dir(cfg, out)  # checks again, under the lock
        return lock, created
    except BaseException as exc:
        if lock is not None:
            lock.release()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):  # under a file, under /proc, no permission, read-only
            raise TrainingError(f"cannot use the run directory {out}: {exc.strerror or exc}"
                                + ("" if resume else "; choose another --out")) from None
        raise


def _remove_new_run(out: Path, created: bool, log: Callable[[str], None]) -> None:
    """Remove what a new run wrote into ``out`` (all of ``out`` if the run created it); the lock file stays to
    its holder."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
    else:
        for p in out.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name != LOCK_NAME:
                p.unlink(missing_ok=True)
    log(f"the run stopped before its first checkpoint; removed what it had written to {out}")


@contextlib.contextmanager
def claim_run_dir(cfg: Config, out: str | os.PathLike, resume: bool, dist) -> Iterator[dict | None]:
    """Hold the run directory ``out`` for one run. Rank 0 of a data-parallel job (``dist``,
    :class:`~tailwise.engine.dist.Dist`) does the file work; every process gets its outcome.

    A new run: ``out`` must be absent or empty and not a file; it is created, locked and given ``config.yaml``.
    If the run fails before its first checkpoint, what it wrote is removed again (nothing half-written; the
    same ``--out`` can be used again). A resume: ``out`` is locked, and temporary files of interrupted writes are
    deleted. Yields the checkpoint to continue from (:func:`read_resume_checkpoint`), or None for a new run and
    for a run that never finished an epoch (it starts at epoch 0). The lock is released on exit.
    """
    out, lock, created, failed = Path(out), None, False, None
    if dist.is_main:
        try:
            lock, created = _claim(cfg, out, resume, _stderr)
        except TailwiseError as exc:
            failed = exc
    if dist.any(failed is not None):
        raise failed or TrainingError(f"rank 0 could not take the run directory {out}")
    try:
        yield read_resume_checkpoint(out, cfg) if resume and (out / LAST).is_file() else None
    except BaseException:
        if dist.is_main and not resume and not (out / LAST).is_file():
            _remove_new_run(out, created, _stderr)
        raise
    finally:
        if lock is not None:
            lock.release()
