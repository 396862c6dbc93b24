"""`python -m finetune {fit,evaluate,validate,harness,export,compare,study,attention,submit} ...`

  evaluate  zero-/few-shot scores of a model on a task, no training  (python -m finetune evaluate --help)
            e.g. --model.init runs/gpt-tiny --data.task tatoeba_en_fr --data.shots 5
  fit       fine-tune --model.init on --data.task, best checkpoint by the task metric
  validate  score a model (or --ckpt_path) on the task's validation split
  harness   lm-evaluation-harness tasks on the model, in process (python -m finetune harness --help)
            e.g. --model.init runs/gpt-tiny --tasks tatoeba_en_fr_mc,multi30k_en_bpb --limit 200
  export    write a Hugging Face model directory from a fine-tuning checkpoint (LoRA runs: the adapter,
            or with --merge true the merged model)
  compare   RNN baselines vs a transformer from scratch on one task (python -m finetune compare --help)
  study     the whole study: attention, transformer vs RNN, pretraining, few-shot (python -m finetune study --help)
  attention plot source x target attention of a seq2seq model for chosen examples (PNG)
  submit    run fit as a SLURM batch job that resumes after requeue (python -m finetune submit --help)
"""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from common.user_errors import report_user_errors

    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in (None, "-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if command else 2)
    if command == "export":
        import finetune.rnn  # noqa: F401  (our RNN architecture registers with the Auto classes)
        from finetune.export import main as export_main

        report_user_errors(lambda: export_main(sys.argv[2:]))
    elif command == "harness":
        from finetune.harness import main as harness_main

        report_user_errors(lambda: harness_main(sys.argv[2:]))
    elif command == "compare":
        from finetune.compare import main as compare_main

        report_user_errors(lambda: compare_main(sys.argv[2:]))
    elif command == "study":
        from finetune.study import main as study_main

        report_user_errors(lambda: study_main(sys.argv[2:]))
    elif command == "attention":
        from jsonargparse import CLI

        from finetune.attention_plots import main as attention_main

        report_user_errors(lambda: CLI(attention_main, args=sys.argv[2:], as_positional=False))
    elif command == "submit":
        from common.slurm_submit import main as submit_main

        report_user_errors(lambda: submit_main(sys.argv[2:], stage="finetune"))
    else:
        from finetune.cli import main as cli_main

        report_user_errors(cli_main)


if __name__ == "__main__":
    main()
