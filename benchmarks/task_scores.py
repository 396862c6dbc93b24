"""Task scores of our tiny pretrained GPT and T5: zero-shot, 1-shot, 5-shot and fine-tuned.

    .venv/bin/python benchmarks/task_scores.py            # ~20 min reusing runs/, ~30 min pretraining too
    .venv/bin/python benchmarks/task_scores.py --quick    # smoke run (runs/quick/, not written to results/)

Runs the suite of the main job (finetune/suite.py: tatoeba_en_fr BLEU/chrF, dialogsum ROUGE, squad
EM/F1) on runs/gpt-tiny and runs/t5-tiny. A run directory is reused when its last checkpoint has
the preset's full step count (what `scripts/main_job.py` leaves); otherwise it is pretrained first
with `scripts/main_job.py --families <family> --no-suite`. Writes benchmarks/results/task_scores.md
(command, date, machine, other jobs, settings, tables, wall times) and a .json twin with every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.step_report import git, machine  # noqa: E402
from common.checkpoints import CHECKPOINT_KEY  # noqa: E402
from common.model_context import TRAINED_CONTEXT_KEY  # noqa: E402
from finetune.suite import (QUICK, Model, Settings, headline_table, markdown_table, paired_table,  # noqa: E402
                            rows_as_dicts, run_suite)

FAMILIES = {"gpt2": "gpt-tiny", "t5": "t5-tiny"}
MODEL_ARGS: dict[str, tuple[str, ...]] = {"gpt2": (), "t5": ()}  # as scripts/main_job.py: the trained context
ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "WANDB_MODE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def run_state(run_dir: Path, preset: Path) -> dict:
    """Steps and trained context of the run's last checkpoint vs the preset's (complete = both equal)."""
    config = yaml.safe_load(preset.read_text())
    want, block = config["trainer"]["max_steps"], config["data"]["block_size"]
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True) if last.is_file() else {}
    steps = ckpt.get("global_step", 0)
    context = ckpt.get(CHECKPOINT_KEY, {}).get("hf_config", {}).get(TRAINED_CONTEXT_KEY)
    if last.is_file() and context != block:
        raise SystemExit(f"{run_dir} was pretrained at context {context}, the preset now trains {block}: "
                         "delete it (or pass --runs-dir) to pretrain afresh")
    return {"run_dir": str(run_dir), "steps": steps, "preset_steps": want, "complete": steps == want,
            "checkpoint_time": (datetime.datetime.fromtimestamp(last.stat().st_mtime).isoformat(timespec="seconds")
                                if last.is_file() else None)}


def other_jobs() -> list[str]:
    """Heavy jobs of colleagues on the shared cores (recorded with the wall times)."""
    out = subprocess.run(["pgrep", "-fa", "pytest|pretrain|finetune|main_job"], capture_output=True, text=True).stdout
    mine = {str(os.getpid()), str(os.getppid())}
    return [ln[:110] for ln in out.splitlines() if ln.split()[0] not in mine and "task_scores.py" not in ln]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="QUICK suite settings on runs/quick/ (smoke run)")
    parser.add_argument("--runs-dir", default=None, help="pretrained runs (default runs/, or runs/quick/)")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/task_scores.md; "
                        "with --quick runs/quick/task_scores.md)")
    parser.add_argument("--note", action="append", default=[], help="a line for the results file's notes")
    args = parser.parse_args()
    os.chdir(REPO)
    runs = Path(args.runs_dir or ("runs/quick" if args.quick else "runs"))
    out = Path(args.out or (runs / "task_scores.md" if args.quick else "benchmarks/results/task_scores.md"))
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO)), *sys.argv[1:]])
    started, busy_start = time.time(), other_jobs()

    states, pretrain_s = {}, {}
    for family, name in FAMILIES.items():
        preset = REPO / "configs" / "pretrain" / f"{name}.yaml"
        state = run_state(runs / name, preset)
        if not state["complete"] and not args.quick:
            print(f"=== pretraining {name}: {state['run_dir']} has {state['steps']} of {state['preset_steps']} steps",
                  flush=True)
            t = time.time()
            subprocess.run([sys.executable, "scripts/main_job.py", "--families", family, "--no-suite",
                            "--runs-dir", str(runs)], check=True)
            pretrain_s[name] = time.time() - t
            state = run_state(runs / name, preset)
        state["reused"] = name not in pretrain_s
        states[name] = state

    settings = QUICK if args.quick else Settings()
    models = [Model(name, str(runs / name), MODEL_ARGS[family]) for family, name in FAMILIES.items()]
    t = time.time()
    rows = run_suite(models, runs / "task_scores", settings)
    report = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine(ENV_KEYS), "finetune_dirty": bool(git("status", "--porcelain", "finetune")),
              "busy_start": busy_start, "busy_end": other_jobs(), "load_start": os.getloadavg()[0],
              "runs": states, "pretrain_s": pretrain_s, "settings": asdict(settings), "suite_s": time.time() - t,
              "wall_s": time.time() - started, "rows": rows_as_dicts(rows), "notes": args.note}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report, headline_table(rows), markdown_table(rows), paired_table(rows)), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    print(headline_table(rows) + f"\nwritten to {out} ({report['wall_s'] / 60:.1f} min)")


def render(report: dict, headline: str, detail: str, paired: str) -> str:
    m, s = report["machine"], report["settings"]
    runs = "; ".join(f"{name}: {r['run_dir']}, {r['steps']} steps, "
                     + (f"reused (checkpoint of {r['checkpoint_time']})" if r["reused"]
                        else f"pretrained by this command in {report['pretrain_s'][name] / 60:.1f} min")
                     for name, r in report["runs"].items())
    return "\n".join([
        "# Task scores: tiny pretrained GPT and T5, zero-/few-shot vs fine-tuned", "",
        f"Generated by `benchmarks/task_scores.py` on {report['date']}; see benchmarks/README.md.", "",
        "```", report["command"], "```", "",
        f"- Machine: {m['cpu']}, {m['cpus']} CPUs (torch threads {m['torch_threads']}), ISA {', '.join(m['isa'])}",
        f"- Python {m['python']}, torch {m['torch']}, lightning {m['lightning']}, transformers {m['transformers']}; "
        f"code at {m['git']}" + (" + uncommitted changes in finetune/" if report["finetune_dirty"] else ""),
        "- Env: " + ", ".join(f"{k}={v}" for k, v in m["env"].items()),
        f"- Pretrained models: {runs}",
        f"- Other jobs at start: {report['busy_start'] or 'none'}; at end: {report['busy_end'] or 'none'}; "
        f"load average at start {report['load_start']:.2f}",
        f"- Wall time {report['wall_s'] / 60:.1f} min, of which the suite {report['suite_s'] / 60:.1f} min", "",
        "## Settings", "",
        "- Scores on the task's `test` split: " + ("every item" if s["eval_examples"] is None else
                                                     f"the same {s['eval_examples']} seeded items (seed {s['seed']})")
        + " for every setting (the tables give n of N); greedy decoding, at most 32 (tatoeba_en_fr), 48 "
        "(dialogsum), 16 (squad) new tokens.",
        f"- k-shot: {', '.join(map(str, s['shots']))} demonstrations drawn per item from the task's pool "
        "(tatoeba/dialogsum: train; squad test: part-00), never one equal to the item after normalisation; "
        "whole demonstrations dropped when they do not fit the context (\"shots used\"). Context: the length "
        "each model was pretrained on (gpt-tiny 256 positions, t5-tiny 256-token inputs), prompt + answer "
        "inside it; a prompt that does not fit even alone has its long field (dialogue, context) cut at a word "
        "boundary (\"truncated\").",
        f"- Fine-tuned: {s['finetune_steps']} AdamW steps of batch {s['batch_size']} (lr {s['lr']}, "
        f"{s['warmup_steps']} warmup, cosine), validated by generation on {s['val_examples']} `validation` items "
        f"every {s['val_every']} steps; the best checkpoint by the primary metric is scored 0-shot. SQuAD has only "
        "its dev set here: fine-tuning uses part-00 (`validation`, also the checkpoint choice: held-in "
        "questions) and scores part-01 (`test`, other articles); training prompts keep the window around "
        "the gold answer.",
        "- Uncertainty: each score with its 95% interval (BLEU/chrF: sacreBLEU's bootstrap of the items; "
        "ROUGE/SQuAD: bootstrap over items; 1,000 resamples, seeded). `*`: the setting differs from 0-shot "
        "on the same items, paired test p < 0.05 (BLEU/chrF: paired approximate randomisation, 10,000 "
        "trials; ROUGE/SQuAD: paired bootstrap); every test is listed below.",
        "- Scores ×100 (BLEU/chrF: sacrebleu; ROUGE: rouge-score F1, max over DialogSum's 3 references; "
        "SQuAD: official v1.1 EM/F1). Wall s: that evaluation, or fine-tuning + evaluation.", "",
        "## Scores", "", headline, "## Paired tests against 0-shot", "", paired, "## Every run", "", detail,
        "Truncated: prompts whose source/context was cut to fit the context. Empty: empty predictions "
        "(the model's first token ended the answer).", "", "## Notes", "",
        *(["- The pretrained runs were reused (see above): the wall time excludes pretraining."]
          if any(r["reused"] for r in report["runs"].values()) else []),
        "- Every cell is seeded (`--seed_everything`, `--data.seed`, the resampling seeds).",
        *(f"- {n}" for n in report.get("notes", [])), ""])


if __name__ == "__main__":
    main()
