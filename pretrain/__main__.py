"""`python -m pretrain {fit,validate,prepare,export} ...`"""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork DataLoader/datasets workers


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "prepare":
        from pretrain.prepare import main as prepare_main

        prepare_main(sys.argv[2:])
    elif command == "export":
        from pretrain.export import main as export_main

        export_main(sys.argv[2:])
    else:
        from pretrain.cli import main as cli_main

        cli_main()


if __name__ == "__main__":
    main()
