"""`python -m finetune fit|evaluate|validate ...` (LightningCLI over FinetuneSystem + FinetuneDataModule).

`fit` fine-tunes ``--model.init`` on ``--data.task``, validating by generation every
``trainer.val_check_interval`` steps and keeping the best checkpoints by ``val/score``.
`evaluate` (Lightning's `test`) scores a model zero- or few-shot (``--data.shots k``) on the task's
test split without training, and writes ``<run dir>/eval/<task>-<split>-<k>shot/``: results.json,
results.md, predictions.jsonl and prompts-<split>.jsonl, plus a W&B table.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser

from common.run_cli import RunCLI
from finetune.attention_plots import AttentionPlots
from finetune.data import FinetuneDataModule
from finetune.results import log_wandb_table, write_results
from finetune.system import FinetuneSystem


class FinetuneCLI(RunCLI):
    """The shared run conventions (common/run_cli.py); best checkpoints by the task metric."""

    monitor = "val/score"
    monitor_mode = "max"
    checkpoint_filename = "step{step:07d}-score{val/score:.2f}"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(AttentionPlots, "attention_plots")  # encoder-decoders, each validation
        parser.set_defaults({"trainer.default_root_dir": "runs/finetune", "trainer.max_steps": 1000,
                             "trainer.val_check_interval": 250, "trainer.num_sanity_val_steps": 0})
        # Generation length is one setting: the data module keeps room for it in the context.
        parser.link_arguments("model.max_new_tokens", "data.max_new_tokens")

    def after_test(self) -> None:
        self._write_outputs("test")

    def after_validate(self) -> None:
        self._write_outputs("val")

    def _write_outputs(self, stage: str) -> None:
        results, datamodule = self.model.last_results, self.datamodule
        if not results or not self.trainer.is_global_zero:
            return
        name = f"{results['task']}-{results['split']}-{datamodule.shots}shot"
        out = Path(self.trainer.default_root_dir) / "eval" / name
        items = datamodule.eval_items[stage]
        write_results(results, items, out)
        datamodule.dump_prompts(stage, out)
        log_wandb_table(self.trainer.loggers, results, items, key=f"eval/{name}")
        print((out / "results.md").read_text() + f"\nwritten to {out}")


def main(args: list[str] | None = None) -> FinetuneCLI:
    return FinetuneCLI(
        FinetuneSystem,
        FinetuneDataModule,
        seed_everything_default=1234,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,
        args=args,
    )
