"""Multi-process training on CPU, for real: 2-process DDP and DeepSpeed ZeRO-2/3 (gloo) through the
shipped trainer presets, for GPT and T5. Checks data sharding, reduced metrics, single-writer
checkpoints, exact resume, generation under ZeRO-3 (no hang), and export of ZeRO checkpoints.

The first DeepSpeed run JIT-compiles one C++ op (~40 s) into TORCH_EXTENSIONS_DIR (tests/conftest.py:
<venv>/torch_extensions); later runs reuse it.

Each 2-process launch costs ~15-20 s on 2 cores, nearly all of it two serial Python/Lightning
start-ups, so the launches are what this module economises: one uninterrupted run per
(preset, family) shared by every test of that run, the single-process work (the evaluate
reference, one bad-input case) in this process, W&B only where it is checked (the DDP runs), and
of the ZeRO stage x family matrix the diagonal (ZeRO-2 GPT, ZeRO-3 T5) in the default suite, the
other two pairs under `-m slow`, as are the cases that repeat a path another default case takes
(ZeRO-2 resume, DDP evaluate).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from common.checkpoints import consolidated_state_dict, is_zero_checkpoint
from common.metrics_log import read_metrics_log
from pretrain.shards import RandomBlocks, TokenStream
from tests.distributed_probe import probe_logits
from tests.tiny_run import write_run_config

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "configs" / "trainer"

pytestmark = pytest.mark.integration  # 2-process launches of the CLI


def _fit(*args: str, timeout: int = 300, stage: str = "pretrain", **env_vars: str) -> subprocess.CompletedProcess:
    """`python -m <stage> fit ...` in its own session, killed as a group if it hangs."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_vars}
    env.pop("WANDB_SERVICE", None)  # see tests/test_resume.py
    proc = subprocess.Popen([sys.executable, "-m", stage, "fit", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{stage} fit {' '.join(args)} hung for {timeout} s:\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # no orphaned rank survives the test
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _why(result: subprocess.CompletedProcess) -> str:
    """The `error:` lines (the user-facing reason) and the end of stderr."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return "\n".join(errors) + "\n...\n" + result.stderr[-2500:]


def _probe_yaml(tmp: Path, out_dir: Path) -> Path:
    path = tmp / f"probe-{out_dir.name}.yaml"
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: tests.distributed_probe.Probe\n"
                    f"      init_args: {{out_dir: {out_dir}}}\n")
    return path


def _kill_yaml(tmp: Path, step: int) -> Path:
    path = tmp / "kill.yaml"
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: tests.tiny_run.KillAtStep\n"
                    f"      init_args: {{step: {step}, process_group: true}}\n")
    return path


def _logger(preset: str) -> list[str]:
    """W&B (offline) in the DDP runs, where the tests check it logs once; off under ZeRO, whose tests
    do not look at it (~1.5 s of W&B start-up per launch). The same for a run and its resumption."""
    return [] if preset.startswith("ddp") else ["--trainer.logger", "false"]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    if is_zero_checkpoint(checkpoint):
        return consolidated_state_dict(checkpoint)
    return torch.load(checkpoint, weights_only=True)["state_dict"]


class Runs:
    """Runs shared by the tests of this module (each is ~15-25 s of 2-process training)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[tuple[str, str], Path] = {}

    def config(self, family: str) -> Path:
        # Written once: rewriting the corpus file would make the prepared corpus look stale.
        path = self.root / family / f"tiny-{family}.yaml"
        return path if path.exists() else write_run_config(self.root / family, max_steps=8, val_every=4,
                                                           family=family)

    def get(self, preset: str, family: str) -> Path:
        """Run dir of an uninterrupted 8-step run (with a Probe) under ``configs/trainer/<preset>.yaml``."""
        key = (preset, family)
        if key not in self.done:
            run_dir = self.root / family / preset
            result = _fit("--config", str(self.config(family)), "--config", str(PRESETS / f"{preset}.yaml"),
                          "--config", str(_probe_yaml(self.root, run_dir / "probe")),
                          "--trainer.default_root_dir", str(run_dir), *_logger(preset))
            assert result.returncode == 0, _why(result)
            (run_dir / "output.txt").write_text(result.stdout + result.stderr)
            self.done[key] = run_dir
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"))


def _probes(run_dir: Path) -> list[dict]:
    probes = [torch.load(run_dir / "probe" / f"probe-rank{r}.pt", weights_only=True) for r in range(2)]
    assert [p["world_size"] for p in probes] == [2, 2]
    return probes


# ---- DDP ---------------------------------------------------------------------------------------
def test_ddp_two_processes_shard_data_reduce_metrics_and_write_checkpoints_once(runs: Runs) -> None:
    run_dir = runs.get("ddp-cpu", "gpt2")
    rank0, rank1 = _probes(run_dir)
    assert len(rank0["batches"]) == len(rank1["batches"]) == 8
    # Together the ranks read exactly the first 8 global batches of the epoch, each block once:
    # global sample i of the seeded random-offset dataset (8 sequences per step = 2 ranks x 4).
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    blocks = RandomBlocks(TokenStream(config["data"]["corpus"]["out_dir"], "train"), 32, seed=config["data"]["seed"])
    blocks.set_epoch(0)
    expected = Counter(tuple(blocks[i]["input_ids"].tolist()) for i in range(8 * 8))
    seen = Counter(tuple(row) for probe in (rank0, rank1) for batch in probe["batches"] for row in batch)
    assert seen == expected
    assert all(b0 != b1 for b0, b1 in zip(rank0["batches"], rank1["batches"])), "ranks trained on the same batch"
    # Each rank validated its own half of the val blocks; the logged loss is their reduction.
    assert len(rank0["val_losses"]) == 2
    assert rank0["val_losses"] == rank1["val_losses"]
    # One writer: exactly the expected checkpoint files, no temp files left by a second writer.
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names[0] == "last.ckpt" and len(names) == 3, names
    assert all(n.startswith("step0000004-") or n.startswith("step0000008-") for n in names[1:]), names
    assert "x 2 (world size) = 8 sequences = 256 corpus tokens (32 per sequence)" in (run_dir / "output.txt").read_text()
    # One W&B run, logged by rank 0 only; so is metrics.jsonl: one segment, each train row once.
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    log = read_metrics_log(run_dir / "metrics.jsonl")
    assert [r["segment"] for r in log if r["kind"] == "segment"] == [1]
    assert [r["step"] for r in log if "train/loss" in r.get("metrics", {})] == [1, 3, 5, 7]


def test_ddp_resume_after_sigkill_matches_uninterrupted_run(runs: Runs, tmp_path: Path) -> None:
    """Both ranks SIGKILLed mid-step; the resumed run ends bitwise equal to the uninterrupted one and
    continues its W&B run (tests/test_resume.py does the same for a single-process T5)."""
    straight = runs.get("ddp-cpu", "gpt2")
    config, preset = runs.config("gpt2"), str(PRESETS / "ddp-cpu.yaml")
    killed = tmp_path / "killed"
    first = _fit("--config", str(config), "--config", preset, "--config", str(_kill_yaml(tmp_path, 4)),
                 "--trainer.default_root_dir", str(killed), *_logger("ddp-cpu"))
    assert first.returncode == -9, _why(first)
    resumed = _fit("--config", str(config), "--config", preset, "--trainer.default_root_dir", str(killed),
                   "--ckpt_path", "last", *_logger("ddp-cpu"))
    assert resumed.returncode == 0, _why(resumed)
    expected, actual = _weights(straight / "checkpoints" / "last.ckpt"), _weights(killed / "checkpoints" / "last.ckpt")
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    # One W&B run, continued by the resumed job (two offline-run dirs of rank 0, one run id).
    assert len(list((killed / "wandb").glob("offline-run-*"))) == 2
    assert len({p.name for p in (killed / "wandb").glob("offline-run-*/run-*.wandb")}) == 1


# ---- DeepSpeed ZeRO ----------------------------------------------------------------------------
# The diagonal keeps each stage (checkpoint layout, consolidation for export) and each family
# (decoder-only and encoder-decoder generation, export; generation under ZeRO-3 in lockstep) in the
# default suite; the off-diagonal pairs add no code path of their own and cost ~25 s a launch.
ZERO_CASES = [("deepspeed-zero2-cpu", "gpt2"), ("deepspeed-zero3-cpu", "t5"),
              pytest.param("deepspeed-zero2-cpu", "t5", marks=pytest.mark.slow),
              pytest.param("deepspeed-zero3-cpu", "gpt2", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("preset", "family"), ZERO_CASES)
def test_zero_trains_generates_and_exports_live_logits(runs: Runs, preset: str, family: str, tmp_path: Path) -> None:
    run_dir = runs.get(preset, family)
    rank0, rank1 = _probes(run_dir)
    assert rank0["global_step"] == 8
    assert all(b0 != b1 for b0, b1 in zip(rank0["batches"], rank1["batches"])), "ranks trained on the same batch"
    # Validation-time generation ran at steps 4 and 8 (under ZeRO-3 on both ranks in lockstep).
    assert [rows[0]["step"] for rows in rank0["samples"]] == [4, 8]
    assert all(rows for rows in rank0["samples"])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert is_zero_checkpoint(last)
    assert not list((run_dir / "checkpoints").glob("*.partial"))

    out = tmp_path / "hf"
    from common.export import export_checkpoint

    export_checkpoint(str(last), str(out))
    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    exported = probe_logits(auto.from_pretrained(out).eval())
    assert torch.equal(exported, rank0["logits"]), (exported - rank0["logits"]).abs().max()
    assert torch.equal(rank0["logits"], rank1["logits"])


# ZeRO-3 (parameters partitioned too) in the default suite; ZeRO-2 resumes through the same strategy
# code (ZeroStrategy.load_checkpoint, the weights-only engine) and runs under `-m slow`.
@pytest.mark.parametrize(("preset", "family"), [pytest.param("deepspeed-zero2-cpu", "gpt2", marks=pytest.mark.slow),
                                                ("deepspeed-zero3-cpu", "t5")])
def test_zero_resume_after_sigkill_matches_uninterrupted_run(runs: Runs, preset: str, family: str,
                                                              tmp_path: Path) -> None:
    straight = runs.get(preset, family)
    config, preset_yaml = runs.config(family), str(PRESETS / f"{preset}.yaml")
    killed = tmp_path / "killed"
    first = _fit("--config", str(config), "--config", preset_yaml, "--config", str(_kill_yaml(tmp_path, 4)),
                 "--trainer.default_root_dir", str(killed), *_logger(preset))
    assert first.returncode == -9, _why(first)
    resumed = _fit("--config", str(config), "--config", preset_yaml, "--trainer.default_root_dir", str(killed),
                   "--ckpt_path", "last", *_logger(preset))
    assert resumed.returncode == 0, _why(resumed)
    expected, actual = _weights(straight / "checkpoints" / "last.ckpt"), _weights(killed / "checkpoints" / "last.ckpt")
    assert expected.keys() == actual.keys()
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []


# ---- bad input ---------------------------------------------------------------------------------
def test_checkpoint_kinds_are_not_mixed_up(runs: Runs, capsys: pytest.CaptureFixture) -> None:
    from common.user_errors import report_user_errors
    from pretrain.cli import main as pretrain_cli

    zero_dir = runs.get("deepspeed-zero2-cpu", "gpt2")
    plain = runs.get("ddp-cpu", "gpt2") / "checkpoints" / "last.ckpt"
    config = str(runs.config("gpt2"))

    # A ZeRO directory given to a single-file run: single-process, so in this process (the same CLI
    # entry point and error handling as `python -m pretrain fit`, without a ~9 s start-up).
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(lambda: pretrain_cli(["fit", "--config", config, "--config", str(PRESETS / "cpu.yaml"),
                                                 "--ckpt_path", str(zero_dir / "checkpoints" / "last.ckpt"),
                                                 "--trainer.default_root_dir", str(runs.root / "bad1"),
                                                 "--trainer.logger", "false"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is a DeepSpeed ZeRO checkpoint directory" in err, err

    # A single-file checkpoint given to a ZeRO run: refused by ZeroStrategy.load_checkpoint before
    # anything is read (the method Lightning calls for --ckpt_path under ZeRO, as the resume tests
    # show), so the strategy alone is enough; no process group is needed.
    from common.deepspeed_strategy import ZeroStrategy

    with pytest.raises(ValueError, match="is a single-file checkpoint, but this run uses DeepSpeed ZeRO"):
        ZeroStrategy(stage=2).load_checkpoint(plain)

    # A ZeRO checkpoint resumed with another number of processes: a ZeRO fit, whose process group
    # is started in a child, not in the test process.
    result = _fit("--config", config, "--config", str(PRESETS / "deepspeed-zero2-cpu.yaml"), "--trainer.devices", "1",
                  "--ckpt_path", str(zero_dir / "checkpoints" / "last.ckpt"),
                  "--trainer.default_root_dir", str(runs.root / "bad3"), "--trainer.logger", "false")
    assert result.returncode == 2 and "was saved by 2 processes; this run has 1" in result.stderr, _why(result)


def test_deepspeed_config_may_not_restate_lightning_settings(runs: Runs) -> None:
    result = _fit("--config", str(runs.config("gpt2")), "--config", str(PRESETS / "deepspeed-zero2-cpu.yaml"),
                  "--trainer.devices", "1", "--trainer.strategy.init_args.config",
                  '{"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}',
                  "--trainer.default_root_dir", str(runs.root / "bad4"), "--trainer.logger", "false")
    assert result.returncode == 2, _why(result)
    assert "DeepSpeed config sets 'gradient_clipping': set trainer.gradient_clip_val instead" in result.stderr


# ---- evaluation on several processes -----------------------------------------------------------
def _evaluate_args(model: Path, run_dir: Path) -> list[str]:
    task = REPO / "tests" / "fixtures" / "tasks" / "capitals.yaml"
    return ["--model.init", str(model), "--data.task", str(task), "--data.shots", "1", "--data.eval_batch_size", "1",
            "--model.max_new_tokens", "5", "--trainer.logger", "false", "--trainer.default_root_dir", str(run_dir)]


def _predictions(run_dir: Path) -> list[dict]:
    out = run_dir / "eval" / "capitals-test-1shot" / "predictions.jsonl"
    return [json.loads(line) for line in out.read_text().splitlines()]


def _evaluate_subprocess(model: Path, run_dir: Path, *trainer: str) -> list[dict]:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "LMTRAIN_DATA_ROOT": str(REPO / "tests" / "fixtures" / "tasks")}
    env.pop("WANDB_SERVICE", None)
    args = [sys.executable, "-m", "finetune", "evaluate", *_evaluate_args(model, run_dir), *trainer]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"finetune evaluate {trainer} hung")
    assert proc.returncode == 0, err[-3000:]
    return _predictions(run_dir)


@pytest.fixture(scope="module")
def single_process_eval(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A tiny GPT-2 and its single-process `finetune evaluate` predictions, the reference of both
    multi-process evaluations; run in this process with one thread, as each rank runs."""
    from finetune.cli import main as finetune_cli
    from tests.tiny_hf import save_tiny_model

    root = tmp_path_factory.mktemp("evaluate")
    model = save_tiny_model("gpt2", root / "gpt2")
    fixtures = REPO / "tests" / "fixtures" / "tasks"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTRAIN_DATA_ROOT", str(fixtures))
        torch.set_num_threads(1)
        try:
            finetune_cli(["evaluate", *_evaluate_args(model, root / "one"), "--trainer.accelerator", "cpu",
                          "--trainer.devices", "1"])
        finally:
            torch.set_num_threads(threads)
    return model, _predictions(root / "one")


# ZeRO-3 shards the items, gathers the predictions and generates in lockstep; DDP does the first two
# through the same code, without the lockstep, and runs under `-m slow`.
@pytest.mark.parametrize("preset", [pytest.param("ddp-cpu", marks=pytest.mark.slow), "deepspeed-zero3-cpu"])
def test_evaluate_on_two_processes_matches_one(preset: str, single_process_eval, tmp_path: Path) -> None:
    """Each rank generates for its shard (ZeRO-3: in lockstep); the gathered predictions are the
    single-process ones, in the same order, without the sampler's padding duplicates."""
    model, single = single_process_eval
    multi = _evaluate_subprocess(model, tmp_path / "two", "--config", str(PRESETS / f"{preset}.yaml"))
    assert len(single) == 3  # rows 2: of the fixture: an odd count, so the sampler pads one rank
    assert multi == single
