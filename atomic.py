"""
Writes that a crash cannot tear: a reader sees the old file or folder, or the new one, never half of one.

    atomic.write_json(path, obj)          # path.tmp, fsync, rename over path
    atomic.write_file(path, text_or_bytes)
    with atomic.temp_dir(dst) as tmp:     # a fresh folder beside dst, deleted if anything fails
        ...write files into tmp...
        atomic.replace_dir(tmp, dst)      # dst -> dst.old, tmp -> dst, delete dst.old

A crash between replace_dir's two renames leaves dst.old and no dst; checkpoint.find() reads dst.old
then. Temp names are fixed (path.tmp) or made by tempfile beside the target, so the next write
replaces or its caller's start-up deletes them (checkpoint.remove_temps, RunLog).

fault_point(name) is the crash tests' hook: NANOLLM_CRASH_AT=<name>[:n[:kill]] ends the process the
n-th time (default 1st) it reaches that point, with exit status 17 (or kill -9 with ':kill').
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """End the process here if NANOLLM_CRASH_AT names this point (crash tests); otherwise nothing."""
    target, _, rest = os.environ.get("NANOLLM_CRASH_AT", "").partition(":")
    if target != name:
        return
    nth, _, how = rest.partition(":")
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(17)


def write_file(path: str, data: str | bytes, mode: int | None = None) -> None:
    """Write data (text or bytes) to path through path.tmp, fsync'd, then renamed over path."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    fault_point("before_file_replace")
    os.replace(tmp, path)


def write_json(path: str, obj: object, indent: int = 2) -> None:
    """json.dump(obj) into path atomically (write_file), ending with a newline."""
    write_file(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def temp_dir(dst: str, prefix: str = ".tmp-") -> Iterator[str]:
    """A new empty folder beside dst (same filesystem, so it can be renamed onto dst); deleted on any error
    and, if replace_dir did not move it, on exit."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: str, dst: str) -> None:
    """Move the complete folder src to dst. An existing dst is renamed to dst.old first and deleted last."""
    dst = dst.rstrip("/")
    old = dst + ".old"
    fault_point("before_swap")
    if os.path.exists(dst):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    fault_point("between_renames")
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
