"""Tokens/s and MFU of the Lightning pretraining step against a bare PyTorch loop, on this machine.

Both sides train the same model (same seed, so the same initial weights) on the same in-memory
random token batches with the same optimizer step: forward + loss, backward, clip_grad_norm_(1.0),
fused AdamW, warmup-cosine LR, zero_grad. Two families: GPT-2 (next-token cross-entropy on the
logits) and the T5 encoder-decoder (``model(input_ids=..., labels=...).loss``, span-corruption
shapes: encoder inputs and shorter decoder targets). The Lightning side fits the project's real
``CausalLMSystem`` / ``SpanCorruptionSystem`` (its logging and grad-norm clipping hook included)
with the project's ``SpeedMonitor``; the bare side does the same by hand (Lightning's overhead).
The peers (``--peers``) train the shape as transformers builds it by default: ``bare_hf``, the bare
loop, and ``hf_trainer``, the Trainer as run_clm.py sets it up (benchmarks/hf_trainer_worker.py).
Per round all run back to back in this process, the order rotating, so all see the same machine.

Time per optimizer step = wall time between the ends of consecutive steps (what SpeedMonitor
measures), so every per-step cost of either loop (data fetch, hooks, logging, LR step) counts.
The first ``--warmup`` steps of every run are not measured. Peak FLOP/s for MFU comes from a
matmul probe in the same run.

    python benchmarks/pretrain_step.py                      # all four models, default rounds
    python benchmarks/pretrain_step.py --models gpt-tiny --rounds 2 --steps 20
"""

from __future__ import annotations

import os
import sys

# glibc reads MALLOC_* and OpenMP reads OMP_WAIT_POLICY at process start, so set them by
# re-executing once. PASSIVE: with the default spin-wait, a step whose second core is taken by the
# hypervisor ran 3-14x slower and erratically; the MALLOC settings keep freed memory in-process
# (memory given back to the kernel was ~20x slower to touch again). See notes stack-on-cpu §10.
_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}
if __name__ == "__main__" and any(k not in os.environ for k in _ENV):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**_ENV, **os.environ})

import argparse  # noqa: E402 - after the re-exec on purpose
import datetime as dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from common.archs import GPT2Arch, T5Arch  # noqa: E402
from common.matmul_probe import PROBE_PRECISIONS, faster_precision, matmul_peak  # noqa: E402
from common.optim import build_adamw, build_warmup_cosine  # noqa: E402
from common.throughput import SpeedMonitor, seq2seq_flops_per_example, seq2seq_shape  # noqa: E402
from pretrain.span_corruption import compute_input_and_target_lengths  # noqa: E402
from pretrain.system import CausalLMSystem, PretrainSystem, SpanCorruptionSystem  # noqa: E402
from hf_trainer_worker import available as hf_trainer_available, hf_default_model, run_hf_trainer  # noqa: E402
from step_report import FLOOR, NOTES, busy_processes, finish_peaks, machine, markdown, summarize  # noqa: E402 - beside this script

# Per run: measured steps and unmeasured warm-up steps: 15-35 s per run on this VM with both cores,
# about twice that with one (a round is two runs; the whole default set takes 10-15 min).
DEFAULT_STEPS = {"gpt-tiny": 60, "gpt-4l256d": 40, "gpt2-124m": 8, "t5-tiny": 120, "t5-small": 28}
HF_PEERS = ("bare_hf", "hf_trainer")  # peers: benchmarks/hf_trainer_worker.py
DEFAULT_WARMUP = {"gpt-tiny": 3, "gpt-4l256d": 3, "gpt2-124m": 2, "t5-tiny": 3, "t5-small": 2}


@dataclass(frozen=True)
class Case:
    """One benchmarked model: shape, batch, precision and optimizer settings.

    GPT-2: ``seq_len`` tokens in, ``seq_len`` next-token targets (the same tokens shifted, not
    extra work). T5 (``arch`` a ``T5Arch``): ``seq_len`` encoder inputs and ``target_len`` decoder
    targets (labels; the decoder reads them shifted right), both processed tokens.
    """

    arch: GPT2Arch | T5Arch
    n_tokens: int  # tokenizer length; the model pads it to a multiple of 64
    batch_size: int
    seq_len: int
    precision: str
    lr: float
    target_len: int = 0  # T5 only: decoder targets per example
    compile: bool = False  # --compile: torch.compile our model (bare + Lightning); the peers stay eager

    @property
    def seq2seq(self) -> bool:
        return isinstance(self.arch, T5Arch)

    @property
    def tokens_per_step(self) -> int:
        """Processed tokens per optimizer step, counted as SpeedMonitor does (T5: inputs + targets)."""
        return self.batch_size * (self.seq_len + (self.target_len if self.seq2seq else 0))

    @property
    def shape(self) -> str:
        return (f"{self.batch_size}×({self.seq_len}+{self.target_len})" if self.seq2seq
                else f"{self.batch_size}×{self.seq_len}")


# T5 span-corruption lengths (noise density 0.15, mean span 3: the data module's defaults): a
# 141-token raw window with 21 noise tokens in 7 spans -> 120 + 7 sentinels + EOS = 128 encoder
# inputs and 21 + 7 sentinels + EOS = 29 decoder targets.
_T5_IN = 128
_T5_OUT = compute_input_and_target_lengths(_T5_IN, 0.15, 3.0)[1]

CASES: dict[str, Case] = {
    # configs/pretrain/gpt-tiny.yaml. Precision "auto" everywhere: what the CLI picks on this CPU
    # (bf16-mixed where the bf16 matmul probe beats fp32, i.e. AVX-512 BF16 / AMX; else 32-true).
    "gpt-tiny": Case(GPT2Arch(n_layer=4, n_head=4, n_embd=128, n_positions=256), 4096, 16, 128, "auto", 2e-3),
    # The small shape: 4 layers of width 256, T=256, B=8 (gpt-tiny's tokenizer).
    "gpt-4l256d": Case(GPT2Arch(n_layer=4, n_head=4, n_embd=256, n_positions=256), 4096, 8, 256, "auto", 2e-3),
    # configs/pretrain/gpt2-124m.yaml shape with GPT-2's 50,257 tokens + pad (-> 50,304). Batch cut
    # from 8x1024 (x8 accumulation) to 4x256 so a round takes 1-2 minutes on 2 cores.
    "gpt2-124m": Case(GPT2Arch(), 50258, 4, 256, "auto", 6e-4),
    # configs/pretrain/t5-tiny.yaml: 2+2 layers, d=128, gated-GELU d_ff=256, 4 heads x 32; 4,096 BPE
    # + 100 sentinels = 4,196 ids (-> 4,224); B=16, 128 inputs + 29 targets.
    "t5-tiny": Case(T5Arch(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=2), 4196, 16, _T5_IN,
                    "auto", 2e-3, _T5_OUT),
    # configs/pretrain/t5-small.yaml (T5Arch defaults: 8+8 layers, d=512, d_ff=1024, 6 heads x 64)
    # with GPT-2's 50,257 tokens + pad + 100 sentinels = 50,358 ids (-> 50,368). Batch cut from
    # 64x512 inputs (x4 GPUs x2 accumulation) to 2 x (128 + 29) so a round takes 1-2 minutes on 2 cores.
    "t5-small": Case(T5Arch(), 50358, 2, _T5_IN, "auto", 1e-3, _T5_OUT),
}


# ---- inputs ---------------------------------------------------------------------------------
def make_tokenizer(n_tokens: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``n_tokens`` ids (0 = EOS, 1 = pad): all the system
    needs from one is its length, EOS/pad ids and a fingerprint, not real merges."""
    from tokenizers import Tokenizer, models

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1} | {f"t{i}": i for i in range(2, n_tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|pad|>")


def make_loader(case: Case, n_batches: int, seed: int) -> DataLoader:
    """``n_batches`` fixed random batches in memory, one per step: GPT-2 ``{"input_ids", "targets"}``
    (B, T); T5 ``{"input_ids": (B, T_in), "labels": (B, T_out)}``, the span-corruption shapes (the
    cost depends on shapes only). Every loop iterates a DataLoader over the same list (no collation)."""
    g = torch.Generator().manual_seed(seed)
    # Ordinary token ids only (not EOS 0 / pad 1, nor the padded ids no tokenizer emits).
    if case.seq2seq:
        inputs = torch.randint(2, case.n_tokens, (n_batches, case.batch_size, case.seq_len), generator=g)
        labels = torch.randint(2, case.n_tokens, (n_batches, case.batch_size, case.target_len), generator=g)
        batches = [{"input_ids": i, "labels": lab} for i, lab in zip(inputs, labels)]
    else:
        seqs = torch.randint(2, case.n_tokens, (n_batches, case.batch_size, case.seq_len + 1), generator=g)
        batches = [{"input_ids": s[:, :-1].contiguous(), "targets": s[:, 1:].contiguous()} for s in seqs]
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


def fresh_system(case: Case, tokenizer: PreTrainedTokenizerFast, seed: int, max_steps: int) -> PretrainSystem:
    """The project's system with its model built now (same seed -> same weights on every side; a
    built ``system.model`` makes ``configure_model`` a no-op, so no data module is needed)."""
    # LR warmup over the first quarter: the schedule needs max_steps > warmup; speed ignores the LR.
    system_cls = SpanCorruptionSystem if case.seq2seq else CausalLMSystem
    system = system_cls(arch=case.arch, lr=case.lr, warmup_steps=max_steps // 4, compile=case.compile)
    torch.manual_seed(seed)
    system.build(tokenizer, case.seq_len)  # what configure_model does with the data module's inputs
    return system


def flops_per_step(case: Case, system: PretrainSystem) -> float:
    """Training FLOPs of one optimizer step (one micro-batch), as SpeedMonitor counts them.

    GPT-2: ``flops_per_token(T)·B·T`` (6N + 12·L·d·T per token). T5: ``B·seq2seq_flops_per_example``
    (6·((N_enc + N_xkv)·T_in + N_dec·T_out) + attention), computed here from its inputs and checked against
    ``SpanCorruptionSystem.flops_per_batch``, which SpeedMonitor uses on the Lightning side.
    """
    if not case.seq2seq:
        return system.flops_per_token(case.seq_len) * case.batch_size * case.seq_len
    flops = case.batch_size * seq2seq_flops_per_example(seq2seq_shape(system.model), case.seq_len, case.target_len)
    batch = {"input_ids": torch.zeros(case.batch_size, case.seq_len, dtype=torch.long),
             "labels": torch.zeros(case.batch_size, case.target_len, dtype=torch.long)}
    assert system.flops_per_batch(batch) == flops, (system.flops_per_batch(batch), flops)
    return flops


# ---- the two loops --------------------------------------------------------------------------
@dataclass
class RunResult:
    """Step-end timestamps (wall and process CPU) and the final loss of one run."""

    ends: list[float]
    cpu_ends: list[float]
    last_loss: float
    speed_monitor: dict[str, Any] | None = None
    waits: list[float] | None = None  # per step: seconds from the previous step's end to this batch in hand


def run_bare(case: Case, system: PretrainSystem, loader: DataLoader, max_steps: int) -> RunResult:
    """What Lightning does per optimizer step under automatic optimization, by hand."""
    model = system.model
    model.train()
    hp = system.hparams
    opt = build_adamw(model, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas), fused=hp.fused_adamw)
    sched = build_warmup_cosine(opt, hp.warmup_steps, max_steps, hp.min_lr_ratio)
    # Lightning's bf16-mixed wraps only training_step (forward + loss) in autocast, not backward.
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if case.precision == "bf16-mixed" else nullcontext
    ends, cpu_ends, waits, loss = [], [], [], torch.tensor(math.nan)
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        waits.append(time.perf_counter() - t0)
        with autocast():
            if case.seq2seq:  # HF T5: decoder inputs = labels shifted right; mean CE over the labels
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            else:
                logits = model(input_ids=batch["input_ids"]).logits
                loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())
    return RunResult(ends, cpu_ends, float(loss.detach()), waits=waits)


class StepClock(pl.Callback):
    """Step-end timestamps, taken the same way as in ``run_bare`` (last callback: sees them all)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.waits: list[float] = []  # previous step's end -> this batch's start: fetch + loop hooks
        self.last_loss = math.nan

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.ends:
            self.waits.append(time.perf_counter() - self.ends[-1])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.last_loss = float(outputs["loss"].detach())


def run_lightning(case: Case, system: PretrainSystem, loader: DataLoader, max_steps: int,
                  peak_flops: float) -> RunResult:
    """Fit the real system with the Trainer settings of a run, minus checkpoints and loggers."""
    clock, speed = StepClock(), SpeedMonitor(peak_flops=peak_flops)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=case.precision, max_steps=max_steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, gradient_clip_val=1.0, callbacks=[speed, clock],
    )
    trainer.fit(system, train_dataloaders=loader)
    return RunResult(clock.ends, clock.cpu_ends, clock.last_loss, speed.summary(), waits=[0.0, *clock.waits])


# ---- measurement ----------------------------------------------------------------------------
def steady_state(run: RunResult, warmup: int, tokens_per_step: int, flops_per_step: float,
                 peak: float) -> dict[str, float]:
    """Tokens/s, MFU and busy cores over the steps after the first ``warmup`` (end-to-end)."""
    steps = len(run.ends) - 1 - warmup  # intervals after the warm-up step ends
    wall = run.ends[-1] - run.ends[warmup]
    cpu = run.cpu_ends[-1] - run.cpu_ends[warmup]
    # Wait of the steps measured (step i's wait is before its end i): the data path's share of the time.
    wait = sum(run.waits[warmup + 1:]) / wall if run.waits else math.nan
    return {"tokens_per_s": steps * tokens_per_step / wall, "tokens_per_cpu_s": steps * tokens_per_step / cpu,
            "loader_wait": wait, "step_s": wall / steps, "mfu": steps * flops_per_step / wall / peak,
            "busy_cores": cpu / wall, "steps": steps, "last_loss": run.last_loss}


def bench_case(name: str, case: Case, rounds: int, steps: int, warmup: int, peaks: dict[str, float],
               seed: int, peers: tuple[str, ...] = ()) -> dict[str, Any]:
    """``rounds`` x (bare, Lightning, ``peers``), the order rotating; per-run figures and their summary."""
    # "auto": bf16-mixed where the bf16 matmul probe beats fp32 (AVX-512 BF16 / AMX CPUs), else 32-true.
    case = replace(case, precision=faster_precision(peaks) if case.precision == "auto" else case.precision)
    tokenizer = make_tokenizer(case.n_tokens)
    max_steps = warmup + 1 + steps  # step 0..warmup are not measured (the clock starts at step `warmup`)
    peak = peaks[case.precision]
    probe = fresh_system(case, tokenizer, seed, max_steps)
    vocab = probe.model.config.vocab_size
    step_flops = flops_per_step(case, probe)
    n_params = sum(p.numel() for p in probe.model.parameters())  # tied embedding counted once
    del probe
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        sides = ("bare", "lightning", *peers)
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            gc.collect()
            system = fresh_system(case, tokenizer, seed, max_steps)  # fresh weights, same for every side
            if side in HF_PEERS:  # the same shape and weights as HF's defaults build it
                system.model = hf_default_model(system.model, seed)
            loader = make_loader(case, max_steps, seed)
            if side in ("bare", "bare_hf"):
                run = run_bare(case, system, loader, max_steps)
            elif side == "hf_trainer":
                run = run_hf_trainer(case, system, loader, max_steps, RunResult)
            else:
                run = run_lightning(case, system, loader, max_steps, peak)
            fig = steady_state(run, warmup, case.tokens_per_step, step_flops, peak)
            fig |= {"round": r, "side": side, "speed_monitor": run.speed_monitor}
            runs.append(fig)
            print(f"[{name}] round {r} {side:9s} {fig['tokens_per_s']:8.1f} tok/s  {fig['step_s']*1e3:8.1f} ms/step"
                  f"  MFU {fig['mfu']:.1%}  busy cores {fig['busy_cores']:.2f}  loader wait {fig['loader_wait']:.2%}"
                  f"  loss {fig['last_loss']:.5f}",
                  flush=True)
            del system, loader, run
    by = {s: [x for x in runs if x["side"] == s] for s in ("bare", "lightning", *peers)}
    ratios = [lt["tokens_per_s"] / b["tokens_per_s"] for b, lt in zip(by["bare"], by["lightning"])]
    # Against the fastest peer of the same round (the bare loop runs our own model: it measures
    # Lightning's overhead, not how fast a peer's user trains); without peers, against the bare loop.
    others = peers or ("bare",)
    best_ratios = [by["lightning"][i]["tokens_per_s"] / max(by[s][i]["tokens_per_s"] for s in others)
                   for i in range(rounds)]
    # Secondary: per CPU-second, which the hypervisor taking a core away does not move. It misses
    # single-threaded overhead that leaves the second core idle, so the floor uses wall time.
    cpu_ratios = [lt["tokens_per_cpu_s"] / b["tokens_per_cpu_s"] for b, lt in zip(by["bare"], by["lightning"])]
    losses = [x["last_loss"] for x in runs if x["side"] in ("bare", "lightning")]  # peers: other ops or labels
    return {
        "model": name, "family": "t5" if case.seq2seq else "gpt2", "precision": case.precision, "compiled": case.compile,
        "batch_size": case.batch_size, "seq_len": case.seq_len, "target_len": case.target_len if case.seq2seq else None,
        "shape": case.shape, "tokens_per_step": case.tokens_per_step, "vocab": vocab, "n_params": n_params,
        "flops_per_step": step_flops, "peak_flops": peak, "max_steps": max_steps, "warmup": warmup,
        "runs": runs, "ratios": ratios, "ratio_median": statistics.median(ratios), "peers": list(peers),
        "best_ratios": best_ratios, "best_ratio_median": statistics.median(best_ratios),
        "loader_wait_max": max(x["loader_wait"] for x in by["lightning"]),
        "cpu_ratios": cpu_ratios, "cpu_ratio_median": statistics.median(cpu_ratios),
        "pass": statistics.median(ratios) >= FLOOR,
        # Same weights, data and ops: the final losses must agree, or the loops differ.
        "loss_spread": max(losses) - min(losses),
        **{f"{s}_{k}": summarize([x[k] for x in by[s]]) for s in by for k in ("tokens_per_s", "mfu")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Writes the markdown results file and a .json twin next to it.")
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES), help="models to benchmark")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (bare, Lightning), order alternating")
    ap.add_argument("--steps", type=int, default=None,
                    help="measured steps per run (default: "
                    + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    ap.add_argument("--warmup", type=int, default=None,
                    help="unmeasured steps at the start of every run (default: "
                    + ", ".join(f"{k} {v}" for k, v in DEFAULT_WARMUP.items()) + ")")
    ap.add_argument("--seed", type=int, default=1234, help="weights and data seed (same for both loops)")
    ap.add_argument("--peers", nargs="*", default=list(HF_PEERS), choices=list(HF_PEERS),
                    help="other loops beside bare and Lightning, on HF's default model for the shape: "
                    "bare_hf (the bare loop), hf_trainer (needs accelerate: .[bench])")
    ap.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", *PROBE_PRECISIONS],
                    help="precision(s) to run every model at (auto: what the CLI picks on this CPU, by the probe)")
    ap.add_argument("--compile", action="store_true", help="--model.compile true for our model (warm-up covers the compile)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_step.md"), help="results file")
    args = ap.parse_args()
    if "hf_trainer" in args.peers and not hf_trainer_available():
        ap.error("--peers hf_trainer needs accelerate: pip install -e '.[bench]' (or pass --peers with none)")

    # Lightning's per-fit chatter (no GPU, tips, no val loader, few workers) would bury the figures.
    for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*no `val_dataloader`.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    t_start, busy_start, load_start = time.perf_counter(), busy_processes(), os.getloadavg()
    report: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]), "machine": machine((*_ENV, "OMP_NUM_THREADS")),
        "busy_start": busy_start, "load_start": " ".join(f"{x:.2f}" for x in load_start),
    }
    report["peaks"] = {p: matmul_peak(dtype) for p, dtype in PROBE_PRECISIONS.items()}
    print("peak FLOP/s: " + ", ".join(f"{k} {v/1e9:.3g} G" for k, v in report["peaks"].items()), flush=True)
    report["cases"] = [bench_case(name, replace(CASES[name], compile=args.compile, precision=precision), args.rounds,
                                  args.steps or DEFAULT_STEPS[name],
                                  DEFAULT_WARMUP[name] if args.warmup is None else args.warmup,
                                  report["peaks"], args.seed, tuple(args.peers))
                       for name in args.models for precision in args.precision]
    # Probe again: if the second core was away during the first probe, the peak was too low.
    report["peaks_end"] = {p: matmul_peak(dtype) for p, dtype in PROBE_PRECISIONS.items()}
    finish_peaks(report)
    peaks = report["peaks"]
    precision_note = (f"- Precision \"auto\" chose {faster_precision(peaks)}: bf16 matmul "
                      f"probe {peaks['bf16-mixed']/1e9:.3g} GFLOP/s vs fp32 {peaks['32-true']/1e9:.3g} GFLOP/s on this CPU.")
    report |= {"busy_end": busy_processes(), "wall_s": time.perf_counter() - t_start,
               "notes": [*NOTES, precision_note]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(report))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    for c in report["cases"]:
        print(f"{c['model']}: Lightning/bare median {c['ratio_median']:.3f} -> {'PASS' if c['pass'] else 'FAIL'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
