"""The task suite: zero-/few-shot and fine-tuned scores of models on translation, summarization, QA.

For every model and task: evaluate k-shot (k = 0, 1, 3, 5 by default) on the task's test split,
fine-tune with a fixed step budget (best checkpoint by ``val/score``), evaluate that checkpoint
0-shot on the same test items; with ``random_init_control``, fine-tune the same architecture and
tokenizer from freshly drawn weights with the same budget (does pretraining help?). Every score
carries its 95% interval, and every setting is compared with its baseline on the same items by a
paired test (``finetune.significance``; the baseline is 0-shot, and for the random-init control the
pretrained model fine-tuned): the tables say which differences are significant. Every run is the public CLI, in-process (``finetune.cli.main``), exactly what
``python -m finetune evaluate|fit`` would do; each run's files stay under ``out_dir``:

    <out_dir>/<model>/<task>/eval/<task>-test-<k>shot/       results.json, predictions.jsonl, prompts
    <out_dir>/<model>/<task>/finetune/checkpoints/           the fine-tuning run
    <out_dir>/<model>/<task>/finetune/eval/<task>-test-0shot/ the fine-tuned model's scores

Used by ``scripts/main_job.py`` (README command 1) and ``benchmarks/task_scores.py``.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from finetune.cli import main as _cli_main
from finetune.significance import format_interval


def finetune_cli(args: list[str]):
    """``finetune.cli.main(args)``, without LightningCLI's warning that the script's own argv is ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _cli_main(args)


@dataclass(frozen=True)
class SuiteTask:
    """One task of the suite and the splits/lengths it is run with."""

    name: str
    max_new_tokens: int
    train_split: str = "train"
    val_split: str = "validation"  # scored during fine-tuning: selects the best checkpoint
    test_split: str = "test"


# SQuAD ships only its dev set here (configs/tasks/squad.yaml): fine-tune on part-00 (`validation`)
# and score on part-01 (`test`, other articles). Checkpoints are then selected on held-in questions
# of part-00, never on the scored split.
TASKS = (
    SuiteTask("tatoeba_en_fr", max_new_tokens=32),
    SuiteTask("dialogsum", max_new_tokens=48),
    SuiteTask("squad", max_new_tokens=16, train_split="validation", val_split="validation"),
)


@dataclass(frozen=True)
class Settings:
    """How much work each cell of the table gets (the same for every model and task)."""

    eval_examples: int | None = None  # test items per score: None = the whole split; else a seeded subset,
                                      #   the same items for every setting (tables say "n of N")
    shots: tuple[int, ...] = (0, 1, 3, 5)
    finetune_steps: int = 200         # fixed optimizer-step budget per (model, task)
    random_init_control: bool = False  # also fine-tune the same model from random weights (same budget)
    shot_tasks: tuple[str, ...] | None = None  # tasks that get the k > 0 settings (None: all; others 0-shot)
    val_examples: int = 50            # validation items scored during fine-tuning
    val_every: int = 100              # validate + checkpoint every this many steps
    batch_size: int = 8
    lr: float = 1e-3                  # tiny models from scratch: a high LR learns in a few hundred steps
    warmup_steps: int = 20
    max_train_examples: int | None = None
    seed: int = 1234
    wandb_finetune: bool = True       # fine-tuning runs log to W&B (offline unless logged in); evals do not


QUICK = Settings(eval_examples=20, finetune_steps=30, val_examples=10, val_every=15, max_train_examples=2000)


@dataclass(frozen=True)
class Model:
    """A model to score: a name for the table, ``--model.init``, and CLI arguments of its own."""

    name: str
    init: str
    args: tuple[str, ...] = ()  # e.g. ("--data.max_length", "512")
    shots: tuple[int, ...] | None = None  # k-shot settings of this model (None: the settings')


@dataclass
class Row:
    model: str
    task: str
    setting: str        # "0-shot", "1-shot", ..., "fine-tuned", "fine-tuned, random init"
    metric: str         # the primary metric's name (bleu, rougeL, f1)
    score: float
    metrics: dict[str, float]
    n: int              # scored test items
    shots_used_mean: float
    n_truncated: int    # prompts whose source/context was cut to fit the context
    n_empty: int        # empty predictions
    wall_s: float       # evaluation (fine-tuned: fine-tuning + evaluation)
    n_total: int = 0    # items in the test split (n < n_total: a seeded subset)
    intervals: dict[str, list[float]] = field(default_factory=dict)  # 95% CI per score
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)  # vs `baseline` on the same items, per score
    baseline: str = "0-shot"  # the setting this row is tested against
    extra: dict[str, Any] = field(default_factory=dict)
    # The scored items (not in the tables): what paired tests need.
    ids: list[str] = field(default_factory=list, repr=False)
    predictions: list[str] = field(default_factory=list, repr=False)
    references: list[list[str]] = field(default_factory=list, repr=False)
    lang: str = "en"


def _common_args(model: Model, task: SuiteTask, settings: Settings, root: Path) -> list[str]:
    return ["--model.init", model.init, "--data.task", task.name, "--model.max_new_tokens", str(task.max_new_tokens),
            "--seed_everything", str(settings.seed), "--data.seed", str(settings.seed),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *model.args]


def evaluate(model: Model, task: SuiteTask, settings: Settings, shots: int, root: Path, setting: str) -> Row:
    """``python -m finetune evaluate`` on the task's test split; one row of the table."""
    started = time.time()
    subset = [] if settings.eval_examples is None else ["--data.max_eval_examples", str(settings.eval_examples)]
    cli = finetune_cli(["evaluate", *_common_args(model, task, settings, root), "--data.shots", str(shots),
                        "--data.test_split", task.test_split, *subset, "--trainer.logger", "false",
                        "--data.train_split", task.train_split])  # the overlap report checks what fine-tuning sees
    r = cli.results
    items = cli.datamodule.eval_items["test"]
    metrics = {k: float(v) for k, v in r["metrics"].items() if isinstance(v, float)}
    return Row(model.name, task.name, setting, r["score_name"], float(r["score"]), metrics, r["n_prompts"],
               float(r["shots_used_mean"]), int(r["n_truncated"]), int(r["metrics"]["n_empty_predictions"]),
               time.time() - started, n_total=int(r["n_total"]), intervals=r["ci95"],
               extra={"max_length": r["max_length"], "overlap": r["overlap"]},
               ids=[it["id"] for it in items], predictions=list(r["predictions"]),
               references=[it["references"] for it in items], lang=cli.datamodule.task.target_lang or "en")


RANDOM_INIT = "fine-tuned, random init"


def finetune(model: Model, task: SuiteTask, settings: Settings, root: Path, random_init: bool = False) -> Row:
    """``python -m finetune fit`` with a fixed step budget, then evaluate the best checkpoint 0-shot
    (``random_init``: the same architecture and tokenizer from freshly drawn weights)."""
    started = time.time()
    shutil.rmtree(root, ignore_errors=True)  # a fresh run: no checkpoints of an earlier one to pick from
    logger = [] if settings.wandb_finetune else ["--trainer.logger", "false"]
    cli = finetune_cli(["fit", *_common_args(model, task, settings, root), *logger,
                        *(["--model.random_init", "true"] if random_init else []),
                        "--data.train_split", task.train_split, "--data.val_split", task.val_split,
                        "--data.batch_size", str(settings.batch_size),
                        "--data.max_val_examples", str(settings.val_examples),
                        *(["--data.max_train_examples", str(settings.max_train_examples)]
                          if settings.max_train_examples else []),
                        "--model.lr", str(settings.lr), "--model.warmup_steps", str(settings.warmup_steps),
                        "--trainer.max_steps", str(settings.finetune_steps),
                        "--trainer.val_check_interval", str(settings.val_every),
                        "--checkpoint.save_top_k", "1"])
    callback = cli.trainer.checkpoint_callback
    best, fit_s = callback.best_model_path, time.time() - started
    if not best:
        raise RuntimeError(f"fine-tuning {model.name} on {task.name} saved no best checkpoint under {root}")
    tuned = replace(model, init=best)
    row = evaluate(tuned, task, settings, 0, root, RANDOM_INIT if random_init else "fine-tuned")
    row.model, row.wall_s = model.name, time.time() - started
    row.baseline = "fine-tuned" if random_init else "0-shot"
    row.extra.update({"checkpoint": best, "best_val_score": float(callback.best_model_score),
                      "steps": settings.finetune_steps, "fit_s": fit_s,
                      "train_prompts": cli.datamodule.train_stats.as_dict() if cli.datamodule.train_stats else None})
    return row


def run_suite(models: list[Model], out_dir: str | Path, settings: Settings = Settings(),
              tasks: tuple[SuiteTask, ...] = TASKS, log: Callable[[str], None] = print) -> list[Row]:
    """Every (model, task): k-shot evaluations for k in ``settings.shots``, then fine-tune + evaluate."""
    rows: list[Row] = []
    for model in models:
        for task in tasks:
            root = Path(out_dir) / model.name / task.name
            cells: list[Row] = []
            shots = settings.shots if model.shots is None else model.shots
            if settings.shot_tasks is not None and task.name not in settings.shot_tasks:
                shots = tuple(k for k in shots if k == 0)
            for k in shots:
                cells.append(evaluate(model, task, settings, k, root, f"{k}-shot"))
                log(_progress(cells[-1]))
            cells.append(finetune(model, task, settings, root / "finetune"))
            log(_progress(cells[-1]))
            if settings.random_init_control:
                cells.append(finetune(model, task, settings, root / "finetune-random-init", random_init=True))
                log(_progress(cells[-1]))
            compare_with_baselines(cells)
            rows += cells
    return rows


def compare_with_baselines(rows: list[Row]) -> None:
    """Fill ``row.paired`` of every row of one (model, task) with a paired test against the row of
    its ``baseline`` setting (when that setting was run)."""
    from finetune.significance import paired_test
    from finetune.tasks import load_task

    by_setting = {r.setting: r for r in rows}
    for row in rows:
        base = by_setting.get(row.baseline)
        if base is None or base is row:
            continue
        if row.ids != base.ids:
            raise RuntimeError(f"{row.model} {row.task}: {row.setting} and {row.baseline} scored different items")
        metric = load_task(base.task).metric
        row.paired = paired_test(metric, base.predictions, row.predictions, base.references, lang=base.lang)


def _progress(row: Row) -> str:
    return (f"[suite] {row.model} {row.task} {row.setting}: {scores_text(row)} "
            f"(n={row.n} of {row.n_total}, shots used {row.shots_used_mean:.2f}, {row.wall_s:.0f} s)")


# ---- tables -------------------------------------------------------------------------------------
SHOWN = {"bleu": "BLEU", "chrf": "chrF", "rouge1": "R-1", "rouge2": "R-2", "rougeL": "R-L",
         "exact_match": "EM", "f1": "F1"}
REPORTED = {"bleu": ("bleu", "chrf"), "rougeL": ("rouge1", "rouge2", "rougeL"), "f1": ("exact_match", "f1")}


def reported(row: Row) -> list[str]:
    """The metrics shown for the row's task (by its primary metric), in table order."""
    return [k for k in REPORTED.get(row.metric, (row.metric,)) if k in row.metrics]


def scores_text(row: Row) -> str:
    """The task's reported scores with their intervals, e.g. ``BLEU 1.23 [0.80, 1.71] / chrF ...``."""
    return " / ".join(f"{SHOWN.get(key, key)} {cell(row, key, mark=False)}" for key in reported(row))


def cell(row: Row, key: str, mark: bool = True) -> str:
    """``score [lo, hi]``, with ``*`` when a paired test finds it different from its baseline (p < 0.05)."""
    text = format_interval(row.metrics[key], row.intervals.get(key))
    return text + ("*" if mark and row.paired.get(key, {}).get("significant") else "")


def markdown_table(rows: list[Row]) -> str:
    """Every row: model, task, setting, scores, items, shots used, truncated/empty, wall time."""
    lines = ["| model | task | setting | scores [95% CI] | n of N | shots used (mean) | truncated | empty | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.task} | {r.setting} | {scores_text(r)} | {r.n} of {r.n_total} "
                     f"| {r.shots_used_mean:.2f} | {r.n_truncated} | {r.n_empty} | {r.wall_s:.0f} |")
    return "\n".join(lines) + "\n"


def headline_table(rows: list[Row]) -> str:
    """One line per (model, task, metric), one column per setting: score [95% CI], * = differs from
    its baseline on the same items (paired test, p < 0.05): 0-shot, and for the random-init control
    the pretrained model fine-tuned."""
    settings = list(dict.fromkeys(r.setting for r in rows))
    cells: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        cells.setdefault((r.model, r.task), {})[r.setting] = r
    lines = ["| model | task | n of N | metric | " + " | ".join(settings) + " |",
             "|---|---|---|---|" + "---|" * len(settings)]
    for (model, task), by_setting in cells.items():
        first = next(iter(by_setting.values()))
        for key in reported(first):
            values = [cell(by_setting[s], key) if s in by_setting else "" for s in settings]
            lines.append(f"| {model} | {task} | {first.n} of {first.n_total} | {SHOWN.get(key, key)} | "
                         + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def paired_table(rows: list[Row]) -> str:
    """Every paired test against its baseline: difference, p-value, significant at 0.05, and the test."""
    lines = ["| model | task | metric | setting vs baseline | difference | p | significant |", "|---|---|---|---|---|---|---|"]
    tests = set()
    for r in rows:
        for key in reported(r):
            if key in r.paired:
                t = r.paired[key]
                tests.add(t["test"])
                lines.append(f"| {r.model} | {r.task} | {SHOWN.get(key, key)} | {r.setting} vs {r.baseline} | {t['delta']:+.2f} | "
                             f"{t['p_value']:.4f} | {'yes' if t['significant'] else 'no'} |")
    return "\n".join(lines) + "\n\nTests: " + "; ".join(f"`{t}`" for t in sorted(tests)) + "\n"


def rows_as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows for a results file (the per-item predictions stay in each run's predictions.jsonl)."""
    return [{k: v for k, v in asdict(r).items() if k not in ("ids", "predictions", "references")} for r in rows]


def all_finite(rows: list[Row]) -> bool:
    return all(math.isfinite(r.score) and all(math.isfinite(v) for v in r.metrics.values()) for r in rows)
