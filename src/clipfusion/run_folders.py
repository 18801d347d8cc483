"""Output folders of runs: who owns one (a marker file), what a run may delete in it (its own files
only), and one run at a time in it (an exclusive lock naming its holder)."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from clipfusion.errors import ClipfusionError
from clipfusion.outputs import probe_writable, read_json, write_atomic

MARKER = ".clipfusion-output.json"  # in every folder clipfusion writes a run into: what kind of run
_LOCK, _HOLDER = ".clipfusion.lock", ".clipfusion.pid"
_HOUSEKEEPING = (MARKER, _LOCK, _HOLDER)


def check_output_folder(out: Path, kind: str, own: Sequence[str], protected: Sequence[Path] = ()) -> None:
    """Refuse, with a one-line error and without writing anything, an ``out`` that a ``kind`` run may not use.

    ``own``: the names a run of this kind writes directly in ``out``.  A file, a folder that holds
    anything else or that another kind of run wrote, and a folder that equals or contains a
    ``protected`` one (the dataset, the inputs) are refused.
    """
    if out.exists() and not out.is_dir():
        raise ClipfusionError(f"--out {out} is a file; give a folder (new or one clipfusion wrote)")
    resolved = out.resolve()
    for folder in protected:
        inside = folder.resolve()
        if inside == resolved or resolved in inside.parents:
            raise ClipfusionError(f"--out {out} contains {folder}, which this run reads; choose a folder outside it")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        foreign = sorted(name for name in entries - set(own) - set(_HOUSEKEEPING)
                         if not _own_temporary(name, (*own, *_HOUSEKEEPING)))
        marker = out / MARKER
        previous = read_json(marker, "the output marker").get("kind") if marker.is_file() else None
        if foreign or previous not in (None, kind):
            held = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "") if foreign else \
                f"the output of a clipfusion {previous}"
            raise ClipfusionError(f"--out {out} holds {held}, which this {kind} run did not write; choose an empty "
                                  "or new folder (--overwrite only ever deletes clipfusion's own files)")
    probe_writable(out)  # a folder that cannot be written is found now, not after the models load


def _own_temporary(name: str, own: Sequence[str]) -> bool:
    """Whether ``name`` is ``write_atomic``'s temporary of one of ``own`` (``.NAME.XXXXXXXX.tmp``): a run
    writing into the folder now (a second run checks the folder before it meets the first one's lock), or
    one killed in the middle of a write."""
    return name.endswith(".tmp") and any(name.startswith(f".{entry}.") for entry in own)


def claim_output_folder(out: Path, kind: str, own: Sequence[str], overwrite: bool = False,
                        protected: Sequence[Path] = ()) -> None:
    """:func:`check_output_folder`, then mark ``out`` as a ``kind`` run's; ``overwrite`` first deletes the
    ``own`` entries, never anything else.  Call it while holding :func:`exclusive`."""
    check_output_folder(out, kind, own, protected)
    if overwrite and out.is_dir():
        for name in sorted({p.name for p in out.iterdir()} & set(own)):
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MARKER, json.dumps({"kind": kind}))


@contextmanager
def output_folder(out: Path, kind: str, own: Sequence[str], overwrite: bool = False,
                  protected: Sequence[Path] = ()) -> Iterator[Path]:
    """The whole life of a run's output folder: checked before anything is written, locked against a
    second run, cleared of the run's own files with ``overwrite``, marked as this kind's."""
    check_output_folder(out, kind, own, protected)
    with exclusive(out):
        claim_output_folder(out, kind, own, overwrite, protected)
        yield out


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for the whole run; a second run into it stops at once with a
    one-line error naming the holder's process id."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / _LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = (out / _HOLDER).read_text().strip() if (out / _HOLDER).is_file() else "unknown"
        raise ClipfusionError(f"another clipfusion run (process {holder}) is writing to {out}; wait for it or "
                              "choose another --out") from None
    try:
        write_atomic(out / _HOLDER, str(os.getpid()))
        yield
    finally:
        (out / _HOLDER).unlink(missing_ok=True)
        lock.release()
