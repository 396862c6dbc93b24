"""Staging names for files and folders written then renamed into place, and removing dead ones.

Everything lmtrain writes atomically (checkpoints, exports, prepared corpora) is first written
under a hidden staging name beside its final path and renamed when complete. A process killed
mid-write leaves that staging entry behind; at 1.5B parameters one partial checkpoint is ~18 GB.
The staging name records its writer, ``.<final>.<tag>.<host>-<pid>[.<random>][<suffix>]``, so a
later start can tell a dead writer's leftovers from a live one's:

* same host: stale when the pid is no longer running;
* another host (a requeued job on a new node, a shared file system): stale when nothing in it
  changed for ``STALE_AFTER_S`` (a live writer keeps writing; the last fsync is seconds).

Leftovers of lmtrain versions before this naming (``.<final>.<random>.tmp`` checkpoints,
``.<final>.building-<pid>`` / ``.old-<pid>`` corpora) are recognised too.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

STALE_AFTER_S = 600.0
HOST = socket.gethostname().replace(".", "_") or "localhost"
_OWNED = re.compile(r"^\.(?P<final>.+)\.(?P<tag>tmp|building|old|export)\.(?P<host>[^.]+)-(?P<pid>\d+)(\..*)?$")
_LEGACY_PID = re.compile(r"^\.(?P<final>.+)\.(?:building|old)-(?P<pid>\d+)$")
_LEGACY_TMP = re.compile(r"^\.(?P<final>.+\.ckpt)\.[A-Za-z0-9_]{8}\.tmp$")  # the old mkstemp naming


def staging_prefix(final: Path, tag: str) -> str:
    """The name prefix of this process's staging entries for ``final`` (``tag``: tmp | building | old | export)."""
    return f".{final.name}.{tag}.{HOST}-{os.getpid()}."


def staging_path(final: Path, tag: str) -> Path:
    """This process's staging path for ``final`` (one per process and tag)."""
    return final.parent / staging_prefix(final, tag).rstrip(".")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _last_change(path: Path) -> float:
    if not path.is_dir():
        return path.stat().st_mtime
    times = [path.stat().st_mtime]
    for parent, _, files in os.walk(path):
        times.extend(os.stat(os.path.join(parent, f)).st_mtime for f in files)
    return max(times)


def entry_size(path: Path) -> int:
    """Bytes in a file, or in every file under a folder."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(os.stat(os.path.join(parent, f)).st_size for parent, _, files in os.walk(path) for f in files)


def is_stale(entry: Path, now: float | None = None) -> bool:
    """True for a staging entry whose writer is gone (see the module doc); False for anything else."""
    name = entry.name
    if m := _OWNED.match(name):
        host, pid = m.group("host"), int(m.group("pid"))
        if host == HOST:
            return pid != os.getpid() and not _pid_running(pid)
        return (now or time.time()) - _last_change(entry) > STALE_AFTER_S
    if m := _LEGACY_PID.match(name):
        return not _pid_running(int(m.group("pid")))
    if _LEGACY_TMP.match(name):
        return (now or time.time()) - _last_change(entry) > STALE_AFTER_S
    return False


def remove_stale(directory: str | os.PathLike, final_names: set[str] | None = None) -> list[tuple[Path, int]]:
    """Remove dead writers' staging entries in ``directory`` (only those of ``final_names``, when
    given); returns what was removed with its size in bytes, for the caller's log line."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in directory.iterdir():
        m = _OWNED.match(entry.name) or _LEGACY_PID.match(entry.name) or _LEGACY_TMP.match(entry.name)
        if m is None or (final_names is not None and m.group("final") not in final_names):
            continue
        try:
            if not is_stale(entry, now):
                continue
            size = entry_size(entry)
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except FileNotFoundError:  # another process cleaned it first
            continue
        removed.append((entry, size))
    return removed


def describe_removed(removed: list[tuple[Path, int]], why: str) -> str:
    """One log line: what was removed and how much space came back."""
    total = sum(size for _, size in removed)
    names = ", ".join(p.name for p, _ in removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
    return f"removed {len(removed)} {why} ({total / 1e6:.1f} MB): {names}"


def swap_into_place(staged: Path, final: Path) -> None:
    """Replace ``final`` (a folder or file, may not exist) by ``staged`` with renames: the old one
    survives until the new one is in place, and a kill in between leaves a recognisable staging
    entry (the old one, tagged ``old``), never neither."""
    old = staging_path(final, "old")
    if final.exists():
        final.rename(old)
    try:
        staged.rename(final)
    except OSError:
        if old.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
