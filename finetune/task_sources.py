"""Reading a task split's raw rows: local files in one of several formats, or a hub dataset
(:func:`read_split`; normalizing them is :func:`finetune.tasks.load_split`).

Kept apart from :mod:`finetune.tasks` (the YAML schema and normalization) because each format has
its own small quirks: SQuAD's official JSON is nested (articles → paragraphs → questions) and is
flattened here to the hub ``squad`` schema, so one column mapping serves both origins; line-aligned
parallel text (Multi30k ``train.en`` + ``train.fr``) has no builder in ``datasets``; every other
format goes through the ``datasets`` builder of that name (cached by ``datasets``, no network).
Finding the local files and falling back to the hub is shared with corpora (:mod:`common.data_files`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from common.data_files import BuilderFormat, find_local, infer_format, load_files, load_hub
from common.data_root import data_root

if TYPE_CHECKING:
    from finetune.tasks import TaskConfig, TaskSplit

log = logging.getLogger(__name__)

# The datasets builders, plus the formats read here (reverse_sequence is generated, not read).
TaskFormat = Literal[BuilderFormat, "text_parallel", "squad_json", "reverse_sequence"]
FORMATS: tuple[str, ...] = get_args(TaskFormat)


def read_builder(files: list[Path], fmt: str, load_kwargs: dict[str, Any], where: str):
    """Rows of ``files`` via the ``datasets`` builder ``fmt`` ("csv", "json", "parquet", "text")."""
    if any(f.stat().st_size == 0 for f in files):
        raise ValueError(f"{where}: empty file(s) {[str(f) for f in files if f.stat().st_size == 0]}")
    try:
        return load_files(files, fmt, **load_kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the files, format and options
        if "corresponds to no data" in str(exc):  # datasets' words for "0 rows" (e.g. a header-only CSV)
            raise ValueError(f"{where}: {[str(f) for f in files]} hold no rows") from None
        raise ValueError(f"{where}: could not read {[str(f) for f in files]} as format {fmt!r} with "
                         f"load_kwargs {load_kwargs}: {type(exc).__name__}: {exc}") from exc


def read_text_parallel(files: dict[str, Path], where: str):
    """Line-aligned text files → one column per key of ``files`` (e.g. {"en": train.en, "de": train.de}).

    Only the line terminator is removed; the files must have the same number of lines, else the
    pairs would be silently misaligned.
    """
    import datasets

    columns: dict[str, list[str]] = {}
    for name, path in files.items():
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        columns[name] = [line.rstrip("\r") for line in lines]
    counts = {str(files[n]): len(v) for n, v in columns.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{where}: text_parallel files are not line-aligned (line counts {counts})")
    return datasets.Dataset.from_dict(columns)


def read_squad_json(files: list[Path], where: str):
    """Official SQuAD JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``) →
    one row per question with the hub ``squad`` columns: id, title, context, question and
    answers = {"text": [...], "answer_start": [...]}."""
    import datasets

    rows: dict[str, list[Any]] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for path in files:
        try:
            articles = json.loads(path.read_text(encoding="utf-8"))["data"]
            for article in articles:
                for para in article["paragraphs"]:
                    for qa in para["qas"]:
                        rows["id"].append(str(qa["id"]))
                        rows["title"].append(article.get("title", ""))
                        rows["context"].append(para["context"])
                        rows["question"].append(qa["question"])
                        answers = qa.get("answers", [])
                        rows["answers"].append({"text": [a["text"] for a in answers],
                                                "answer_start": [int(a["answer_start"]) for a in answers]})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}: {path} is not SQuAD JSON ({type(exc).__name__}: {exc}); expected "
                             '{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", '
                             '"answers"}]}]}]}') from exc
    features = datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"), "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")),
                    "answer_start": datasets.List(datasets.Value("int32"))},
    })
    return datasets.Dataset.from_dict(rows, features=features)


def parse_rows(rows: str, where: str) -> slice:
    """The slice that ``rows`` ("start:stop", as in Python) names; error naming ``where`` otherwise."""
    parts = rows.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ValueError(f"{where}={rows!r}; expected a slice 'start:stop', e.g. ':100' or '100:'") from None
    return slice(start, stop)


def read_split(task: TaskConfig, name: str, sp: TaskSplit) -> tuple[Any, str, bool]:
    """(raw rows of split ``name``, where they came from for messages, whether local).

    The local copy when all its entries match files, else the hub dataset when the split has a
    ``hub_split``; an error naming both otherwise.
    """
    where = f"task {task.name!r} split {name!r}"
    if task.format == "reverse_sequence":
        from finetune.reverse_task import reverse_sequence_split

        raw = reverse_sequence_split(sp.generate["n"], sp.generate.get("seed", 0), **task.load_kwargs)
        return raw, f"generated ({sp.generate})", True
    local = find_local(sp.local)
    if local.found:
        files = local.files
        if task.format == "text_parallel":
            by_col = {}
            for col, fs in local.matched.items():
                if len(fs) != 1:
                    raise ValueError(f"{where}: text_parallel local.{col} must name one file, matched {fs}")
                by_col[col] = fs[0]
            raw = read_text_parallel(by_col, where)
        elif task.format == "squad_json":
            raw = read_squad_json(files, where)
        else:
            fmt = task.format or infer_format(files, where, FORMATS)
            raw = read_builder(files, fmt, task.load_kwargs, where)
        if sp.rows is not None:
            raw = raw.select(list(range(len(raw))[parse_rows(sp.rows, f"{where}: rows")]))
        return raw, f"file(s) {[str(f) for f in files]}", True
    note = (f"local {local.missing} not found (data root: {data_root()})" if local.missing
            else "no local copy declared")
    if task.hub and sp.hub_split:
        if local.missing:
            log.info("%s: %s; using hub %s", where, note, task.hub)
        raw = load_hub(task.hub, task.hub_config, sp.hub_split, where, note)
        return raw, f"hub dataset {task.hub!r} (hub_config {task.hub_config!r}, hub_split {sp.hub_split!r})", False
    raise FileNotFoundError(f"{where}: {note} and no hub equivalent (hub {task.hub!r}, hub_split {sp.hub_split!r})")
