"""`finetune evaluate` generation against a plain batched `model.generate` loop, on the same prompts.

Both sides: the same exported model, the prompts evaluate built (its prompts-<split>.jsonl), batch
size, greedy decoding, ``max_new_tokens`` and stop strings (``stop_strings=`` + tokenizer), then
``batch_decode``. Per round the two run back to back, the order alternating. The evaluate side is
timed inside Lightning's test loop (every ``test_step``: generate, decode, cut at the stop string)
and for the whole test epoch (adds scoring with bootstrap intervals at the end); set-up (task
loading, prompt building) is outside both.

    .venv/bin/python benchmarks/eval_generation.py --model runs/gpt-tiny/hf   # after the main job
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


class Clock(pl.Callback):
    """Test-epoch wall time and the summed time of its test steps."""

    def __init__(self) -> None:
        self.epoch = self.steps = 0.0
        self._t0 = self._b0 = 0.0

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.epoch = time.perf_counter() - self._t0

    def on_test_batch_start(self, *args) -> None:
        self._b0 = time.perf_counter()

    def on_test_batch_end(self, *args) -> None:
        self.steps += time.perf_counter() - self._b0


def run_evaluate(args: argparse.Namespace, out: Path) -> tuple[Clock, list[str], list[str]]:
    """One `finetune evaluate` in this process, timed by ``Clock``; its prompts and stop strings."""
    from finetune.cli import FinetuneCLI, FinetuneDataModule, FinetuneSystem, FinetuneTrainer

    clock = Clock()
    cli = FinetuneCLI(FinetuneSystem, FinetuneDataModule, trainer_class=FinetuneTrainer, seed_everything_default=1234,
                      auto_configure_optimizers=False, load_from_checkpoint_support=False,
                      trainer_defaults={"callbacks": [clock]},
                      args=["evaluate", "--model.init", args.model, "--data.task", args.task, "--data.shots", "0",
                            "--data.eval_batch_size", str(args.batch_size),
                            "--model.max_new_tokens", str(args.max_new_tokens),
                            "--trainer.default_root_dir", str(out), "--trainer.logger", "false",
                            "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"])
    task, split = cli.results["task"], cli.results["split"]
    prompts = [json.loads(line)["text"] for line in
               (out / "eval" / f"{task}-{split}-0shot" / f"prompts-{split}.jsonl").read_text().splitlines()]
    return clock, prompts, list(cli.datamodule.template.stop)


@torch.no_grad()
def run_plain(args: argparse.Namespace, prompts: list[str], stop: list[str]) -> float:
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        enc = tok(prompts[i:i + args.batch_size], return_tensors="pt", padding=True)
        out = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, stop_strings=stop, tokenizer=tok)
        tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/gpt-tiny/hf", help="an exported decoder-only model directory")
    ap.add_argument("--task", default="tatoeba_en_fr")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_generation.md"))
    args = ap.parse_args()
    if not Path(args.model).is_dir():
        ap.error(f"--model {args.model}: no such directory (run scripts/main_job.py first, or pass an export)")
    with tempfile.TemporaryDirectory() as work:
        rows, prompts, stop = _rounds(args, Path(work))
    _report(args, rows, stop)


def _rounds(args: argparse.Namespace, work: Path) -> tuple[list[dict], list[str], list[str]]:
    _, prompts, stop = run_evaluate(args, work)  # warm-up, and the prompts both sides use
    rows = []
    for r in range(args.rounds):
        row = {"round": r, "n": len(prompts)}
        for side in ("evaluate", "plain") if r % 2 == 0 else ("plain", "evaluate"):
            if side == "evaluate":
                clock, _, _ = run_evaluate(args, work)
                row |= {"evaluate_steps_s": clock.steps, "evaluate_epoch_s": clock.epoch}
            else:
                row["plain_s"] = run_plain(args, prompts, stop)
        rows.append(row)
        print(row, flush=True)
    return rows, prompts, stop


def _report(args: argparse.Namespace, rows: list[dict], stop: list[str]) -> None:
    steps = statistics.median(r["plain_s"] / r["evaluate_steps_s"] for r in rows)
    epoch = statistics.median(r["plain_s"] / r["evaluate_epoch_s"] for r in rows)
    lines = [f"# evaluate generation vs a plain generate loop ({dt.date.today()})", "",
             f"`{' '.join(['python', *sys.argv])}`; model {args.model}, task {args.task}, {rows[0]['n']} prompts, "
             f"batch {args.batch_size}, {args.max_new_tokens} new tokens, stop {stop!r}; torch {torch.__version__}, "
             f"{os.cpu_count()} CPUs.", "",
             "| round | plain generate s | evaluate test steps s | evaluate test epoch s (with scoring) |", "|---|---|---|---|",
             *[f"| {r['round']} | {r['plain_s']:.2f} | {r['evaluate_steps_s']:.2f} | {r['evaluate_epoch_s']:.2f} |" for r in rows],
             "", f"Speed of evaluate relative to plain (median of rounds): test steps **{steps:.2f}x**, "
             f"whole test epoch **{epoch:.2f}x** (goal ≥ 0.9x).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
