"""`python -m pretrain fit|validate --config configs/pretrain/<preset>.yaml` (LightningCLI).

Everything a run needs is in its YAML: `model` (`class_path: CausalLMSystem` for GPT-2,
`SpanCorruptionSystem` for T5), `data` (PretrainDataModule),
`trainer`, plus the callback groups `checkpoint`, `speed`, `samples` and `downstream` (lm-evaluation-harness
tasks scored every N steps beside val/loss; off unless tasks are named, on in the tiny presets). A run lives in
`trainer.default_root_dir`: its resolved `config.yaml`, `checkpoints/` (last + best-k by val loss)
and `wandb/`. `fit --ckpt_path last` resumes it exactly and continues the same W&B run.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser

from common.downstream_eval import DownstreamEval
from common.run_cli import RunCLI
from common.trainer import LMTrainer
from common.throughput import SpeedMonitor
from pretrain.data import PretrainDataModule
from pretrain.samples import GenerationSamples
from pretrain.system import PretrainSystem


class PretrainCLI(RunCLI):
    """The shared run conventions (common/run_cli.py) plus throughput, generation samples and
    downstream evaluation."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(SpeedMonitor, "speed")
        parser.add_lightning_class_args(GenerationSamples, "samples")
        parser.add_lightning_class_args(DownstreamEval, "downstream")
        # The model class decides what batches it trains on; the data module is told, never asked.
        parser.link_arguments("model", "data.objective",
                              compute_fn=_objective_of, apply_on="instantiate")


    def connect_model_and_data(self) -> None:
        # The model class is in subclass mode, so jsonargparse would bury an error raised while the
        # system is built in a Union message: its arch is checked here, before any corpus work.
        self.model.arch.check("model.arch")


def _objective_of(model: PretrainSystem) -> str:
    return model.objective


def main(args: list[str] | None = None) -> PretrainCLI:
    return PretrainCLI(
        PretrainSystem,  # the family is chosen by `model.class_path`: CausalLMSystem or SpanCorruptionSystem
        PretrainDataModule,
        subclass_mode_model=True,
        trainer_class=LMTrainer,
        parser_kwargs={"prog": "lmtrain pretrain"},
        seed_everything_default=1234,
        auto_configure_optimizers=False,  # the system builds AdamW + schedule itself
        load_from_checkpoint_support=False,  # keep hyper-parameters primitive (weights_only loads)
        args=args,
    )
