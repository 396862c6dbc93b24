"""The main job, end to end on the shipped defaults (README command 1).

prepare the shipped corpus -> pretrain gpt-tiny -> validate on the held-out split next to a unigram
baseline on the same tokens -> export to Hugging Face format -> generate a sample from the export.
Every step is the public CLI/API a user would call; W&B logs offline unless you are logged in.

    python scripts/main_job.py                # GPT (gpt-tiny), ~10 min on 2 CPU cores
    python scripts/main_job.py --family t5    # the same with T5 span corruption (t5-tiny)
    python scripts/main_job.py --quick        # a 2-minute smoke run of the same pipeline
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see shared notes: spinning OpenMP stalls on a shared VM

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"gpt2": REPO / "configs" / "pretrain" / "gpt-tiny.yaml", "t5": REPO / "configs" / "pretrain" / "t5-tiny.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="train 200 steps instead of the preset's 1500")
    parser.add_argument("--family", choices=sorted(PRESETS), default="gpt2",
                        help="gpt2: decoder, next-token loss; t5: encoder-decoder, span corruption")
    parser.add_argument("--run-dir", default=None, help="run directory (default runs/gpt-tiny or runs/t5-tiny)")
    args = parser.parse_args()
    preset = PRESETS[args.family]
    run_dir = args.run_dir or f"runs/{preset.stem}"
    os.chdir(REPO)  # configs name the corpus out_dir relative to the repository

    from transformers import pipeline

    from pretrain.cli import main as pretrain_cli
    from pretrain.export import export_checkpoint
    from pretrain.shards import unigram_baseline
    from pretrain.span_corruption import target_unigram_baseline

    started = time.time()
    overrides = ["--trainer.default_root_dir", run_dir]
    if args.quick:
        overrides += ["--trainer.max_steps", "200", "--trainer.val_check_interval", "100",
                      "--samples.every_n_steps", "100"]

    print(f"\n=== 1-2. prepare the corpus and pretrain {preset.stem} ===", flush=True)
    fit = pretrain_cli(["fit", "--config", str(preset), *overrides])
    data = fit.datamodule

    print("\n=== 3. validate the last checkpoint on the whole held-out split ===", flush=True)
    val = pretrain_cli(["validate", "--config", str(preset), *overrides, "--ckpt_path", "last",
                        "--trainer.logger", "false", "--trainer.limit_val_batches", "1.0"])
    model_loss = float(val.trainer.callback_metrics["val/loss"])
    if args.family == "gpt2":
        baseline_name, baseline = "unigram baseline", unigram_baseline(data.corpus.out_dir)
    else:  # the same val target tokens, predicted from training-target unigram frequencies
        baseline_name = "target-unigram baseline"
        baseline = target_unigram_baseline(data.train_dataloader().dataset, data.val_dataloader().dataset,
                                           len(data.tokenizer))

    print("\n=== 4. export to Hugging Face format ===", flush=True)
    export_dir = Path(run_dir) / "hf"
    export_checkpoint(run_dir, str(export_dir), overwrite=True)

    print("\n=== 5. generate from the exported model ===", flush=True)
    if args.family == "gpt2":
        generator = pipeline("text-generation", model=str(export_dir), device="cpu")
        sample = generator("The history of", max_new_tokens=40, do_sample=True, top_k=50)[0]["generated_text"]
    else:  # transformers 5 has no text2text pipeline: tokenizer -> generate -> decode
        sample = fill_spans(export_dir, "The <extra_id_0> of the city was <extra_id_1> in 1850 .")

    print("\n=== results ===")
    print(f"{'model':<28}{'val loss (nats/token)':>24}{'val perplexity':>18}")
    print(f"{baseline_name:<28}{baseline['val_loss']:>24.3f}{baseline['val_ppl']:>18.1f}")
    print(f"{preset.stem:<28}{model_loss:>24.3f}{math.exp(model_loss):>18.1f}")
    print(f"\nexported to {export_dir}\nsample: {sample!r}")
    print(f"wall time: {(time.time() - started) / 60:.1f} min")


def fill_spans(model_dir: Path, text: str) -> str:
    """Greedy span infilling with an exported T5: ``text`` holds <extra_id_k> sentinels."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    out = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=20, do_sample=False)
    return f"{text} -> {tokenizer.decode(out[0, 1:])}"


if __name__ == "__main__":
    main()
