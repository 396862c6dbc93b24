"""A dataset's local copy when it exists, else its public hub dataset: the part both stages share.

Corpus sources and task splits name their data twice: local file(s) and a hub dataset to fall back
on. Here: :func:`find_local` matches the local entries (each a file, a directory or a glob; absolute,
or relative to the data root of :mod:`common.data_root` or the working directory),
:func:`infer_format` picks the ``datasets`` builder from the file extensions, :func:`load_files`
and :func:`load_hub` load either origin, :func:`check_text_file` names the file and offset of bytes
that are not UTF-8 text. Each stage keeps what only it needs: how text files split
into documents (corpora), parallel-text and SQuAD JSON readers, row slices and its own messages
(tasks).
"""

from __future__ import annotations

import codecs
import glob as globlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from common.data_root import data_root, resolve_local

BuilderFormat = Literal["csv", "json", "parquet", "text"]
BUILDER_FORMATS: tuple[str, ...] = get_args(BuilderFormat)
# .tsv is read by the csv builder with a tab delimiter (see load_files).
EXTENSION_FORMAT = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                    ".txt": "text", ".text": "text", ".md": "text"}


def expand(entry: str) -> list[Path]:
    """Files for one local entry (file, directory or glob), sorted; [] when nothing matches.

    A relative glob is tried under the data root first, then the working directory: the first base
    with a match wins, so a copy under the data root is never mixed with stray files in the cwd.
    A directory gives its visible files (not recursive).
    """
    if any(c in entry for c in "*?["):
        root = data_root()
        bases = [Path()] if Path(entry).is_absolute() else ([root] if root else []) + [Path.cwd()]
        for base in bases:
            hits = sorted(Path(p) for p in globlib.glob(str(base / entry), recursive=True) if Path(p).is_file())
            if hits:
                return hits
        return []
    path = resolve_local(entry)
    if path is None:
        return []
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path]


@dataclass
class LocalCopy:
    """What the local entries of one source matched.

    Attributes:
        matched: key -> its files, for every entry that matched (in declaration order). The key is
            the entry itself, or the mapping key when entries were given as a mapping (a column name).
        missing: the entries that matched nothing.
    """

    matched: dict[str, list[Path]]
    missing: list[str]

    @property
    def found(self) -> bool:
        """Whether the local copy is usable: some entry was declared and every entry matched.

        All or nothing: a partial copy would silently be a different dataset than the hub's."""
        return bool(self.matched) and not self.missing

    @property
    def files(self) -> list[Path]:
        """All matched files, entry by entry."""
        return [f for fs in self.matched.values() for f in fs]


def find_local(local: str | list[str] | Mapping[str, str] | None) -> LocalCopy:
    """Match ``local``: one entry, a list of entries, or a mapping key -> entry (None = no local copy)."""
    if isinstance(local, Mapping):
        entries = dict(local)
    else:
        entries = {e: e for e in ([local] if isinstance(local, str) else list(local or []))}
    expanded = {key: expand(entry) for key, entry in entries.items()}
    return LocalCopy(matched={k: fs for k, fs in expanded.items() if fs},
                     missing=[entries[k] for k, fs in expanded.items() if not fs])


def infer_format(files: list[Path], where: str, choices: tuple[str, ...] = BUILDER_FORMATS) -> str:
    """The builder for ``files`` from their extension (.tsv -> csv).

    Args:
        files: the local files; they must all map to the same builder.
        where: the config entry at fault, for the error (e.g. "sources[3]", "task 'squad' split 'train'").
        choices: the formats the error offers as the value to set instead.
    """
    fmts = {EXTENSION_FORMAT.get(f.suffix.lower()) for f in files}
    if None in fmts or len(fmts) != 1:
        raise ValueError(f"{where}: cannot infer one format from {[f.name for f in files]}; set `format` "
                         f"to one of {choices}")
    return fmts.pop()


def check_text_file(path: Path, where: str, chunk_bytes: int = 1 << 20) -> None:
    """Raise naming ``path``, the byte offset and line of its first byte that is not UTF-8 text.

    A NUL byte counts too: it is valid UTF-8, but no text file holds one (a binary file, or UTF-16
    text without a BOM, would otherwise be tokenized as nonsense). One streamed pass, ~1 GB/s: the
    ``datasets`` text builder fails on bad bytes without naming the file or the offset in it.

    Args:
        path: the file.
        where: the config entry it belongs to, for the error (e.g. "sources[2]").
        chunk_bytes: read size.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # bytes and newlines before the current chunk
    with path.open("rb") as f:
        while True:
            block = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            bad, why = None, ""
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                bad, why = offset - pending + e.start, f"is not UTF-8 ({e.reason})"
            nul = block.find(b"\0")
            if nul >= 0 and (bad is None or offset + nul < bad):
                bad, why = offset + nul, "is a NUL byte: a binary file, or UTF-16 text, not UTF-8 text"
            if bad is not None:
                f.seek(bad)
                byte = f.read(1)
                f.seek(offset)
                line = lines + f.read(max(bad - offset, 0)).count(b"\n") + 1
                raise ValueError(f"{where}: {path}: byte {byte!r} at offset {bad} (line {line}) {why}; a text "
                                 "source must be UTF-8 text (convert it, e.g. iconv -f latin1 -t utf-8, or remove it)")
            if not block:
                return
            offset, lines = offset + len(block), lines + block.count(b"\n")


def load_files(files: list[Path], fmt: str, **kwargs: Any):
    """``files`` as one ``datasets.Dataset`` via the builder ``fmt`` (one of :data:`BUILDER_FORMATS`).

    Args:
        files: the local files.
        fmt: the builder.
        kwargs: builder options (``sample_by``, ``column_names``, ``cache_dir``, ...); TSV files get
            ``delimiter="\\t"`` unless one is given.
    """
    import datasets

    if fmt == "csv" and all(f.suffix.lower() == ".tsv" for f in files):
        kwargs.setdefault("delimiter", "\t")
    return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", **kwargs)


def load_hub(name: str, config: str | None, split: str, where: str, local_note: str, *,
             split_key: str = "hub_split", streaming: bool = False):
    """``datasets.load_dataset(name, config, split=split)``; a failure names everything that was tried.

    Args:
        name: the hub dataset.
        config: its configuration.
        split: the split to load.
        where: the config entry, for the error.
        local_note: why the local copy was not used (e.g. "local [...] not found (data root: ...)").
        split_key: the config key that set ``split``, as the error names it.
        streaming: return an ``IterableDataset`` that streams the dataset instead of downloading it.
    """
    import datasets

    try:
        # streaming is passed only when set, so a plain load is exactly load_dataset(name, config, split=...).
        return datasets.load_dataset(name, config, split=split, **({"streaming": True} if streaming else {}))
    except Exception as exc:  # noqa: BLE001 - re-raised naming the local copy and the hub dataset
        raise ValueError(f"{where}: {local_note} and hub dataset {name!r} (hub_config {config!r}, "
                         f"{split_key} {split!r}) failed to load: {type(exc).__name__}: {exc}") from exc
