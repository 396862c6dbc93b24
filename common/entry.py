"""`lmtrain <stage> <command> ...`: the console entry point (``[project.scripts]`` in pyproject.toml).

    lmtrain pretrain fit --config configs/pretrain/gpt-tiny.yaml
    lmtrain finetune evaluate --model.init runs/gpt-tiny --data.task tatoeba_en_fr --data.shots 5
    lmtrain sync runs/gpt-tiny

The same as ``python -m pretrain ...`` / ``python -m finetune ...`` / ``python -m common.wandb_sync``,
which keep working. This is the one module that names the stages, and it does so by name only
(``importlib``), so `common/` still imports neither of them. Commands that belong to no stage
(``sync``) live in `common/` and are dispatched the same way.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {"pretrain": "pretrain GPT-2 / T5 models; prepare, fit, validate, export, submit",
          "finetune": "fine-tune and evaluate on tasks; fit, evaluate, validate, harness, export, compare, study, attention, submit"}
# name -> (module with a main() that reads sys.argv[1:], what it does)
COMMANDS = {"sync": ("common.wandb_sync",
                     "merge a run's resumed segments into one W&B history (lmtrain sync <run dir>)")}


def main() -> None:
    stage = sys.argv[1] if len(sys.argv) > 1 else None
    if stage not in STAGES and stage not in COMMANDS:
        print("usage: lmtrain {pretrain,finetune,sync} <command> ...\n\n"
              + "\n".join(f"  {name:<9} {what}" for name, what in STAGES.items())
              + "".join(f"\n  {name:<9} {what}" for name, (_, what) in COMMANDS.items())
              + "\n\n`lmtrain <stage> --help` lists a stage's commands.")
        raise SystemExit(0 if stage in ("-h", "--help") else 2)
    del sys.argv[1]
    sys.argv[0] = f"lmtrain {stage}"  # usage lines name the command the user typed
    module = COMMANDS[stage][0] if stage in COMMANDS else f"{stage}.__main__"
    importlib.import_module(module).main()


if __name__ == "__main__":
    main()
