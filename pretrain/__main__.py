"""`python -m pretrain {fit,validate,prepare,export,submit} ...`

  prepare   tokenize a corpus into memory-mapped token shards   (python -m pretrain prepare --help)
  fit       pretrain (prepares the corpus first when needed)    (python -m pretrain fit --help)
  validate  evaluate a checkpoint on the validation split
  export    write a Hugging Face model directory from a checkpoint (python -m pretrain export --help)
  submit    run fit as a SLURM batch job that resumes after requeue (python -m pretrain submit --help)
"""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork DataLoader/datasets workers


def main() -> None:
    from common.user_errors import report_user_errors

    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in (None, "-h", "--help"):
        print(__doc__)
        if command is None:
            raise SystemExit(2)
        # then LightningCLI's own help below
    if command == "prepare":
        from pretrain.prepare import main as prepare_main

        report_user_errors(lambda: prepare_main(sys.argv[2:]))
    elif command == "submit":
        from common.slurm_submit import main as submit_main

        report_user_errors(lambda: submit_main(sys.argv[2:], stage="pretrain"))
    elif command == "export":
        from common.export import main as export_main

        report_user_errors(lambda: export_main(sys.argv[2:]))
    else:
        from pretrain.cli import main as cli_main

        report_user_errors(cli_main)


if __name__ == "__main__":
    main()
