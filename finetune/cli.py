"""`python -m finetune fit|evaluate|validate ...` (LightningCLI over FinetuneSystem + FinetuneDataModule).

`fit` fine-tunes ``--model.init`` on ``--data.task``, validating by generation every
``trainer.val_check_interval`` steps and keeping the best checkpoints by ``val/score``.
`evaluate` (Lightning's `test`, under the name users look for) scores a model zero- or few-shot (``--data.shots k``) on the task's
test split without training, and writes ``<run dir>/eval/<task>-<split>-<k>shot/``: results.json,
results.md, predictions.jsonl, prompts-<split>.jsonl and the command's config.yaml, plus a W&B table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from common.run_cli import RunCLI
from common.trainer import LMTrainer
from common.run_dir import SaveRunConfig
from finetune.attention_plots import AttentionPlots
from finetune.data import FinetuneDataModule
from finetune.packing import check_packing
from finetune.results import log_wandb_table, write_results
from finetune.system import FinetuneSystem


class FinetuneTrainer(LMTrainer):
    """Lightning's Trainer with ``evaluate``: the CLI subcommand is named after the method it runs."""

    def evaluate(self, model: Any = None, dataloaders: Any = None, ckpt_path: str | None = None, verbose: bool = True,
                 datamodule: Any = None, weights_only: bool | None = None) -> Any:
        """Score a model zero- or few-shot on the task's test split, without training."""
        return self.test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)


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

    def connect_model_and_data(self) -> None:
        model, data = self.model, self.datamodule
        self.results: dict = {}
        if model.model is None:  # model.scratch: a trained tokenizer needs the task's data first
            model.build_from_scratch(data.task, data.splits["train"], self.trainer.default_root_dir)
        data.connect(model.tokenizer, model.kind, model.model.config)
        if data.packing and self.subcommand == "fit":  # only training batches are packed
            check_packing(model.model, model.kind)

    def before_fit(self) -> None:
        super().before_fit()
        data = self.datamodule
        if data.max_length > data.context["usable_context"]:  # the user's explicit, warned-about choice
            self.model.trained_context(data.max_length)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        skip = {"model", "dataloaders", "datamodule"}
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}, "validate": skip,
                "evaluate": skip}

    def after_evaluate(self) -> None:
        self._write_outputs("test")

    def after_validate(self) -> None:
        self._write_outputs("val")

    def _write_outputs(self, stage: str) -> None:
        """``self.results``: the model's scores with the data's side (task, split, n of N, context,
        truncation, overlap); written and logged by rank 0."""
        datamodule = self.datamodule
        if not self.model.last_results:
            return
        stats = datamodule.prompt_stats(stage)
        self.results = results = {"task": stats["task"], "split": stats["split"], **self.model.last_results, **stats}
        if not self.trainer.is_global_zero:
            return
        name = f"{results['task']}-{results['split']}-{datamodule.shots}shot"
        out = Path(self.trainer.default_root_dir) / "eval" / name
        items = datamodule.eval_items[stage]
        write_results(results, items, out)
        datamodule.dump_prompts(stage, out)
        # The command that made these scores, beside them (the run's own config.yaml is left alone).
        saver = next(cb for cb in self.trainer.callbacks if isinstance(cb, SaveRunConfig))
        (out / "config.yaml").write_text(saver.dump(), encoding="utf-8")
        log_wandb_table(self.trainer.loggers, results, items, key=f"eval/{name}")
        print((out / "results.md").read_text() + f"\nwritten to {out}")


def main(args: list[str] | None = None) -> FinetuneCLI:
    return FinetuneCLI(
        FinetuneSystem,
        FinetuneDataModule,
        trainer_class=FinetuneTrainer,
        parser_kwargs={"prog": "lmtrain finetune"},
        seed_everything_default=1234,
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,
        args=args,
    )
