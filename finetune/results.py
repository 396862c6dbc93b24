"""Evaluation outputs a person and a script can read: results JSON, a markdown table, the
predictions (JSON lines, with prompt and references) and a W&B table of prompt/prediction/reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.significance import format_interval


def results_markdown(results: dict[str, Any]) -> str:
    """One-row markdown table: model, task, shots, each score with its 95% interval, n of N, prompt
    statistics; then the metric signatures, the context used and the overlap report."""
    scores = {k: v for k, v in results["metrics"].items() if isinstance(v, float)}
    intervals = results.get("ci95", {})
    head = ["model", "task", "split", "shots (used)", *(f"{k} [95% CI]" for k in scores), "n of N", "truncated",
            "empty"]
    row = [results["model"], results["task"], results["split"],
           f"{results['shots_requested']} ({results['shots_used_mean']:.2f})",
           *(format_interval(v, intervals.get(k)) for k, v in scores.items()),
           f"{results['n_prompts']} of {results.get('n_total', results['n_prompts'])}", str(results["n_truncated"]),
           str(results["metrics"]["n_empty_predictions"])]
    notes = [f"{k}: `{v}`" for k, v in results["metrics"].items() if k.endswith(("signature", "tokenizer"))]
    notes += [f"intervals: `{m}`" for m in dict.fromkeys(results.get("ci_method", {}).values())]
    if results.get("shots_note"):
        notes.append(f"shots: {results['shots_note']}")
    if "usable_context" in results:
        notes.append(f"context: prompts of at most {results['max_prompt_tokens']} tokens within max_length "
                     f"{results['max_length']} (usable context {results['usable_context']}: "
                     f"{results['context_source']})")
    for role, report in results.get("overlap", {}).items():
        if report["n"] is None:
            notes.append(f"overlap with the {role} split `{report['split']}`: not checked ({report['not_checked']})")
            continue
        notes.append(f"overlap with the {role} split `{report['split']}`: {report['n']} of {report['of']} items "
                     "have a normalised duplicate there" + (f" (e.g. {report['pairs'][0][0]} ~ "
                                                             f"{report['pairs'][0][1]})" if report["pairs"] else ""))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def write_results(results: dict[str, Any], items: list[dict[str, Any]], out_dir: str | Path) -> Path:
    """Write results.json, results.md and predictions.jsonl into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = results["predictions"]
    summary = {k: v for k, v in results.items() if k != "predictions"}
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(results_markdown(results), encoding="utf-8")
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for item, prediction in zip(items, predictions):
            f.write(json.dumps({"id": item["id"], "prompt": item["text"], "prediction": prediction,
                                "references": item["references"], "n_shots": item["n_shots"],
                                "truncated": item["truncated"]}, ensure_ascii=False) + "\n")
    return out


def log_wandb_table(loggers: list, results: dict[str, Any], items: list[dict[str, Any]], key: str,
                    max_rows: int = 200) -> None:
    """Prompt / prediction / reference rows to every W&B logger (first ``max_rows``)."""
    from lightning.pytorch.loggers import WandbLogger

    rows = [[it["id"], it["text"], p, " ||| ".join(it["references"])]
            for it, p in list(zip(items, results["predictions"]))[:max_rows]]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=["id", "prompt", "prediction", "references"], data=rows)
