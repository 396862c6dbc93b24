"""`python -m finetune harness`: lm-evaluation-harness tasks on any model ``--model.init`` accepts.

    lmtrain finetune harness --model.init runs/gpt-tiny --tasks tatoeba_en_fr_mc,multi30k_en_bpb --limit 200

In process: the model `finetune.pretrained.load_pretrained` builds (our pretraining or fine-tuning
checkpoint, a run directory, a Hugging Face or LoRA adapter directory, a hub name) is handed to
lm-eval's ``HFLM`` as an instance, with its tokenizer, as a causal or seq2seq backend (no export
step); the context is the model's usable one (the trained length for our checkpoints). Tasks and
the shared machinery: `common.lm_harness` (``--tasks``: our YAMLs in configs/harness/ by name, any
YAML path, or lm-eval's own tasks by name where the hub is reachable).

Each task's outputs go where ``finetune evaluate`` puts its own, ``<run_dir>/eval/harness-<task>-<k>shot/``:
``results.json`` (scores, stderrs, n of N, context, lm-eval version and the task's resolved config),
``results.md``, ``samples.jsonl`` (every scored item: document, arguments, responses, per-item
metrics), ``config.yaml`` (this command), plus the scores and a samples table in a W&B run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.lm_harness import resolve_tasks, run_harness, task_scores, wrap_model
from common.model_context import usable_context


def build_parser() -> Any:
    """The command's options (jsonargparse, as the other lmtrain commands)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lmtrain finetune harness", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_argument("--model.init", type=str, required=True,
                        help="our checkpoint (.ckpt, ZeRO dir, run dir), a Hugging Face or adapter directory, or a hub name")
    parser.add_argument("--tasks", type=str, required=True,
                        help="comma-separated task names (configs/harness/ or lm-eval's) or YAML paths")
    parser.add_argument("--num_fewshot", type=int | None, default=None,
                        help="demonstrations per item (default: each task's own, 0 for ours)")
    parser.add_argument("--limit", type=int | float | None, default=None,
                        help="items per task: the first N (a fraction below 1: that share); default all")
    parser.add_argument("--batch_size", type=int, default=16, help="requests per forward pass")
    parser.add_argument("--max_length", type=int | None, default=None,
                        help="context in tokens (default: the model's usable context, the trained length)")
    parser.add_argument("--include_path", type=list[str], default=[],
                        help="extra folders of task YAMLs, as lm-eval's --include_path")
    parser.add_argument("--bootstrap_iters", type=int, default=1000,
                        help="bootstrap resamples for the stderr of non-mean metrics (0: none)")
    parser.add_argument("--device", type=str | None, default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--run_dir", type=str, default="runs/finetune",
                        help="results go to <run_dir>/eval/harness-<task>-<k>shot/ (as finetune evaluate's)")
    parser.add_argument("--wandb", type=str, default="auto",
                        help="W&B mode: auto (online iff a key is configured), online, offline or disabled")
    return parser


def main(args: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the command; returns each task's results.json content."""
    import torch

    from finetune.pretrained import load_pretrained

    parser = build_parser()
    cfg = parser.parse_args(args)
    if cfg.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit <= 0:
        raise ValueError(f"--limit must be > 0 (a count, or a fraction below 1), got {cfg.limit}")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {cfg.num_fewshot}")
    if cfg.wandb not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"--wandb must be auto, online, offline or disabled, got {cfg.wandb!r}")
    init = cfg.model.init
    # Names, files and hub access are checked before the model loads: a typo costs no load.
    selection = resolve_tasks(cfg.tasks.split(","), cfg.include_path)
    loaded_model = load_pretrained(init)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded_model.model.to(device).eval()
    context = usable_context(model.config, loaded_model.tokenizer)
    max_length = cfg.max_length or context[0]
    lm = wrap_model(model, loaded_model.tokenizer, loaded_model.kind, batch_size=cfg.batch_size, max_length=max_length)
    tasks = selection.load()
    start = time.perf_counter()
    results = run_harness(lm, tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                          bootstrap_iters=cfg.bootstrap_iters, log_samples=True)
    seconds = time.perf_counter() - start
    from importlib.metadata import version

    common = {"model": init, "kind": loaded_model.kind, "harness": f"lm-eval {version('lm_eval')}",
              "max_length": max_length, "context_source": context[1] if max_length == context[0] else "--max_length",
              "batch_size": cfg.batch_size, "limit": cfg.limit, "seconds": round(seconds, 2)}
    written = {name: write_task_outputs(name, results, common, Path(cfg.run_dir), parser.dump(cfg))
               for name in task_scores(results)}
    log_wandb(cfg.wandb, Path(cfg.run_dir), init, written, results.get("samples", {}))
    for name, summary in written.items():
        out = Path(summary["out_dir"])
        print((out / "results.md").read_text(encoding="utf-8") + f"\nwritten to {out}")
    return written


def write_task_outputs(task: str, results: dict[str, Any], common: dict[str, Any], run_dir: Path,
                       config_yaml: str) -> dict[str, Any]:
    """results.json, results.md, samples.jsonl and config.yaml of ``task`` in its eval folder."""
    scores = task_scores(results)[task]
    shots = results.get("n-shot", {}).get(task, 0)
    counts = results.get("n-samples", {}).get(task, {})
    out = run_dir / "eval" / f"harness-{task}-{shots}shot"
    out.mkdir(parents=True, exist_ok=True)
    summary = {**common, "task": task, "num_fewshot": shots,
               "n_items": counts.get("effective"), "n_total": counts.get("original"),
               "metrics": {k: v for k, v in scores.items() if not k.endswith("_stderr")},
               "stderr": {k[: -len("_stderr")]: v for k, v in scores.items() if k.endswith("_stderr")},
               "higher_is_better": results.get("higher_is_better", {}).get(task, {}),
               "task_version": results.get("versions", {}).get(task),
               "task_config": _json_safe(results.get("configs", {}).get(task, {})),
               "out_dir": str(out)}
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(results_markdown(summary), encoding="utf-8")
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for sample in results.get("samples", {}).get(task, []):
            f.write(json.dumps(_json_safe(sample), ensure_ascii=False) + "\n")
    (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    return summary


def results_markdown(summary: dict[str, Any]) -> str:
    """One-row table (model, task, shots, each metric +- its stderr, n of N), then the notes."""
    metrics, stderr = summary["metrics"], summary["stderr"]
    head = ["model", "task", "shots", *metrics, "n of N"]
    row = [summary["model"], summary["task"], str(summary["num_fewshot"]),
           *(f"{v:.4f}" + (f" ± {stderr[k]:.4f}" if k in stderr else "") for k, v in metrics.items()),
           f"{summary['n_items']} of {summary['n_total']}"]
    notes = [f"harness: {summary['harness']} (in process, {summary['kind']} model, batch {summary['batch_size']}; "
             f"the command's tasks took {summary['seconds']} s together)",
             f"context: {summary['max_length']} tokens ({summary['context_source']})",
             "± is lm-eval's standard error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", ""]
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


def log_wandb(mode: str, run_dir: Path, init: str, written: dict[str, dict[str, Any]],
              samples: dict[str, list[dict[str, Any]]], max_rows: int = 200) -> None:
    """Scores (``harness/<task>/<metric>``) and a samples table per task, in one W&B run saved in
    ``run_dir`` (offline unless a key is configured: common.wandb_logger.AutoWandbLogger)."""
    if mode == "disabled":
        return
    from common.wandb_logger import AutoWandbLogger

    logger = AutoWandbLogger(save_dir=str(run_dir), mode=mode, name=f"harness {Path(init).name or init}",
                             tags=["harness"])
    try:
        logger.log_hyperparams({"model": init, "tasks": sorted(written)})
        logger.log_metrics({f"harness/{task}/{k}": v for task, s in written.items() for k, v in s["metrics"].items()},
                           step=0)
        for task, rows in samples.items():
            metric_names = list(written[task]["metrics"]) if task in written else []
            data = [[r.get("doc_id"), _first_text(r.get("arguments")), str(r.get("target")),
                     json.dumps(_json_safe(r.get("filtered_resps")))[:500],
                     *(r.get(m) if isinstance(r.get(m), (int, float)) else None for m in metric_names)]
                    for r in rows[:max_rows]]
            logger.log_table(key=f"harness/{task}", columns=["doc_id", "input", "target", "response", *metric_names],
                             data=data, step=0)
    finally:
        if logger._experiment is not None:
            logger.experiment.finish()


def _first_text(arguments: Any) -> str:
    """The prompt of a logged sample: lm-eval's arguments are (context, continuation) pairs,
    (text,) for rolling log-likelihood, or (context, generation kwargs)."""
    while isinstance(arguments, (list, tuple, dict)) and arguments:
        arguments = next(iter(arguments.values())) if isinstance(arguments, dict) else arguments[0]
    return str(arguments)


def _json_safe(value: Any) -> Any:
    """Plain JSON values (numpy scalars to numbers, callables and other objects to their repr)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else repr(o)))
