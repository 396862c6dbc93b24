"""`python -m finetune study --config configs/study/default.yaml [--quick]`: the study the toolkit
exists for, measured on the shipped data, in one command, one folder and one report.

1. **Attention vs none, by length** and 2. **transformer vs RNN at equal wall-clock minutes**: each
   ``compare`` config (`finetune/compare.py`: RNN without attention, + Bahdanau, + Luong, an NMT
   transformer; BLEU/chrF by source length with intervals, learning curves against minutes and
   steps, paired tests, alignment plots of the best attentional model).
3. **A peer beside ours:** JoeyNMT on the same splits is run by `benchmarks/joeynmt_peer.py` (its own
   venv); the report links its committed results when present.
4. **Pretraining helps?** Every pretrained model fine-tuned on each task, and the same architecture
   and tokenizer fine-tuned from random weights for the same steps (``--model.random_init``):
   scores with intervals and a paired test between the two.
5. **Few-shot vs zero-shot:** the decoder at k = 0, 1, 3, 5 demonstrations inside its trained
   context, with intervals and paired tests against 0-shot; a k-vs-score plot.

Sections 4-5 are the task suite (`finetune/suite.py`) with the random-init control. A pretrained
model whose config names a ``pretrain`` preset is trained first when its run is missing or short
(``python -m pretrain fit ... --ckpt_path last`` in a subprocess: a finished run trains no step).
``--quick`` applies the config's ``quick:`` overrides (the test suite's variant; flags given on the
command line still win). Outputs in
``out_dir``: ``study.md`` (every table, the plots, command, machine, wall times), ``study.json``,
``shots.png``, ``pretraining.png``, ``compare/<name>/`` (each comparison's own files) and a W&B run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune.suite import (RANDOM_INIT, TASKS, Model, Row, Settings, SuiteTask, headline_table, paired_table,
                            rows_as_dicts, run_suite)
from finetune.significance import format_interval


@dataclass
class StudyModel:
    """A pretrained model of sections 4-5.

    Args:
        init: What ``--model.init`` takes: our run directory or checkpoint, an HF directory or hub name.
        pretrain: A pretraining preset (configs/pretrain/*.yaml) that trains ``init`` (a run
            directory) first when it is missing; None: ``init`` must exist.
        shots: Its k-shot settings (None: the study's ``shots``; encoder-decoders usually [0]).
    """

    init: str
    pretrain: str | None = None
    shots: list[int] | None = None


@dataclass
class StudyConfig:
    """What the study runs.

    Args:
        models: name -> a pretrained model (sections 4-5).
        tasks: Tasks of sections 4-5 (names or YAML paths): one translation, one summarization.
        shots: k-shot settings of the decoders (section 5).
        shot_tasks: Tasks that get the k > 0 settings (None: all; the others are scored 0-shot).
        finetune_steps: Fine-tuning steps, the same for pretrained and random-init weights.
        batch_size: Fine-tuning batch.
        lr: Fine-tuning peak LR (the same for both inits: the control changes the weights only).
        eval_examples: Test items per score (None: the whole split).
        max_train_examples: Fine-tuning rows (None: the whole train split).
        val_examples: Validation items scored to pick the best fine-tuning checkpoint.
        val_every: Steps between those validations.
        pretrain_args: Extra ``pretrain fit`` flags (e.g. fewer steps for --quick).
        compare: ``compare`` configs (sections 1-2), run in order.
        compare_overrides: Values that replace the compare configs' own (e.g. a shorter budget).
        out_dir: Where everything goes.
        quick: Overrides of the fields above applied with ``--quick``.
    """

    models: dict[str, StudyModel] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=lambda: ["tatoeba_en_fr", "dialogsum"])
    shots: list[int] = field(default_factory=lambda: [0, 1, 3, 5])
    shot_tasks: list[str] | None = None
    finetune_steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    eval_examples: int | None = None
    max_train_examples: int | None = None
    val_examples: int = 50
    val_every: int = 100
    pretrain_args: list[str] = field(default_factory=list)
    compare: list[str] = field(default_factory=list)
    compare_overrides: dict[str, Any] = field(default_factory=dict)
    out_dir: str = "runs/study"
    quick: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.models = {k: v if isinstance(v, StudyModel) else StudyModel(**v) for k, v in self.models.items()}
        unknown = sorted(set(self.quick) - {f.name for f in fields(self)} - {"quick"})
        if unknown:
            raise ValueError(f"study quick: unknown key(s) {unknown}")
        for path in self.compare:
            if not Path(path).is_file():
                raise FileNotFoundError(f"study compare: no such config {path!r}")

    def quick_variant(self, keep: set[str] = frozenset()) -> StudyConfig:
        """The config with its ``quick:`` overrides applied, except to the fields in ``keep``."""
        quick = {k: v for k, v in self.quick.items() if k not in keep}
        return StudyConfig(**({f.name: getattr(self, f.name) for f in fields(self)} | quick | {"quick": {}}))


# ---- sections 4-5: the suite with the random-init control ----------------------------------------
def ensure_pretrained(name: str, model: StudyModel, extra: list[str]) -> None:
    """Pretrain ``model.init`` with its preset when a preset is given (resumes; a finished run
    trains no further step). A subprocess: `finetune` never imports `pretrain`."""
    if model.pretrain is None:
        return  # used as it is: --model.init names what is wrong with it
    print(f"\n=== study: pretrain {name} ({model.pretrain} -> {model.init}) ===", flush=True)
    cmd = [sys.executable, "-m", "pretrain", "fit", "--config", model.pretrain, "--trainer.default_root_dir",
           model.init, "--trainer.enable_progress_bar", "false", *extra, "--ckpt_path", "last"]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"study: pretraining {name} failed: {' '.join(cmd)}")


def suite_task(name: str) -> SuiteTask:
    return next((t for t in TASKS if t.name == name), SuiteTask(name, max_new_tokens=48))


def run_pretraining_and_shots(cfg: StudyConfig, out: Path) -> list[Row]:
    for name, model in cfg.models.items():
        ensure_pretrained(name, model, cfg.pretrain_args)
    settings = Settings(eval_examples=cfg.eval_examples, shots=tuple(cfg.shots), finetune_steps=cfg.finetune_steps,
                        val_examples=cfg.val_examples, val_every=cfg.val_every, batch_size=cfg.batch_size, lr=cfg.lr,
                        max_train_examples=cfg.max_train_examples, random_init_control=True,
                        shot_tasks=None if cfg.shot_tasks is None else tuple(cfg.shot_tasks))
    models = [Model(name, m.init, ("--attention_plots.n_examples", "0"), None if m.shots is None else tuple(m.shots))
              for name, m in cfg.models.items()]
    return run_suite(models, out / "suite", settings, tasks=tuple(suite_task(t) for t in cfg.tasks))


def shots_likelihood(cfg: StudyConfig, rows: list[Row], out: Path) -> list[dict[str, Any]]:
    """Section 5's graded signal: per decoder and task with several k, the NLL of the reference answer
    after each k-shot prompt (`finetune.completion_likelihood`), on the items where every k fits,
    with 95% intervals and a paired bootstrap against k = 0."""
    from finetune.completion_likelihood import completion_nll, read_predictions
    from finetune.pretrained import load_pretrained
    from finetune.significance import mean_interval, paired_bootstrap
    from finetune.tasks import load_task

    table = []
    for (model, task), cells in _k_rows(rows).items():
        loaded = load_pretrained(cfg.models[model].init)
        if loaded.kind != "decoder":
            continue
        delimiter = load_task(task).template("decoder").target_delimiter
        nll = {}
        for r in cells:
            records = read_predictions(out / "suite" / model / task / "eval" / f"{task}-test-{r.setting.split('-')[0]}shot")
            nll[r.setting] = completion_nll(loaded.model, loaded.tokenizer, delimiter, records, r.extra["max_length"])
        keep = [i for i in range(len(cells[0].ids)) if all(v[i] is not None for v in nll.values())]
        base = [nll[cells[0].setting][i] for i in keep]
        for r in cells:
            values = [nll[r.setting][i] for i in keep]
            table.append({"model": model, "task": task, "setting": r.setting, "n": len(keep), "n_total": r.n_total,
                          "nll": sum(values) / len(values), "ci95": mean_interval(values),
                          "vs_0_shot": None if r is cells[0] else paired_bootstrap(base, values)})
    return table


def _k_rows(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """(model, task) -> its k-shot rows in k order, where there are several."""
    cells: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.setting.endswith("-shot"):
            cells.setdefault((r.model, r.task), []).append(r)
    return {k: v for k, v in cells.items() if len(v) > 1}


# ---- sections 1-2: the comparisons ----------------------------------------------------------------
def run_comparisons(cfg: StudyConfig, out: Path) -> list[dict[str, Any]]:
    from finetune.compare import main as compare_main

    results = []
    for path in cfg.compare:
        name = Path(path).stem
        overrides = [arg for key, value in (cfg.compare_overrides | {"out_dir": str(out / "compare" / name)}).items()
                     for arg in (f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value))]
        print(f"\n=== study: compare {name} ===", flush=True)
        results.append({"name": name, "config": path, **compare_main(["--config", path, *overrides])})
    return results


# ---- plots and report ----------------------------------------------------------------------------
def _plotted_metric(row: Row) -> str:
    """chrF for translation (BLEU sits at 0 for tiny models), ROUGE-L, SQuAD F1: the task's graded score."""
    return next((k for k in ("chrf", "rougeL", "f1") if k in row.metrics), row.metric)


def plot_shots(rows: list[Row], path: Path, likelihood: list[dict[str, Any]] | None = None) -> Path | None:
    """Against k (demonstrations), per task: the greedy answers' score (top) and, when measured, the
    reference answer's NLL after the prompt (bottom), 95% intervals, one line per model."""
    lines = _k_rows(rows)
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for _, t in lines})
    n_rows = 2 if likelihood else 1
    fig, axes = plt.subplots(n_rows, len(tasks), figsize=(5 * len(tasks), 3.4 * n_rows), squeeze=False)

    def draw(ax, ks, y, ci, label) -> None:
        err = [[max(0.0, v - c[0]) for v, c in zip(y, ci)], [max(0.0, c[1] - v) for v, c in zip(y, ci)]]
        ax.errorbar(ks, y, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    for (model, task), cells in lines.items():
        col, key = tasks.index(task), _plotted_metric(cells[0])
        ks = [int(r.setting.split("-")[0]) for r in cells]
        draw(axes[0][col], ks, [r.metrics[key] for r in cells],
             [r.intervals.get(key, [r.metrics[key]] * 2) for r in cells], f"{model} ({key}, greedy answers)")
        axes[0][col].set_title(f"{task} (n={cells[0].n} of {cells[0].n_total})", fontsize=10)
        nll = [t for t in likelihood or [] if (t["model"], t["task"]) == (model, task)]
        if nll:
            draw(axes[1][col], [int(t["setting"].split("-")[0]) for t in nll], [t["nll"] for t in nll],
                 [t["ci95"] for t in nll], f"{model} (n={nll[0]['n']} that fit every k)")
            axes[1][col].set_ylabel("reference NLL, nats/token")
    for ax in axes[-1]:
        ax.set_xlabel("demonstrations in the prompt (k)")
    axes[0][0].set_ylabel("score, 95% interval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pretraining(rows: list[Row], path: Path) -> Path | None:
    """Fine-tuned from pretrained vs from random weights, per (model, task): bars with 95% intervals."""
    pairs = [(r, next(c for c in rows if (c.model, c.task, c.setting) == (r.model, r.task, RANDOM_INIT)))
             for r in rows if r.setting == "fine-tuned"
             and any((c.model, c.task, c.setting) == (r.model, r.task, RANDOM_INIT) for c in rows)]
    if not pairs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(pairs) + 2, 3.6))
    for i, (pre, rnd) in enumerate(pairs):
        key = _plotted_metric(pre)
        for j, (row, label, color) in enumerate(((pre, "pretrained", "tab:blue"), (rnd, "random init", "tab:gray"))):
            value = row.metrics[key]
            lo, hi = row.intervals.get(key, [value, value])
            ax.bar(i + 0.2 * (2 * j - 1), value, width=0.38, color=color, label=label if i == 0 else None,
                   yerr=[[max(0.0, value - lo)], [max(0.0, hi - value)]], capsize=3)
        if rnd.paired.get(key, {}).get("significant"):
            ax.text(i, max(pre.intervals.get(key, [0, pre.metrics[key]])[1],
                           rnd.intervals.get(key, [0, rnd.metrics[key]])[1]) * 1.03 + 0.1, "*", ha="center")
    ax.set_xticks(range(len(pairs)), [f"{p.model}\n{p.task}\n({_plotted_metric(p)})" for p, _ in pairs], fontsize=8)
    ax.set_ylabel("test score, 95% interval")
    ax.set_title("Pretrained vs random weights, same fine-tuning steps\n(* paired test p < 0.05)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine_line() -> str:
    from common.matmul_probe import _machine_key

    import torch

    return f"{_machine_key()}; Python {platform.python_version()}, torch {torch.__version__}"


def _compare_section(c: dict[str, Any], out: Path) -> list[str]:
    folder = out / "compare" / c["name"]
    text = (folder / "comparison.md").read_text(encoding="utf-8").split("\n", 1)[1]  # without its title
    images = [p for p in ("bleu_by_length.png", "learning_curves.png") if (folder / p).is_file()]
    attention = sorted((folder / "attention").glob("*.png")) if (folder / "attention").is_dir() else []
    return [f"### {c['name']} (`{c['config']}`)", "", text.strip(), "",
            *(f"![{p}](compare/{c['name']}/{p})" for p in images),
            *(f"![alignment](compare/{c['name']}/attention/{p.name})" for p in attention[:1]), ""]


def render(cfg: StudyConfig, rows: list[Row], comparisons: list[dict[str, Any]], report: dict[str, Any],
           out: Path) -> str:
    peer = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "joeynmt_peer.md"
    shot_rows = [r for cells in _k_rows(rows).values() for r in cells]
    lines = ["# The study: RNN -> attention -> transformer -> pretraining -> zero/few-shot", "",
             "```", report["command"], "```", "",
             f"- Machine: {report['machine']}", f"- Date {report['date']}; wall time {report['wall_s'] / 60:.1f} min "
             f"(comparisons {report['compare_s'] / 60:.1f}, pretraining + suite {report['suite_s'] / 60:.1f})",
             f"- Every score with its 95% interval; paired tests on the same items (p < 0.05 = significant).", "",
             "## 1-2. Attention vs none by length; transformer vs RNN at equal minutes", ""]
    for c in comparisons:
        lines += _compare_section(c, out)
    lines += ["## 3. A peer beside ours: JoeyNMT", "",
              ("See `benchmarks/results/joeynmt_peer.md` in the repository "
               "(`benchmarks/joeynmt_peer.py`: JoeyNMT on the same splits, BPE size, budget and sacreBLEU settings)."
               if peer.is_file() else "Not run here: `benchmarks/joeynmt_peer.py` (its own venv)."), "",
              "## 4. Pretraining helps? Fine-tuned from pretrained vs random weights", "",
              f"Both fine-tuned for {cfg.finetune_steps} steps of batch {cfg.batch_size} (LR {cfg.lr:g}), best "
              f"checkpoint by validation on {cfg.val_examples} items, scored 0-shot on the test split. "
              f"`*`: differs from its baseline (0-shot; for random init: the pretrained model fine-tuned).", "",
              headline_table([r for r in rows if r.setting in ("fine-tuned", RANDOM_INIT, "0-shot")])]
    if (out / "pretraining.png").is_file():
        lines += ["![pretrained vs random init](pretraining.png)", ""]
    lines += ["## 5. Few-shot vs zero-shot", "", headline_table(shot_rows) if shot_rows else "(no k-shot rows)"]
    if (out / "shots.png").is_file():
        lines += ["![score against k](shots.png)", ""]
    if report.get("likelihood"):
        lines += ["Log-likelihood of the reference answer after each k-shot prompt (nats per token, lower is "
                  "better; the items where every k fits the context; `finetune/completion_likelihood.py`), "
                  "95% intervals, paired bootstrap against 0-shot:", "",
                  "| model | task | setting | n of N | NLL [95% CI] | difference vs 0-shot | p |", "|---|---|---|---|---|---|---|"]
        for t in report["likelihood"]:
            vs = t["vs_0_shot"]
            lines.append(f"| {t['model']} | {t['task']} | {t['setting']} | {t['n']} of {t['n_total']} | "
                         f"{format_interval(t['nll'], t['ci95'], 3)} | "
                         + (f"{vs['delta']:+.3f} | {vs['p_value']:.4f}{' *' if vs['significant'] else ''} |" if vs else "– | – |"))
        lines.append("")
    lines += ["## Paired tests", "", paired_table(rows), "## Every run", "",
              *(f"- {r.model} {r.task} {r.setting}: n={r.n} of {r.n_total}, shots used {r.shots_used_mean:.2f}, "
                f"truncated {r.n_truncated}, empty {r.n_empty}, {r.wall_s:.0f} s" for r in rows), ""]
    return "\n".join(lines)


def study(cfg: StudyConfig, command: str) -> dict[str, Any]:
    """Run every section; write ``study.md`` and friends into ``cfg.out_dir``; return the summary."""
    import datetime as dt

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = run_pretraining_and_shots(cfg, out) if cfg.models else []
    likelihood = shots_likelihood(cfg, rows, out)
    suite_s = time.time() - started
    comparisons = run_comparisons(cfg, out)
    report = {"command": command, "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_line(),
              "wall_s": time.time() - started, "suite_s": suite_s, "compare_s": time.time() - started - suite_s,
              "likelihood": likelihood}
    plot_shots(rows, out / "shots.png", likelihood)
    plot_pretraining(rows, out / "pretraining.png")
    (out / "study.md").write_text(render(cfg, rows, comparisons, report, out), encoding="utf-8")
    summary = {**report, "report": str(out / "study.md"), "rows": rows_as_dicts(rows),
               "comparisons": [{k: v for k, v in c.items() if k != "by_length"} | {"by_length": c["by_length"]}
                               for c in comparisons]}
    (out / "study.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    _log_wandb(out, rows)
    print(f"\nstudy written to {out / 'study.md'} ({report['wall_s'] / 60:.1f} min)")
    return summary


def _log_wandb(out: Path, rows: list[Row]) -> None:
    """One W&B run with the suite rows and every plot of the study (offline unless logged in)."""
    from common.wandb_logger import AutoWandbLogger

    logger = AutoWandbLogger(project="lmtrain-study", save_dir=str(out), name=out.name)
    columns = ["model", "task", "setting", "metric", "score", "ci_low", "ci_high", "n", "n_total"]
    logger.log_table(key="study", columns=columns, data=[
        [r.model, r.task, r.setting, r.metric, r.score, *r.intervals.get(r.metric, [r.score, r.score]), r.n, r.n_total]
        for r in rows])
    for png in [out / "shots.png", out / "pretraining.png", *sorted(out.glob("compare/*/*.png"))]:
        if png.is_file():
            logger.log_image(key=str(png.relative_to(out).with_suffix("")).replace("/", "_"), images=[str(png)])
    logger.experiment.finish()


def main(args: list[str] | None = None) -> dict[str, Any]:
    from jsonargparse import ActionConfigFile, ArgumentParser

    args = list(sys.argv[1:] if args is None else args)
    quick = "--quick" in args  # a plain flag: the config's quick: overrides
    parser = ArgumentParser(description=__doc__ + "\n  --quick  apply the config's quick: overrides")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(StudyConfig, nested_key=None)
    parsed = parser.parse_args([a for a in args if a != "--quick"])
    cfg = StudyConfig(**{k: v for k, v in vars(parsed).items() if k not in ("config", "__default_config__")})
    if quick:  # flags given on the command line win over the config's quick: overrides
        given = {a[2:].split("=")[0].split(".")[0] for a in args if a.startswith("--")}
        cfg = cfg.quick_variant(keep=given)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = "python -m finetune study " + " ".join(args)
    return study(cfg, command)
