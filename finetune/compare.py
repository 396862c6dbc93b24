"""`python -m finetune compare --config configs/compare/translation_en_fr.yaml`: RNN baselines vs a
transformer, trained from scratch on one task under the same budget, then compared.

Each model is an entry of ``models`` (an architecture as ``--model.scratch`` takes it: our RNN without
attention, with Bahdanau or Luong attention, and a transformer encoder-decoder of similar size).
All share one tokenizer (a BPE trained once on the task's train split) and the same data order.
The budget is either optimizer steps (``max_steps``) or, with ``budget_minutes``, the same minutes
of training time for every model (`common.wall_clock_budget`: each model's step horizon and cosine
schedule fitted to the budget on this machine); ``model_options`` gives a model its own recipe
(LR, warmup, batch size, label smoothing), as each architecture wants its own. Every model
is fine-tuned with the public `finetune fit` and scored with `finetune evaluate` on the whole test
split (unless ``max_eval_examples`` says otherwise). Every score has its 95% interval and every pair
of models a paired significance test on the same sentences (``finetune.significance``).
Outputs in ``out_dir``: ``comparison.md`` (BLEU/chrF overall and by source length, parameters,
time, paired tests), ``bleu_by_length.png`` (the shape of Bahdanau et al. 2014, Fig. 2, with 95%
intervals), ``learning_curves.png`` (validation BLEU against training minutes and against steps),
``comparison.json``, attention plots of the best model, and a W&B table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.metrics import compute_metrics
from finetune.pretrained import ScratchArch
from finetune.significance import confidence_intervals, format_interval, paired_test


@dataclass
class CompareConfig:
    """What to compare and under which budget.

    Args:
        task: Task name or YAML (a translation task: BLEU/chrF).
        models: name -> the architecture of a model trained from scratch, as ``--model.scratch``
            takes it (``model_type`` rnn_seq2seq, t5 or gpt2, plus options; checked when parsed).
        model_options: name -> that model's own values of ``MODEL_OPTIONS`` (lr, warmup_steps,
            batch_size, label_smoothing, weight_decay, max_steps); the others are the shared ones below.
        lr: Default peak learning rate.
        warmup_steps: Default linear warmup steps.
        max_steps: The step budget per model (with ``budget_minutes``: only an upper bound).
        budget_minutes: The same minutes of training time (validation excluded) for every model.
        val_every_minutes: With ``budget_minutes``: validate after this much training time
            (default: budget / 6), so every model gets the same number of points on its curve.
        batch_size: Default training sentences per step.
        batch_tokens: Default token-based batches (at most this many tokens, padding included, of
            similar-length sentences; the transformer NMT recipes' batching) instead of ``batch_size``.
        label_smoothing: Default label smoothing of the training loss.
        weight_decay: Default AdamW weight decay.
        max_train_examples: Random subset of the train split (None: all).
        max_eval_examples: Random subset of the test split scored (None: the whole split).
        val_check_interval: Steps between validations (best checkpoint by validation BLEU).
        tokenizer_vocab_size: Vocabulary of the shared BPE.
        length_buckets: Upper bounds (source words, inclusive) of the length buckets.
        num_beams: Beam width for the test translations.
        max_new_tokens: Generation length limit.
        out_dir: Where runs and the comparison go.
    """

    task: str
    models: dict[str, ScratchArch]
    model_options: dict[str, dict[str, int | float]] = field(default_factory=dict)
    lr: float = 1e-3
    warmup_steps: int = 200
    max_steps: int = 2000
    budget_minutes: float | None = None
    val_every_minutes: float | None = None
    batch_size: int = 64
    batch_tokens: int | None = None
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    val_check_interval: int = 500
    tokenizer_vocab_size: int = 8000
    length_buckets: list[int] = field(default_factory=lambda: [4, 6, 8, 10, 15, 1000])
    num_beams: int = 1
    max_new_tokens: int = 48
    out_dir: str = "runs/compare"

    def __post_init__(self) -> None:
        from finetune.pretrained import scratch_arch

        # Typed (dicts from Python) and checked, naming the model.
        self.models = {name: scratch_arch(arch, f"models.{name}") for name, arch in self.models.items()}
        unknown = sorted(set(self.model_options) - set(self.models))
        if unknown:
            raise ValueError(f"model_options names no model: {unknown}; models are {sorted(self.models)}")
        for name, options in self.model_options.items():
            bad = sorted(set(options) - set(MODEL_OPTIONS))
            if bad:
                raise ValueError(f"model_options.{name}: unknown option(s) {bad}; expected some of {list(MODEL_OPTIONS)}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"budget_minutes must be > 0, got {self.budget_minutes}")

    def option(self, name: str, key: str) -> Any:
        """Model ``name``'s value of option ``key``: its own, else the shared one."""
        return self.model_options.get(name, {}).get(key, getattr(self, key))


# What a model may set for itself, and the `finetune fit` flag each becomes.
MODEL_OPTIONS = {"lr": "--model.lr", "warmup_steps": "--model.warmup_steps", "batch_size": "--data.batch_size",
                 "batch_tokens": "--data.batch_tokens",
                 "label_smoothing": "--model.label_smoothing", "max_steps": "--trainer.max_steps",
                 "weight_decay": "--model.weight_decay"}


def _common_args(cfg: CompareConfig, run_dir: Path) -> list[str]:
    return ["--data.task", cfg.task, "--model.max_new_tokens", str(cfg.max_new_tokens),
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--attention_plots.n_examples", "0"]


def train_and_score(cfg: CompareConfig, name: str, arch: ScratchArch,
                    tokenizer: str | None) -> dict[str, Any]:
    """Fine-tune model ``name`` from scratch within the budget and score it on the test split."""
    from finetune.cli import main as finetune_cli

    run_dir = Path(cfg.out_dir) / name
    started = time.time()
    recipe = [arg for key, flag in MODEL_OPTIONS.items() if cfg.option(name, key) is not None
              for arg in (flag, str(cfg.option(name, key)))]
    if cfg.budget_minutes is None:
        budget = ["--trainer.val_check_interval", str(cfg.val_check_interval)]
    else:  # validation every val_every_minutes of training (Lightning's time-based interval)
        every = cfg.val_every_minutes or cfg.budget_minutes / 6
        budget = ["--trainer.callbacks+=common.wall_clock_budget.WallClockBudget",
                  f"--trainer.callbacks.minutes={cfg.budget_minutes}",
                  "--trainer.val_check_interval", _duration(every)]
    fit = finetune_cli(["fit", "--model.scratch", json.dumps(arch.to_dict()), *recipe, *budget,
                        "--data.max_val_examples", "200",
                        *(["--model.tokenizer", tokenizer] if tokenizer else
                          ["--model.tokenizer_vocab_size", str(cfg.tokenizer_vocab_size)]),
                        *(["--data.max_train_examples", str(cfg.max_train_examples)] if cfg.max_train_examples else []),
                        *_common_args(cfg, run_dir)])
    train_seconds = time.time() - started
    curve = learning_curve(run_dir)
    n_params = sum(p.numel() for p in fit.model.model.parameters())
    best = fit.trainer.checkpoint_callback.best_model_path or str(run_dir / "checkpoints" / "last.ckpt")
    subset = [] if cfg.max_eval_examples is None else ["--data.max_eval_examples", str(cfg.max_eval_examples)]
    test = finetune_cli(["evaluate", "--model.init", best, "--model.num_beams", str(cfg.num_beams), *subset,
                         "--trainer.logger", "false", *_common_args(cfg, run_dir / "test")])
    results = test.results
    items = test.datamodule.eval_items["test"]
    return {"name": name, "params": n_params, "train_seconds": train_seconds, "checkpoint": best,
            "steps": fit.trainer.global_step, "curve": curve,
            "train_minutes": curve[-1]["train_minutes"] if curve and "train_minutes" in curve[-1] else None,
            "bleu": results["metrics"]["bleu"], "chrf": results["metrics"]["chrf"],
            "exact_match": results["metrics"]["exact_match"], "ci95": results["ci95"],
            "n": results["n_prompts"], "n_total": results["n_total"], "predictions": results["predictions"],
            "references": [it["references"] for it in items], "sources": [it["source"] for it in items],
            "tokenizer": str(run_dir / "tokenizer") if (run_dir / "tokenizer").is_dir() else tokenizer}


def _duration(minutes: float) -> str:
    """Lightning's "DD:HH:MM:SS" for ``minutes`` (whole seconds, at least 1)."""
    seconds = max(1, round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def learning_curve(run_dir: Path) -> list[dict[str, float]]:
    """The validations of the fit in ``run_dir`` from its metrics.jsonl: [{step, minutes (since the
    first logged value), train_minutes (with a budget), bleu}]."""
    from common.metrics_log import METRICS_FILE, read_metrics_log

    path = run_dir / METRICS_FILE
    records = [r for r in read_metrics_log(path) if r["kind"] == "metrics"] if path.is_file() else []
    if not records:
        return []
    start, by_step = records[0]["time"], {}
    for r in records:
        point = by_step.setdefault(r["step"], {"step": r["step"]})
        point["minutes"] = (r["time"] - start) / 60
        for key, name in (("val/bleu", "bleu"), ("time/train_minutes", "train_minutes")):
            if key in r["metrics"]:
                point[name] = r["metrics"][key]
    return [p for _, p in sorted(by_step.items()) if "bleu" in p]


def bleu_by_length(result: dict[str, Any], buckets: list[int], lang: str) -> list[dict[str, Any]]:
    """Corpus BLEU per bucket of source length (whitespace words) with its 95% interval:
    [{bucket, n, bleu, chrf, bleu_ci}]."""
    out, low = [], 1
    for high in buckets:
        idx = [i for i, s in enumerate(result["sources"]) if low <= len(s.split()) <= high]
        if idx:
            predictions = [result["predictions"][i] for i in idx]
            references = [result["references"][i] for i in idx]
            metrics = compute_metrics("bleu_chrf", predictions, references, lang=lang)
            ci = confidence_intervals("bleu_chrf", predictions, references, lang=lang)["intervals"]
            label = f"{low}-{high}" if high < 1000 else f"{low}+"
            out.append({"bucket": label, "n": len(idx), "bleu": metrics["bleu"], "chrf": metrics["chrf"],
                        "bleu_ci": ci["bleu"]})
        low = high + 1
    return out


def paired_comparisons(results: list[dict[str, Any]], lang: str) -> list[dict[str, Any]]:
    """Every pair of models on the same test sentences: BLEU and chrF differences, paired AR p-values."""
    rows = []
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            tests = paired_test("bleu_chrf", a["predictions"], b["predictions"], a["references"], lang=lang)
            rows.append({"baseline": a["name"], "system": b["name"],
                         **{f"{k}_{f}": tests[k][f] for k in ("bleu", "chrf") for f in ("delta", "p_value", "significant")},
                         "test": tests["bleu"]["test"]})
    return rows


def plot_bleu_by_length(table: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for k, (name, rows) in enumerate(table.items()):
        x = [j + 0.06 * (k - (len(table) - 1) / 2) for j in range(len(rows))]  # side by side, not on top
        y = [r["bleu"] for r in rows]
        # max(0, .): a percentile interval of a few sentences can miss the corpus score itself
        err = [[max(0.0, r["bleu"] - r["bleu_ci"][0]) for r in rows], [max(0.0, r["bleu_ci"][1] - r["bleu"]) for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(next(iter(table.values())))), [f"{r['bucket']}\n(n={r['n']})"
                                                            for r in next(iter(table.values()))])
    ax.set_xlabel("source sentence length (words); bars: 95% bootstrap intervals")
    ax.set_ylabel("BLEU")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_learning_curves(results: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Validation BLEU of every model against training minutes (left; wall minutes without a
    budget) and against optimizer steps (right), one line per model."""
    if not any(r["curve"] for r in results):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    timed = all("train_minutes" in p for r in results for p in r["curve"])
    for r in results:
        if r["curve"]:
            minutes = [p["train_minutes"] if timed else p["minutes"] for p in r["curve"]]
            by_time.plot(minutes, [p["bleu"] for p in r["curve"]], marker="o", label=r["name"])
            by_step.plot([p["step"] for p in r["curve"]], [p["bleu"] for p in r["curve"]], marker="o", label=r["name"])
    by_time.set_xlabel("training minutes (validation excluded)" if timed else "wall minutes since start")
    by_step.set_xlabel("optimizer steps")
    by_time.set_ylabel("validation BLEU (200 sentences, greedy)")
    for ax in (by_time, by_step):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _budget_line(cfg: CompareConfig) -> str:
    batch = f"{cfg.batch_tokens} tokens" if cfg.batch_tokens else f"{cfg.batch_size} sentences"
    shared = f"{batch} per step, LR {cfg.lr:g}, warmup {cfg.warmup_steps}"
    own = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in opts.items())
                    for name, opts in cfg.model_options.items())
    budget = (f"{cfg.budget_minutes:g} minutes of training time per model (validation excluded; each model's "
              f"steps and cosine schedule fitted to it)" if cfg.budget_minutes is not None
              else f"{cfg.max_steps} optimizer steps per model")
    return f"Budget: {budget}. Recipe: {shared}" + (f" ({own})" if own else "") + "."


def render_markdown(cfg: CompareConfig, results: list[dict[str, Any]], by_length: dict[str, list[dict]],
                    paired: list[dict[str, Any]], wall_seconds: float) -> str:
    first = results[0]
    lines = [f"# RNN baselines vs transformer on `{cfg.task}`", "",
             _budget_line(cfg) + f" The same shared "
             f"BPE ({cfg.tokenizer_vocab_size}) and data order; best checkpoint by validation BLEU; test: "
             f"{first['n']} of {first['n_total']} sentences, "
             f"{'greedy' if cfg.num_beams == 1 else f'beam {cfg.num_beams}'}. "
             f"Total wall time {wall_seconds / 60:.1f} min. Scores with 95% bootstrap intervals.", "",
             "| model | parameters | steps | training min | fit wall min | BLEU [95% CI] | chrF [95% CI] | exact match (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        train = f"{r['train_minutes']:.1f}" if r.get("train_minutes") is not None else "–"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['steps']} | {train} | {r['train_seconds'] / 60:.1f} | "
                     f"{format_interval(r['bleu'], r['ci95'].get('bleu'))} | "
                     f"{format_interval(r['chrf'], r['ci95'].get('chrf'))} | {r['exact_match']:.1f} |")
    buckets = [row["bucket"] for row in next(iter(by_length.values()))]
    lines += ["", "BLEU by source length (words), [95% CI]:", "",
              "| model | " + " | ".join(f"{b} (n={row['n']})" for b, row in
                                       zip(buckets, next(iter(by_length.values())))) + " |",
              "|---|" + "---|" * len(buckets)]
    for name, rows in by_length.items():
        lines.append(f"| {name} | " + " | ".join(format_interval(row["bleu"], row["bleu_ci"]) for row in rows) + " |")
    lines += ["", "Paired tests on the same test sentences (significant: p < 0.05):", "",
              "| baseline | system | BLEU difference | p | chrF difference | p | significant (BLEU / chrF) |",
              "|---|---|---|---|---|---|---|"]
    for p in paired:
        lines.append(f"| {p['baseline']} | {p['system']} | {p['bleu_delta']:+.2f} | {p['bleu_p_value']:.4f} | "
                     f"{p['chrf_delta']:+.2f} | {p['chrf_p_value']:.4f} | "
                     f"{'yes' if p['bleu_significant'] else 'no'} / {'yes' if p['chrf_significant'] else 'no'} |")
    if paired:
        lines += ["", f"Test: `{paired[0]['test']}`."]
    return "\n".join(lines) + "\n"


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run the comparison; returns the results (also written to ``cfg.out_dir``)."""
    from finetune.tasks import load_task

    if not cfg.models:
        raise ValueError("compare: `models` is empty")
    task = load_task(cfg.task)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, results, tokenizer = time.time(), [], None
    for name, arch in cfg.models.items():
        result = train_and_score(cfg, name, arch, tokenizer)
        tokenizer = tokenizer or result["tokenizer"]  # the first model's BPE is shared by the others
        results.append(result)
    lang = task.target_lang or "en"
    by_length = {r["name"]: bleu_by_length(r, cfg.length_buckets, lang) for r in results}
    paired = paired_comparisons(results, lang)
    wall = time.time() - started
    (out / "comparison.md").write_text(render_markdown(cfg, results, by_length, paired, wall), encoding="utf-8")
    plot_bleu_by_length(by_length, out / "bleu_by_length.png", f"{task.name}: BLEU by source length")
    plot_learning_curves(results, out / "learning_curves.png", f"{task.name}: validation BLEU while training")
    summary = [{k: v for k, v in r.items() if k not in ("predictions", "references", "sources")} for r in results]
    (out / "comparison.json").write_text(json.dumps({"models": summary, "by_length": by_length, "paired": paired,
                                                     "wall_seconds": wall}, indent=2) + "\n")
    _plot_best_attention(results, task, out / "attention")
    _log_wandb(out, summary, by_length)
    print((out / "comparison.md").read_text())
    return {"models": summary, "by_length": by_length, "paired": paired, "wall_seconds": wall}


def showcase_sentences(sources: list[str], n: int = 3, max_words: int = 20) -> list[int]:
    """Indices of the ``n`` longest test sources of at most ``max_words`` words (ties: first
    first): long enough to show reordering (Bahdanau et al. 2014, Fig. 3), short enough to read."""
    lengths = [len(s.split()) for s in sources]
    fitting = [i for i in range(len(sources)) if lengths[i] <= max_words]
    return sorted(sorted(fitting, key=lambda i: -lengths[i])[:n])


def _plot_best_attention(results: list[dict[str, Any]], task: Any, out: Path, n: int = 3) -> None:
    """Alignments of the best model that has attention, for the showcase test sentences."""
    from finetune.attention_plots import plot_examples
    from finetune.pretrained import load_pretrained

    for result in sorted(results, key=lambda r: -r["bleu"]):
        loaded = load_pretrained(result["checkpoint"])
        try:
            raw = [result["sources"][i] for i in showcase_sentences(result["sources"], n)]
            sources = [task.template(loaded.kind).render_prompt({"source": s}) for s in raw]
            plot_examples(loaded.model, loaded.tokenizer, sources, out, prefix=result["name"], raw_sources=raw)
            return
        except ValueError:  # no attention weights (RNN without attention): try the next best
            continue


def _log_wandb(out: Path, summary: list[dict[str, Any]], by_length: dict[str, list[dict]]) -> None:
    """One W&B run with the comparison table and the plot (offline unless logged in)."""
    from common.wandb_logger import AutoWandbLogger

    logger = AutoWandbLogger(project="lmtrain-compare", save_dir=str(out), name=out.name)
    columns = ["name", "params", "steps", "train_seconds", "bleu", "chrf", "exact_match"]
    logger.log_table(key="comparison", columns=columns, data=[[r[c] for c in columns] for r in summary])
    for image in ("bleu_by_length", "learning_curves"):
        if (out / f"{image}.png").is_file():
            logger.log_image(key=image, images=[str(out / f"{image}.png")])
    logger.experiment.finish()


def main(args: list[str] | None = None) -> dict[str, Any]:
    from jsonargparse import ArgumentParser, ActionConfigFile

    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(CompareConfig, nested_key=None)
    parsed = parser.instantiate_classes(parser.parse_args(args))  # the model archs become dataclasses
    cfg = CompareConfig(**{k: v for k, v in vars(parsed).items() if k != "config"})
    return compare(cfg)
