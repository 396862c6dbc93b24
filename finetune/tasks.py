"""Tasks (translation, summarization, QA) as data: one YAML file per task, no code.

A task names its data twice — a public hub dataset *and* a local copy under the data root (see
:mod:`common.data_root`) — so the same file runs offline here and online elsewhere; the local copy
wins when all its files exist. :func:`load_split` turns either into the same normalized rows:

    id (str), source (str), target (str), references (list[str]), <extra_fields...>

so prompts, few-shot sampling, fine-tuning and metrics never see dataset-specific columns.
Shipped tasks live in ``configs/tasks/<name>.yaml`` and load by bare name (``load_task("squad")``);
to add your own, write a YAML file and pass its path. Schema (every key of :class:`TaskConfig`)::

    name: my_task                     # required
    type: summarization               # required: translation | summarization | qa
    metric: rouge                     # bleu_chrf | rouge | squad (default: from type)
    hub: knkarthick/samsum            # hub dataset used when the local copy is missing (optional)
    hub_config: null
    format: json                      # local files: csv (TSV: load_kwargs.delimiter "\\t") | json (jsonl)
                                      #   | parquet | text | text_parallel | squad_json; None = from extension
    load_kwargs: {}                   # passed to the datasets builder, e.g. {column_names: [en, fr], quoting: 3}
    splits:                           # required; any names, usually train / validation / test
      train: {local: "my_data/train-*.jsonl", hub_split: train}
      test:
        local: my_data/test.jsonl     # file, directory or glob relative to the data root (or a list);
                                      #   text_parallel: a mapping column -> file {en: x.en, fr: x.fr}
        hub_split: test               # None = this split has no hub equivalent
        rows: "100:"                  # optional python-style slice of the local rows
        local_columns: {target: summary1}        # optional overrides for this split's local files
        local_references: [summary1, summary2]
    columns:                          # required: normalized name -> dataset column ("a.b" = nested field)
      id: id                          # optional; default "<split>-<row index>"
      source: dialogue
      target: summary                 # a list-valued column gives target = its first item
    hub_columns: null                 # columns of the hub dataset when they differ from the local copy's
    references: null                  # column(s) holding references (default: the target column)
    hub_references: null
    extra_fields: []                  # more fields for templates; column = columns[field] or the field name
    source_lang: en                   # language codes for metric tokenization
    target_lang: en
    few_shot_split: train             # demonstration pool, or {eval split: pool split}
    long_field: null                  # the field shortened when a prompt does not fit (a word-boundary cut,
                                      #   finetune/truncation.py); default: context if an extra field, else source
    max_source_chars: null            # cut longer sources to this many characters
    templates:                        # per model family; keys of finetune.prompts.PromptTemplate
      decoder: {prompt: "{{ source }}\\nTL;DR:", target_delimiter: " ", stop: ["\\n"]}
      encoder_decoder: {prompt: "summarize: {{ source }}", target_delimiter: ""}
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from finetune import task_sources as sources

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent.parent / "configs" / "tasks"
TaskType = Literal["translation", "summarization", "qa"]  # `kind` is the model's: decoder | encoder_decoder
Metric = Literal["bleu_chrf", "rouge", "squad"]
DEFAULT_METRIC = {"translation": "bleu_chrf", "summarization": "rouge", "qa": "squad"}
MODEL_KINDS = ("decoder", "encoder_decoder")
TEMPLATE_KEYS = ("prompt", "target", "target_delimiter", "demo_separator", "stop", "instruction")
NORMALIZED = ("id", "source", "target", "references")


@dataclass
class TaskSplit:
    """Where one split's rows come from.

    Args:
        local: local file(s)/dir/glob relative to the data root; for format text_parallel a mapping
            column name -> line-aligned text file.
        hub_split: split of the hub dataset (may use hub slicing, "train[:1000]"); None = none.
        rows: "start:stop" slice of the local rows, e.g. to carve a demonstration pool out of the
            only local file without overlapping the evaluation rows.
        local_columns: overrides of the task's ``columns`` for this split's local files (DialogSum
            test has summary1..3 where train has summary).
        local_references: override of ``references`` for this split's local files.
        generate: format reverse_sequence only: ``{n: rows, seed: seed}`` of the generated split.
    """

    local: str | list[str] | dict[str, str] | None = None
    hub_split: str | None = None
    rows: str | None = None
    local_columns: dict[str, str] = field(default_factory=dict)
    local_references: str | list[str] | None = None
    generate: dict[str, int] | None = None


@dataclass
class TaskConfig:
    """A task: its data (local and hub), normalized columns, metric and prompt templates (schema in
    the module docstring)."""

    name: str
    type: TaskType
    splits: dict[str, TaskSplit]
    columns: dict[str, str]
    metric: Metric | None = None
    hub: str | None = None
    hub_config: str | None = None
    format: sources.TaskFormat | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    hub_columns: dict[str, str] | None = None
    references: str | list[str] | None = None
    hub_references: str | list[str] | None = None
    extra_fields: list[str] = field(default_factory=list)
    source_lang: str | None = None
    target_lang: str | None = None
    few_shot_split: str | dict[str, str] = "train"
    long_field: str | None = None
    max_source_chars: int | None = None
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric is None and self.type in DEFAULT_METRIC:
            self.metric = DEFAULT_METRIC[self.type]  # type: ignore[assignment]
        if self.long_field is None and isinstance(self.extra_fields, list):
            self.long_field = "context" if "context" in self.extra_fields else "source"
        _validate(self)

    @property
    def fields(self) -> list[str]:
        """Fields of a normalized row (what templates may use)."""
        return [*NORMALIZED, *self.extra_fields]

    def split(self, name: str) -> TaskSplit:
        """The split called ``name``; the error names the task and its splits."""
        if name not in self.splits:
            raise ValueError(f"task {self.name!r}: unknown split {name!r}; available splits: {list(self.splits)}")
        return self.splits[name]

    def few_shot_split_for(self, eval_split: str) -> str:
        """The split demonstrations come from when evaluating ``eval_split``."""
        pool = self.few_shot_split
        if isinstance(pool, dict):
            if eval_split not in pool:
                raise ValueError(f"task {self.name!r}: few_shot_split has no pool for split {eval_split!r} "
                                 f"(it maps {pool})")
            pool = pool[eval_split]
        if pool not in self.splits:
            raise ValueError(f"task {self.name!r}: few_shot_split {pool!r} is not a split of this task "
                             f"(available: {list(self.splits)})")
        return pool

    def template(self, kind: str):
        """The :class:`finetune.prompts.PromptTemplate` for the model kind ``kind`` ("decoder" | "encoder_decoder")."""
        from finetune.prompts import PromptTemplate

        if kind not in self.templates:
            raise ValueError(f"task {self.name!r}: no template for model kind {kind!r} "
                             f"(templates: {list(self.templates)})")
        return PromptTemplate(**self.templates[kind])


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _validate(task: TaskConfig) -> None:
    where = f"task {task.name!r}"
    for key in ("splits", "columns", "load_kwargs", "templates", "extra_fields"):
        expected = list if key == "extra_fields" else dict
        if not isinstance(getattr(task, key), expected):
            raise ValueError(f"{where}: {key} must be a {'list' if expected is list else 'mapping'}, "
                             f"got {getattr(task, key)!r}")
    if task.type not in get_args(TaskType):
        raise ValueError(f"{where}: type={task.type!r}; expected one of {get_args(TaskType)}")
    if task.metric not in get_args(Metric):
        raise ValueError(f"{where}: metric={task.metric!r}; expected one of {get_args(Metric)}")
    if task.format is not None and task.format not in sources.FORMATS:
        raise ValueError(f"{where}: format={task.format!r}; expected one of {sources.FORMATS} (or null)")
    for key in ("columns", "hub_columns"):
        cols = getattr(task, key)
        if key == "columns" or cols is not None:
            missing = [k for k in ("source", "target") if k not in cols]
            if missing:
                raise ValueError(f"{where}: {key} must map {missing} to dataset columns (got {cols})")
    bad = [f for f in task.extra_fields if f in NORMALIZED]
    if bad:
        raise ValueError(f"{where}: extra_fields {bad} clash with the normalized fields {NORMALIZED}")
    if not task.splits:
        raise ValueError(f"{where}: `splits` is empty; declare at least one split")
    for name, sp in task.splits.items():
        if task.format == "reverse_sequence":
            if not sp.generate or set(sp.generate) - {"n", "seed"} or "n" not in sp.generate:
                raise ValueError(f"{where}: splits.{name}.generate must be {{n: <rows>, seed: <int>}} for a "
                                 f"generated task (got {sp.generate!r})")
            continue
        if sp.local is None and not (task.hub and sp.hub_split):
            raise ValueError(f"{where}: splits.{name} has neither `local` nor (`hub` and `hub_split`)")
        if (task.format == "text_parallel") != isinstance(sp.local, dict) and sp.local is not None:
            raise ValueError(f"{where}: splits.{name}.local must be a mapping column -> file exactly when "
                             f"format is text_parallel (format {task.format!r}, local {sp.local!r})")
        if sp.rows is not None:
            sources.parse_rows(sp.rows, f"{where}: splits.{name}.rows")
    if isinstance(task.few_shot_split, dict):
        unknown = [s for s in (*task.few_shot_split, *task.few_shot_split.values()) if s not in task.splits]
        if unknown:
            raise ValueError(f"{where}: few_shot_split names unknown split(s) {unknown} "
                             f"(available: {list(task.splits)})")
    if task.long_field not in task.fields:
        raise ValueError(f"{where}: long_field={task.long_field!r} is not a field of the task's rows "
                         f"(fields: {task.fields})")
    if task.max_source_chars is not None and task.max_source_chars < 1:
        raise ValueError(f"{where}: max_source_chars={task.max_source_chars} must be >= 1 (or null)")
    _validate_templates(task)


def _validate_templates(task: TaskConfig) -> None:
    """Template keys and, through :class:`finetune.prompts.PromptTemplate`, the fields each template uses."""
    from finetune.prompts import PromptTemplate

    where = f"task {task.name!r}"
    for kind, tpl in task.templates.items():
        if kind not in MODEL_KINDS:
            raise ValueError(f"{where}: templates.{kind}: unknown model kind; expected one of {MODEL_KINDS}")
        if not isinstance(tpl, dict) or "prompt" not in tpl:
            raise ValueError(f"{where}: templates.{kind} must be a mapping with at least `prompt` (got {tpl!r})")
        unknown = sorted(set(tpl) - set(TEMPLATE_KEYS))
        if unknown:
            raise ValueError(f"{where}: templates.{kind}: unknown key(s) {unknown}; expected {TEMPLATE_KEYS}")
        try:
            PromptTemplate(**tpl).check_fields(task.fields, task.name)
        except ValueError as exc:
            raise ValueError(f"{where}: templates.{kind}: {str(exc).removeprefix(where + ': ')}") from None


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` with unknown and missing keys reported by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}: {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    return cls(**data)


def task_from_dict(data: dict[str, Any], origin: str = "<dict>") -> TaskConfig:
    """A :class:`TaskConfig` from a parsed YAML mapping; ``origin`` (a file name) prefixes errors."""
    if not isinstance(data, dict):
        raise ValueError(f"{origin}: a task file must be a YAML mapping, got {type(data).__name__}")
    data = dict(data)
    if "kind" in data and "type" not in data:  # task files from before the rename
        raise ValueError(f"{origin}: the task key `kind` is now `type` (translation | summarization | qa); "
                         "`kind` names a model's: decoder | encoder_decoder")
    splits = data.get("splits")
    if isinstance(splits, dict):
        data["splits"] = {name: _build(TaskSplit, sp or {}, f"{origin}: splits.{name}") for name, sp in splits.items()}
    elif "splits" in data:
        raise ValueError(f"{origin}: `splits` must be a mapping split name -> {{local, hub_split, ...}}")
    try:
        return _build(TaskConfig, data, origin)
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith(origin) else f"{origin}: {msg}") from None


def load_task(path_or_name: str | Path) -> TaskConfig:
    """A task from a YAML path, or a bare name resolved to ``configs/tasks/<name>.yaml``."""
    path = Path(path_or_name).expanduser()
    if not path.is_file():
        if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
            raise FileNotFoundError(f"task file {path} not found")
        path = TASKS_DIR / f"{path_or_name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"unknown task {str(path_or_name)!r}: no file of that name and no {path}; "
                                    f"shipped tasks: {known}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"task file {path}: invalid YAML: {exc}") from exc
    return task_from_dict(data, origin=f"task file {path}")


# -- loading a split -------------------------------------------------------------------------------

def _columns_for(task: TaskConfig, sp: TaskSplit, local: bool) -> tuple[dict[str, str], list[str]]:
    """(normalized name -> dataset column, reference columns) for this split and origin."""
    if local:
        cols = {**task.columns, **sp.local_columns}
        refs = _as_list(sp.local_references if sp.local_references is not None else task.references)
    else:
        cols = dict(task.hub_columns if task.hub_columns is not None else task.columns)
        refs = _as_list(task.hub_references if task.hub_references is not None else
                        (task.references if task.hub_columns is None else None))
    for extra in task.extra_fields:
        cols.setdefault(extra, extra)
    return cols, refs or [cols["target"]]


def _config_key(task: TaskConfig, sp: TaskSplit, split: str, name: str | None, local: bool) -> str:
    """The YAML key that named a column (for error messages); ``name`` None = a reference column."""
    if name is None:
        if local and sp.local_references is not None:
            return f"splits.{split}.local_references"
        if not local and task.hub_references is not None:
            return "hub_references"
        return "references" if task.references is not None else "references (default: the target column)"
    if local and name in sp.local_columns:
        return f"splits.{split}.local_columns.{name}"
    if not local and task.hub_columns is not None:
        return f"hub_columns.{name}" if name in task.hub_columns else f"extra_fields ({name!r})"
    return f"columns.{name}" if name in task.columns else f"extra_fields ({name!r})"


def _flat_table(raw: Any):
    """The rows as a pyarrow table whose nested struct fields are columns named "a.b"."""
    table = raw.with_format("arrow")[:]
    while any(str(t).startswith("struct") for t in table.schema.types):
        table = table.flatten()
    return table


def _texts(values: Any) -> list[str]:
    r"""A cell as a list of non-empty, stripped strings with "\n" line ends (list cells keep their order).

    Stripped because stray edge spaces ("...the puppy. ", "Where does the Rhine begin? ") would
    otherwise leak into training targets and prompts; \r\n because SAMSum's two local files differ.
    """
    items = values if isinstance(values, list) else [values]
    texts = (str(v).replace("\r\n", "\n").strip() for v in items if v is not None)
    return [t for t in texts if t]


def load_split(task: TaskConfig, split: str, max_examples: int | None = None, seed: int = 0):
    r"""One split as a ``datasets.Dataset`` with columns id, source, target, references + extra fields.

    Args:
        task: the task.
        split: a key of ``task.splits``.
        max_examples: keep a random subset of this many rows, drawn with ``seed`` and kept in file
            order (the same seed gives the same rows); None = all rows. A random subset rather than
            the first N because several files are sorted (Tatoeba by length, SQuAD by article).
        seed: seed of the subset.

    source, target and references are stripped and use "\n" line ends; extra fields are as stored
    (SQuAD answer offsets index the raw context). Rows whose source or target is empty are dropped
    with a warning. ``max_source_chars`` cuts
    longer sources. ``id`` is the configured id column, else "<split>-<row index in the split>".
    """
    import datasets
    import numpy as np

    sp = task.split(split)
    raw, origin, local = sources.read_split(task, split, sp)
    where = f"task {task.name!r} split {split!r} ({origin})"
    if len(raw) == 0:
        raise ValueError(f"{where}: the split has no rows")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples} must be >= 1 (or None for all rows)")
    index = list(range(len(raw)))
    if max_examples is not None and max_examples < len(raw):
        index = sorted(np.random.default_rng(seed).choice(len(raw), size=max_examples, replace=False).tolist())
        raw = raw.select(index)
    table = _flat_table(raw)
    cols, ref_cols = _columns_for(task, sp, local)
    for name, col in [*cols.items(), *((None, c) for c in ref_cols)]:
        if col not in table.column_names:
            key = _config_key(task, sp, split, name, local)
            raise ValueError(f"{where}: column {col!r} ({key}) not found; available columns: {table.column_names}")
    get = {col: table.column(col).to_pylist() for col in {*cols.values(), *ref_cols}}
    out: dict[str, list[Any]] = {f: [] for f in task.fields}
    dropped = 0
    for row, orig in enumerate(index):
        source = _texts(get[cols["source"]][row])
        target = _texts(get[cols["target"]][row])
        if not source or not target:
            dropped += 1
            continue
        out["id"].append(str(get[cols["id"]][row]) if "id" in cols else f"{split}-{orig}")
        out["source"].append(source[0][: task.max_source_chars].rstrip() if task.max_source_chars else source[0])
        out["target"].append(target[0])
        out["references"].append([r for c in ref_cols for r in _texts(get[c][row])] or target[:1])
        for extra in task.extra_fields:
            out[extra].append(get[cols[extra]][row])
    if dropped:
        log.warning("%s: dropped %d of %d rows with an empty source or target", where, dropped, len(index))
    if not out["id"]:
        raise ValueError(f"{where}: no row has a non-empty source ({cols['source']!r}) and target ({cols['target']!r})")
    return datasets.Dataset.from_dict(out)
