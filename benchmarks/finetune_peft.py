"""Full fine-tuning vs LoRA vs LoRA + packed batches: speed, memory, and scores at equal steps.

**Speed and memory** (``--part speed``): the real `finetune fit` of a GPT-2-small-shaped (124M) and
a t5-small-shaped (6+6 layers, d 512) model on DialogSum training dialogues, one variant per fresh
process, the order rotating each round. Per variant: tokens/s counting *real* tokens only (prompt +
completion, or encoder input + labels; padding excluded, since removing padding is what packing is
for), the median step time after warm-up, the peak resident memory of the process (``ru_maxrss``)
and the trainable parameters. Both models have random weights saved as an HF directory (no
released weights are shipped; speed and memory do not depend on the values) and GPT-2's BPE.
Encoder-decoders cannot be packed (`finetune.packing`): the t5 row shows LoRA with token-based
batches, the padding-light batching they can have.

**Scores at equal steps** (``--part scores``): our pretrained gpt-tiny and t5-tiny (``runs/``, from
README command 1) fine-tuned on Tatoeba en->fr for the same number of steps, full vs LoRA (at
the full run's LR and at 3x) vs LoRA + packing (gpt-tiny), each scored on the whole test split with
95% intervals and a paired test against full fine-tuning.

    .venv/bin/python benchmarks/finetune_peft.py --part speed --rounds 2
    .venv/bin/python benchmarks/finetune_peft.py --part scores --steps 600
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch.callbacks import Callback  # noqa: E402

from step_report import busy_processes, machine  # noqa: E402 - beside this script

OUT = ROOT / "benchmarks" / "results"
LORA = "{method: lora, r: 16, alpha: 32, dropout: 0.05, target_modules: auto}"
GPT2_TOKENIZER = "tokenizers/gpt2"  # under the data root (shared/data)

# variant -> finetune fit arguments, per model kind. Packing: batch_size counts rows of max_length.
SPEED_VARIANTS = {
    "gpt2-small": {"full": ["--data.batch_size", "4"], "lora": ["--data.batch_size", "4", "--model.peft", LORA],
                   "lora+packing": ["--data.batch_size", "2", "--data.packing", "true", "--model.peft", LORA]},
    "t5-small": {"full": ["--data.batch_size", "4"], "lora": ["--data.batch_size", "4", "--model.peft", LORA],
                 "lora+token-batches": ["--data.batch_tokens", "2048", "--model.peft", LORA]},
}


PART_ARGS = {"speed": ("models", "rounds", "warmup", "steps"),
             "scores": ("steps", "task", "lr", "batch_size", "packed_rows")}


class StepClock(Callback):
    """The wall time at the end of every training step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.ends.append(time.perf_counter())


def _real_tokens(rows: object) -> int:
    """Token ids in a collated batch's rows (nested for packed rows), padding excluded."""
    if isinstance(rows, list):
        return sum(_real_tokens(r) for r in rows)
    return sum(len(v) for v in rows.values())  # {prompt_ids, completion_ids} or {input_ids, labels}


def save_model(name: str, directory: Path) -> Path:
    """A random GPT-2-small- or t5-small-shaped model + GPT-2's tokenizer, saved as a hub checkpoint is."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    from common.data_root import data_root

    tok = AutoTokenizer.from_pretrained(str(data_root() / GPT2_TOKENIZER))
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id}
    if name == "gpt2-small":
        model = GPT2LMHeadModel(GPT2Config(**ids, bos_token_id=tok.eos_token_id))  # 12 x 768, 124M
    else:  # t5-small's shape (v1.0: ReLU FFN) with GPT-2's 50,257-token vocabulary instead of 32,128
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=512, d_ff=2048, d_kv=64,
                                                    num_layers=6, num_heads=8, decoder_start_token_id=tok.eos_token_id,
                                                    **ids))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def speed_worker(spec: dict) -> dict:
    """One variant's `finetune fit` in this process: steps timed, real tokens counted."""
    from finetune.cli import main as finetune_cli
    from finetune.data import FinetuneDataModule

    real: list[int] = []
    collate = FinetuneDataModule.collate_train

    def counting(self: FinetuneDataModule, rows: list) -> dict:
        real.append(_real_tokens(rows))  # batch i's count (the loader collates in order)
        return collate(self, rows)

    FinetuneDataModule.collate_train = counting  # type: ignore[method-assign]
    steps = spec["warmup"] + spec["steps"]
    cli = finetune_cli(["fit", "--model.init", spec["model"], "--data.task", "dialogsum", *spec["args"],
                        "--data.max_length", "512", "--data.max_train_examples", "800", "--model.lr", "1e-4",
                        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps + 1),
                        "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
                        "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false",
                        "--trainer.enable_progress_bar", "false",
                        "--trainer.callbacks+=finetune_peft.StepClock", "--trainer.default_root_dir", spec["run_dir"]])
    # By name: the CLI imports this file as `finetune_peft`, a second copy of `__main__`'s classes.
    clock = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "StepClock")
    durations = [b - a for a, b in zip(clock.ends, clock.ends[1:])][spec["warmup"] - 1:]  # steps warmup+1 ...
    tokens = real[spec["warmup"]:steps]
    model = cli.model.model
    return {"tokens_per_s": sum(tokens) / sum(durations), "step_s": statistics.median(durations),
            "real_tokens_per_step": statistics.fmean(tokens), "steps_timed": len(durations),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in model.parameters()), "precision": str(cli.trainer.precision)}


def speed(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="finetune_peft_"))
    models = {name: str(save_model(name, tmp / name)) for name in args.models}
    runs: dict[str, dict[str, list[dict]]] = {m: {v: [] for v in SPEED_VARIANTS[m]} for m in args.models}
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "offline"}
    for rnd in range(args.rounds):
        for name in args.models:
            variants = list(SPEED_VARIANTS[name])
            variants = variants[rnd % len(variants):] + variants[:rnd % len(variants)]  # rotate the order
            for variant in variants:
                spec = {"model": models[name], "args": SPEED_VARIANTS[name][variant], "warmup": args.warmup,
                        "steps": args.steps, "run_dir": str(tmp / f"run-{name}-{variant}-{rnd}")}
                proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                                      capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit(f"{name} {variant} failed:\n{proc.stderr[-3000:]}")
                runs[name][variant].append(json.loads(line[len("RESULT "):]))
                r = runs[name][variant][-1]
                print(f"round {rnd} {name:10s} {variant:18s} {r['tokens_per_s']:8.0f} real tok/s  "
                      f"step {r['step_s']:.2f}s  peak {r['peak_rss_gb']:.2f} GB", flush=True)
    return runs


def score_run(init: str, task: str, steps: int, run_dir: Path, extra: list[str]) -> dict:
    """Fine-tune ``init`` for ``steps`` and score its last checkpoint on the whole test split."""
    from finetune.cli import main as finetune_cli

    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    t0 = time.perf_counter()
    finetune_cli(["fit", "--model.init", init, "--data.task", task, "--trainer.max_steps", str(steps),
                  "--trainer.val_check_interval", str(steps), "--data.max_val_examples", "200",
                  "--model.warmup_steps", str(steps // 10), "--model.max_new_tokens", "32",
                  "--trainer.default_root_dir", str(run_dir), *quiet, *extra])
    fit_s = time.perf_counter() - t0
    test = finetune_cli(["evaluate", "--model.init", str(run_dir / "checkpoints" / "last.ckpt"), "--data.task", task,
                         "--model.max_new_tokens", "32", "--trainer.default_root_dir", str(run_dir / "test"), *quiet])
    res = test.results
    return {"bleu": res["metrics"]["bleu"], "chrf": res["metrics"]["chrf"], "ci95": res["ci95"], "n": res["n_prompts"],
            "n_total": res["n_total"], "predictions": res["predictions"], "fit_s": fit_s,
            "references": [it["references"] for it in test.datamodule.eval_items["test"]]}


def scores(args: argparse.Namespace) -> dict:
    from finetune.significance import paired_test

    lora = lambda lr: ["--model.peft", LORA, "--model.lr", str(lr)]  # noqa: E731
    variants = {"gpt-tiny": {"full": ["--model.lr", str(args.lr)], "lora": lora(args.lr), "lora 3x lr": lora(3 * args.lr),
                             "lora+packing": [*lora(3 * args.lr), "--data.packing", "true",
                                              "--data.batch_size", str(args.packed_rows)]},
                "t5-tiny": {"full": ["--model.lr", str(args.lr)], "lora": lora(args.lr), "lora 3x lr": lora(3 * args.lr)}}
    tmp = Path(tempfile.mkdtemp(prefix="finetune_peft_scores_"))
    out: dict[str, dict] = {}
    for model, runs in variants.items():
        out[model] = {}
        for variant, extra in runs.items():
            r = score_run(str(ROOT / "runs" / model), args.task, args.steps, tmp / model / variant.replace(" ", "_"),
                          ["--data.batch_size", str(args.batch_size), *extra])
            out[model][variant] = r
            print(f"{model} {variant}: BLEU {r['bleu']:.2f} chrF {r['chrf']:.2f} (fit {r['fit_s']:.0f}s)", flush=True)
        base = out[model]["full"]
        for variant, r in out[model].items():
            if variant != "full":
                r["vs_full"] = paired_test("bleu_chrf", base["predictions"], r["predictions"], base["references"], "fr")
    return out


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(record: dict) -> str:
    """The Markdown results file of ``record`` (one part)."""
    m = record["machine"]
    lines = [f"# Fine-tuning: full vs LoRA vs packing, {record['part']} ({record['date']})", "",
             f"`.venv/bin/python benchmarks/finetune_peft.py --part {record['part']} "
             + " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                        for k, v in record["args"].items() if k in PART_ARGS[record["part"]]) + "`", "",
             f"Machine: {m.get('cpu')}, {m.get('cpus')} CPUs, torch {m.get('torch')}; {record['minutes']:.1f} min. "
             f"Other heavy processes: {record['busy'] or 'none'}.", ""]
    if record["part"] == "speed":
        lines += ["| model | variant | precision | trainable params | real tok/s (median of rounds) | x full | "
                  "step s | real tokens / step | peak RSS GB (max of rounds) |", "|---|---|---|---|---|---|---|---|---|"]
        for model, variants in record["results"].items():
            full = _median(variants["full"], "tokens_per_s")
            for variant, runs in variants.items():
                r = runs[0]
                each = ", ".join(format(x["tokens_per_s"], ",.0f") for x in runs)
                lines.append(f"| {model} | {variant} | {r['precision']} | {r['trainable']:,} of {r['params']:,} | "
                             f"{_median(runs, 'tokens_per_s'):,.0f} ({each}) | "
                             f"{_median(runs, 'tokens_per_s') / full:.2f} | {_median(runs, 'step_s'):.2f} | "
                             f"{_median(runs, 'real_tokens_per_step'):,.0f} | {max(x['peak_rss_gb'] for x in runs):.2f} |")
    else:
        from finetune.significance import format_interval

        lines += ["| model | variant | BLEU [95% CI] | chrF [95% CI] | vs full: ΔBLEU (p) | ΔchrF (p) | n of N | fit s |",
                  "|---|---|---|---|---|---|---|---|"]
        for model, variants in record["results"].items():
            for variant, r in variants.items():
                vs = r.get("vs_full")
                delta = (f"{vs['bleu']['delta']:+.2f} ({vs['bleu']['p_value']:.4f}) | "
                         f"{vs['chrf']['delta']:+.2f} ({vs['chrf']['p_value']:.4f})") if vs else "– | –"
                lines.append(f"| {model} | {variant} | {format_interval(r['bleu'], r['ci95'].get('bleu'))} | "
                             f"{format_interval(r['chrf'], r['ci95'].get('chrf'))} | {delta} | {r['n']} of "
                             f"{r['n_total']} | {r['fit_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["speed", "scores"], default="speed")
    parser.add_argument("--models", nargs="+", default=list(SPEED_VARIANTS), choices=list(SPEED_VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (speed) / fine-tuning steps (scores)")
    parser.add_argument("--task", default="tatoeba_en_fr")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--packed_rows", type=int, default=4, help="scores: packed rows per batch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(speed_worker(json.loads(args.worker))), flush=True)
        return
    started = time.time()
    result = speed(args) if args.part == "speed" else scores(args)
    record = {"part": args.part, "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "date": dt.date.today().isoformat(), "minutes": (time.time() - started) / 60,
              "machine": machine(("OMP_NUM_THREADS", "LMTRAIN_CPU_PRECISION")), "busy": busy_processes(),
              "results": result}
    path = OUT / f"finetune_peft_{args.part}.json"
    if args.part == "scores":  # the predictions are in each run's eval folder; keep the record small
        for variants in result.values():
            for r in variants.values():
                r.pop("predictions"), r.pop("references")
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    path.with_suffix(".md").write_text(report(record))
    print(path.with_suffix(".md").read_text() + f"\nwritten to {path}")


if __name__ == "__main__":
    main()
