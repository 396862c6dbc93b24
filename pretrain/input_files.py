"""Whether a prepared corpus was built from the configured inputs: file content, not file times.

The manifest records, per local input file, its ``path``, ``size``, ``mtime_ns`` and ``content``
(a hash, :func:`content_hash`). The corpus fingerprint covers every setting plus each file's size
and content, not its path or time, so a re-copied or touched file with the same bytes is the same
input (a copy under another data root too). Checking the configured files against the manifest
(:func:`fill_hashes`):

* same path, size and mtime_ns as recorded: the recorded hash is trusted (nothing is read);
* same size, another mtime or path: the file is hashed; the same hash is the same input (the caller
  logs one info line), another hash a changed one, named in the refusal (:func:`describe_changes`);
* another size: changed, without reading the file.

Hash rule: sha256 (~1 GB/s on one core here, faster than blake2b) of the whole file up to
:data:`FULL_HASH_MAX` (1 GiB); a larger file is hashed by its size and :data:`N_BLOCKS` evenly
spaced blocks of :data:`BLOCK` bytes (first and last included: 256 MiB read whatever the size), so
re-checking a re-copied 100 GB corpus costs seconds, not minutes. The price: an edit of a file over
1 GiB that keeps its size and misses every sampled block goes unnoticed once its mtime changed;
after editing a big input in place, rebuild with ``--overwrite true``. The rule is part of the
value (``sha256:`` whole, ``sha256-sampled:`` sampled), so a change of rule never passes for a match.

A prepared corpus is never rewritten to record new times, so a re-copied file is hashed again at
each start until the corpus is rebuilt (about 1 s per GB read).

Manifests from before content hashes (no ``file_identity`` in ``inputs``) keep the old rule: path,
size and mtime must match; the refusal then says that a rebuild (``--overwrite true``) records hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_IDENTITY = "sha256-content"  # manifest["inputs"]["file_identity"] of corpora that record hashes
FULL_HASH_MAX = 1 << 30  # files up to 1 GiB are hashed whole
N_BLOCKS = 64  # larger files: this many evenly spaced blocks ...
BLOCK = 4 << 20  # ... of 4 MiB each
_READ = 1 << 20


def content_hash(path: Path) -> str:
    """``sha256:<hex>`` of the whole file, or ``sha256-sampled:<hex>`` over size + sampled blocks (module doc)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= FULL_HASH_MAX:
            while block := f.read(_READ):
                h.update(block)
            return f"sha256:{h.hexdigest()}"
        h.update(f"{size}\n".encode())
        last = size - BLOCK
        for i in range(N_BLOCKS):
            f.seek(i * last // (N_BLOCKS - 1))
            h.update(f.read(BLOCK))
    return f"sha256-sampled:{h.hexdigest()}"


def _files(inputs: dict[str, Any]) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(source index, file index, entry) for every local file of ``inputs`` (entries are mutable)."""
    for i, source in enumerate(inputs["sources"]):
        for j, entry in enumerate(source.get("files") or []):
            yield i, j, entry


def fill_hashes(inputs: dict[str, Any], recorded: dict[str, Any] | None = None) -> list[str]:
    """Give every local file entry of ``inputs`` its ``content`` (in place), trusting ``recorded``'s on the fast path.

    Args:
        inputs: the configured inputs (``pretrain.prepare._inputs``); entries already holding a
            ``content`` are kept.
        recorded: the spec of an existing manifest, or None to hash every file (before a build).
            With it, a file whose size differs from the one recorded at the same position is left
            without ``content``: it differs whatever its bytes, so it is not read.

    Returns:
        the paths that were hashed because their time or path changed, and hold the recorded content.
    """
    old = {(i, j): e for i, j, e in _files(recorded)} if recorded is not None else {}
    same_content = []
    for i, j, entry in _files(inputs):
        if "content" in entry:
            continue
        before = old.get((i, j))
        if recorded is not None and (before is None or before.get("size") != entry["size"]):
            continue
        if before is not None and before.get("content") and all(
                before.get(k) == entry[k] for k in ("path", "size", "mtime_ns")):
            entry["content"] = before["content"]
            continue
        entry["content"] = content_hash(Path(entry["path"]))
        if before is not None and before.get("content") == entry["content"]:
            same_content.append(entry["path"])
    return same_content


def changed_since_hashed(inputs: dict[str, Any]) -> list[str]:
    """Paths whose size or mtime is no longer the recorded one (a file rewritten while it was read)."""
    out = []
    for _, _, entry in _files(inputs):
        stat = Path(entry["path"]).stat()
        if (stat.st_size, stat.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
            out.append(entry["path"])
    return out


def identity(inputs: dict[str, Any]) -> dict[str, Any]:
    """What the fingerprint covers: ``inputs`` with each file reduced to its size and content."""
    sources = [{**s, "files": [{"size": e["size"], "content": e.get("content")} for e in s["files"]]}
               if s.get("files") is not None else s for s in inputs["sources"]]
    return {**inputs, "sources": sources}


def _json(value: Any) -> str:
    return json.dumps(value)[:200]


def describe_changes(built: dict[str, Any], configured: dict[str, Any], by_content: bool) -> list[str]:
    """One line per difference between a manifest's input spec and the configured inputs.

    Args:
        built: ``manifest["inputs"]["spec"]``.
        configured: the configured inputs (after :func:`fill_hashes` when ``by_content``).
        by_content: compare files by size + content (else by path, size and mtime: the old rule).
    """
    out, files_changed = [], False
    for key in sorted((set(built) | set(configured)) - {"sources"}):
        if built.get(key) != configured.get(key):
            out.append(f"{key}: built with {_json(built.get(key))}, configured {_json(configured.get(key))}")
    old, new = built.get("sources", []), configured.get("sources", [])
    if len(old) != len(new):
        out.append(f"sources: built from {len(old)}, configured {len(new)}")
    for i, (a, b) in enumerate(zip(old, new)):
        a_rest, b_rest = ({k: v for k, v in s.items() if k != "files"} for s in (a, b))
        if a_rest != b_rest:
            out.append(f"sources[{i}]: built with {_json(a_rest)}, configured {_json(b_rest)}")
        a_files, b_files = a.get("files") or [], b.get("files") or []
        if len(a_files) != len(b_files):
            out.append(f"sources[{i}]: built from {len(a_files)} file(s), configured {len(b_files)}: "
                       f"{[e['path'] for e in b_files][:5]}")
            files_changed = True
            continue
        for was, now in zip(a_files, b_files):
            keys = ("size", "content") if by_content else ("path", "size", "mtime_ns")
            if any(was.get(k) != now.get(k) for k in keys):
                how = "content differs" if was.get("size") == now.get("size") else \
                    f"size {was.get('size')} -> {now.get('size')} bytes"
                if not by_content and was.get("size") == now.get("size"):
                    how = "modification time or path differs"
                out.append(f"sources[{i}]: {now['path']} changed since the build ({how}"
                           + (f"; built from {was.get('path')}" if was.get("path") != now["path"] else "") + ")")
                files_changed = True
    if files_changed and not by_content:
        out.append("(this corpus was prepared before content hashes were recorded, so files are compared by "
                   "path, size and modification time: a touched or re-copied file counts as changed; if the "
                   "data is the same, rebuild once with --overwrite true to record hashes)")
    return out
