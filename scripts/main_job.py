"""The main job, end to end on the shipped defaults (README command 1).

For gpt-tiny and t5-tiny: prepare the shipped corpus -> pretrain -> validate on the held-out split
next to a unigram baseline on the same tokens -> export to Hugging Face format -> generate from the
export. Then a short version of the study (`python -m finetune study --config
configs/study/main_job.yaml`): both pretrained models on translation (tatoeba_en_fr), summarization
(dialogsum) and QA (squad), scored zero-shot, k-shot, fine-tuned, and fine-tuned from random weights
(does pretraining help?), each with intervals and paired tests; and the RNNs (no attention,
Bahdanau, Luong) against the NMT transformer on Tatoeba at a short equal budget. One report:
runs/study-main-job/study.md. Every step is the public CLI/API a user would call; W&B logs offline
unless you are logged in.

    python scripts/main_job.py                    # both models + the short study
    python scripts/main_job.py --families gpt2    # gpt-tiny only
    python scripts/main_job.py --quick            # a few-minute smoke run of the same pipeline

Run directories that already hold checkpoints are resumed, so a rerun after a finished run only
validates, exports and scores again; delete runs/<model> (or pass --runs-dir) to pretrain afresh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see shared notes: spinning OpenMP stalls on a shared VM

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"gpt2": REPO / "configs" / "pretrain" / "gpt-tiny.yaml", "t5": REPO / "configs" / "pretrain" / "t5-tiny.yaml"}
QUICK_PRETRAIN = ["--trainer.max_steps", "200", "--trainer.val_check_interval", "100", "--samples.every_n_steps", "100"]
STUDY = REPO / "configs" / "study" / "main_job.yaml"
# k-shot settings per family (default run, --quick): few-shot is the decoder's question; t5 as before.
STUDY_SHOTS = {"gpt2": {False: [0, 1, 3, 5], True: [0, 1]}, "t5": {False: [0, 1, 5], True: [0, 1]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 200 pretraining steps, 20 test items, 30 fine-tuning steps on 2,000 rows (runs/quick/)")
    parser.add_argument("--families", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS),
                        help="gpt2: decoder, next-token loss; t5: encoder-decoder, span corruption")
    parser.add_argument("--family", choices=sorted(PRESETS), help="one family (the same as --families FAMILY)")
    parser.add_argument("--runs-dir", default=None, help="where the runs go (default runs/, or runs/quick/)")
    parser.add_argument("--no-suite", action="store_true", help="pretrain, validate, export, generate only (no study)")
    args = parser.parse_args()
    families = [args.family] if args.family else args.families
    runs = Path(args.runs_dir or ("runs/quick" if args.quick else "runs"))
    os.chdir(REPO)  # configs name the corpus out_dir relative to the repository

    from finetune.study import main as study_main

    started = time.time()
    summaries = [pretrain(family, str(runs / PRESETS[family].stem), args.quick) for family in families]
    pretrain_min = (time.time() - started) / 60

    study = None
    if not args.no_suite:
        print("\n=== 6. the short study: k-shot, fine-tuned and random-init scores; RNNs vs transformer ===",
              flush=True)
        # The study config names runs/<preset> (runs/quick/<preset> with --quick): point it at these runs.
        models = {PRESETS[f].stem: {"init": str(runs / PRESETS[f].stem), "shots": STUDY_SHOTS[f][args.quick]}
                  for f in families}
        study = study_main(["--config", str(STUDY), *(["--quick"] if args.quick else []),
                            "--models", json.dumps(models), *(["--out_dir", str(runs / "study")] if args.runs_dir else [])])

    print("\n=== results ===\n")
    for s in summaries:
        print(f"{s['name']}: val loss {s['loss']:.3f} nats/token (ppl {math.exp(s['loss']):.1f}) vs "
              f"{s['baseline_name']} {s['baseline']['val_loss']:.3f} ({s['baseline']['val_ppl']:.1f}); "
              f"exported to {s['export_dir']}; sample: {s['sample']!r}")
    if study:
        print(f"\nThe short study (every score with its 95% interval, * = differs from its baseline on the same "
              f"items, paired test p < 0.05), also in {study['report']}:\n")
        print(Path(study["report"]).read_text(encoding="utf-8"))
    print(f"wall time: {(time.time() - started) / 60:.1f} min (pretraining, validation, export, generation: "
          f"{pretrain_min:.1f} min)")


def pretrain(family: str, run_dir: str, quick: bool) -> dict:
    """Steps 1-5 for one family; returns the figures the results print."""
    from transformers import pipeline

    from pretrain.cli import main as pretrain_cli
    from common.export import export_checkpoint
    from pretrain.shards import unigram_baseline
    from pretrain.span_corruption import target_unigram_baseline

    preset = PRESETS[family]
    overrides = ["--trainer.default_root_dir", run_dir, *(QUICK_PRETRAIN if quick else [])]

    print(f"\n=== 1-2. prepare the corpus and pretrain {preset.stem} ===", flush=True)
    # A run directory that already holds checkpoints is resumed (a finished run trains no further
    # step): training from scratch into it would write last-v1.ckpt beside a stale last.ckpt.
    fit = pretrain_cli(["fit", "--config", str(preset), *overrides, "--ckpt_path", "last"])
    data = fit.datamodule

    print(f"\n=== 3. validate {preset.stem}'s last checkpoint on the whole held-out split ===", flush=True)
    val = pretrain_cli(["validate", "--config", str(preset), *overrides, "--ckpt_path", "last",
                        "--trainer.logger", "false", "--trainer.limit_val_batches", "1.0"])
    model_loss = float(val.trainer.callback_metrics["val/loss"])
    if family == "gpt2":
        baseline_name, baseline = "unigram baseline", unigram_baseline(data.corpus.out_dir)
    else:  # the same val target tokens, predicted from training-target unigram frequencies
        baseline_name = "target-unigram baseline"
        baseline = target_unigram_baseline(data.train_dataloader().dataset, data.val_dataloader().dataset,
                                           len(data.tokenizer))

    print(f"\n=== 4. export {preset.stem} to Hugging Face format ===", flush=True)
    export_dir = Path(run_dir) / "hf"
    export_checkpoint(run_dir, str(export_dir), overwrite=True)

    print(f"\n=== 5. generate from the exported {preset.stem} ===", flush=True)
    if family == "gpt2":
        generator = pipeline("text-generation", model=str(export_dir), device="cpu")
        sample = generator("The history of", max_new_tokens=40, do_sample=True, top_k=50)[0]["generated_text"]
    else:  # transformers 5 has no text2text pipeline: tokenizer -> generate -> decode
        sample = fill_spans(export_dir, "The <extra_id_0> of the city was <extra_id_1> in 1850 .")
    print(f"{preset.stem}: val loss {model_loss:.3f} vs {baseline_name} {baseline['val_loss']:.3f}; "
          f"sample: {sample!r}", flush=True)
    return {"name": preset.stem, "loss": model_loss, "baseline_name": baseline_name, "baseline": baseline,
            "export_dir": export_dir, "sample": sample}


def fill_spans(model_dir: Path, text: str) -> str:
    """Greedy span infilling with an exported T5: ``text`` holds <extra_id_k> sentinels."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    out = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=20, do_sample=False)
    return f"{text} -> {tokenizer.decode(out[0, 1:])}"


if __name__ == "__main__":
    from common.user_errors import report_user_errors

    report_user_errors(main)  # bad input: one line, as from the lmtrain commands
