"""The main job, end to end on the shipped defaults (README command 1).

prepare the shipped corpus -> pretrain gpt-tiny -> validate on the held-out split next to a unigram
baseline on the same tokens -> export to Hugging Face format -> generate a sample from the export.
Every step is the public CLI/API a user would call; W&B logs offline unless you are logged in.

    python scripts/main_job.py            # ~10 min on 2 CPU cores
    python scripts/main_job.py --quick    # a 2-minute smoke run of the same pipeline
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
PRESET = REPO / "configs" / "pretrain" / "gpt-tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="train 200 steps instead of the preset's 1500")
    parser.add_argument("--run-dir", default="runs/gpt-tiny", help="run directory (checkpoints, config, wandb)")
    args = parser.parse_args()
    os.chdir(REPO)  # configs name the corpus out_dir relative to the repository

    from transformers import pipeline

    from pretrain.cli import main as pretrain_cli
    from pretrain.export import export_checkpoint
    from pretrain.shards import unigram_baseline

    started = time.time()
    overrides = ["--trainer.default_root_dir", args.run_dir]
    if args.quick:
        overrides += ["--trainer.max_steps", "200", "--trainer.val_check_interval", "100",
                      "--samples.every_n_steps", "100"]

    print("\n=== 1-2. prepare the corpus and pretrain gpt-tiny ===", flush=True)
    fit = pretrain_cli(["fit", "--config", str(PRESET), *overrides])
    corpus_dir = fit.datamodule.corpus.out_dir

    print("\n=== 3. validate the last checkpoint on the whole held-out split ===", flush=True)
    val = pretrain_cli(["validate", "--config", str(PRESET), *overrides, "--ckpt_path", "last",
                        "--trainer.logger", "false", "--trainer.limit_val_batches", "1.0"])
    model_loss = float(val.trainer.callback_metrics["val/loss"])
    baseline = unigram_baseline(corpus_dir)

    print("\n=== 4. export to Hugging Face format ===", flush=True)
    export_dir = Path(args.run_dir) / "hf"
    export_checkpoint(args.run_dir, str(export_dir), overwrite=True)

    print("\n=== 5. generate from the exported model ===", flush=True)
    generator = pipeline("text-generation", model=str(export_dir), device="cpu")
    sample = generator("The history of", max_new_tokens=40, do_sample=True, top_k=50)[0]["generated_text"]

    print("\n=== results ===")
    print(f"{'model':<28}{'val loss (nats/token)':>24}{'val perplexity':>18}")
    print(f"{'unigram baseline':<28}{baseline['val_loss']:>24.3f}{baseline['val_ppl']:>18.1f}")
    print(f"{'gpt-tiny':<28}{model_loss:>24.3f}{math.exp(model_loss):>18.1f}")
    print(f"\nexported to {export_dir}\nsample: {sample!r}")
    print(f"wall time: {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
