"""Training FLOPs per token/example, peak FLOP/s per device, and a tokens/s + MFU callback.

FLOPs count a multiply-add as 2 and training as 3x the forward pass (backward = 2x forward), as
the PaLM paper (appendix B) and nanoGPT's ``estimate_mfu`` do. MFU = model FLOP/s / peak FLOP/s;
recomputation (activation checkpointing) is not model FLOPs and is not counted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def decoder_flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token of a decoder-only transformer: ``6*N + 12*L*d*T``. Use
    :func:`decoder_n_params` for ``N``.

    ``6*N``: each weight takes part in one multiply-add per token forward (2 FLOPs) and two
    backward (4 FLOPs). ``N`` excludes the position embeddings (a lookup, no matmul) but includes
    the token embedding once: tied or not, it is the output projection (``d x V`` per token).
    ``12*L*d*T``: per layer, ``Q @ K^T`` and ``A @ V`` cost ``2*T*d`` each forward, times 3 for
    training. Counted over the full ``T x T`` matrix, as PaLM does, although causal attention
    needs only half. Example, GPT-2 124M at ``T=1024``: 6*123.65e6 + 12*12*768*1024 = 0.855 GFLOPs.
    """
    _check_positive(n_params=n_params, n_layer=n_layer, d_model=d_model, seq_len=seq_len)
    return 6 * n_params + 12 * n_layer * d_model * seq_len


@dataclass(frozen=True)
class Seq2SeqShape:
    """What the encoder-decoder FLOPs formula needs from a model (:func:`seq2seq_shape` reads it).

    Args:
        n_params_encoder: encoder weights without embeddings; each runs once per input token.
        n_params_decoder: decoder weights plus the LM head, without the cross-attention K/V
            projections; each runs once per target token.
        n_params_cross_kv: the decoder's cross-attention K and V projections; they run over the
            ``T_in`` encoder states, once per input token, not per target token.
        n_layer_enc, n_layer_dec: blocks in each stack.
        attn_dim: width of the attention products, ``num_heads * d_kv`` (T5 decouples it from d_model).
    """

    n_params_encoder: int
    n_params_decoder: int
    n_params_cross_kv: int
    n_layer_enc: int
    n_layer_dec: int
    attn_dim: int


def seq2seq_flops_per_example(shape: Seq2SeqShape, in_len: int, out_len: int) -> int:
    """Training FLOPs for one (input, target) pair of an encoder-decoder (T5-style) model.

    ``F = 6*(N_enc*T_in + N_xkv*T_in + N_dec*T_out) + 12*a*(L_enc*T_in^2 + L_dec*T_out^2 + L_dec*T_out*T_in)``

    - ``6*N_enc*T_in``: encoder weights, once per input token (``N_enc`` without embeddings).
    - ``6*N_xkv*T_in``: the decoder's cross-attention K/V projections read the encoder states.
    - ``6*N_dec*T_out``: the other decoder weights plus the LM head (``d x V``, counted even if tied
      to the input embedding), once per target token.
    - Attention (as in :func:`decoder_flops_per_token`, ``12*a`` per key per query per layer, with
      ``a = num_heads * d_kv``): encoder self ``T_in x T_in``, decoder self ``T_out x T_out`` and
      cross ``T_out x T_in`` per layer.
    Divide by ``T_in + T_out`` for FLOPs per processed token. Checked against torch's
    ``FlopCounterMode`` in tests/test_throughput.py.
    """
    _check_positive(n_params_encoder=shape.n_params_encoder, n_params_decoder=shape.n_params_decoder,
                    n_layer_enc=shape.n_layer_enc, n_layer_dec=shape.n_layer_dec, attn_dim=shape.attn_dim,
                    in_len=in_len, out_len=out_len)
    matmuls = 6 * ((shape.n_params_encoder + shape.n_params_cross_kv) * in_len + shape.n_params_decoder * out_len)
    attention = 12 * shape.attn_dim * (shape.n_layer_enc * in_len**2
                                       + shape.n_layer_dec * (out_len**2 + out_len * in_len))
    return matmuls + attention


def _numel(p: torch.Tensor) -> int:
    # A ZeRO-3-partitioned parameter is an empty placeholder; DeepSpeed keeps the true size.
    return getattr(p, "ds_numel", p.numel())


def _params_without_embeddings(module: nn.Module, only_positions: bool = False) -> int:
    """Unique parameters minus nn.Embedding tables (with ``only_positions``: minus learned position
    tables only, i.e. modules named ``*wpe`` or ``*position*`` such as GPT-2's ``transformer.wpe``)."""
    skip = {id(p) for name, m in module.named_modules() for p in m.parameters(recurse=False)
            if isinstance(m, nn.Embedding)
            and (not only_positions or name.endswith("wpe") or "position" in name)}
    return sum(_numel(p) for p in module.parameters() if id(p) not in skip)  # parameters() dedupes ties


def decoder_n_params(model: nn.Module) -> int:
    """``N`` for :func:`decoder_flops_per_token`: all unique parameters but learned position tables."""
    return _params_without_embeddings(model, only_positions=True)


# Cross-attention K/V projections of the decoder, by HF naming: T5 `EncDecAttention.k/.v`, BART/Marian
# `encoder_attn.k_proj/.v_proj`.
_CROSS_KV = re.compile(r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj)$")


def seq2seq_shape(model: nn.Module) -> Seq2SeqShape:
    """:class:`Seq2SeqShape` of an HF T5-style encoder-decoder model (config ``num_layers``,
    ``num_decoder_layers``, ``num_heads``, ``d_kv``): the stacks without nn.Embedding tables
    (tokens, T5's relative-position buckets), the output projection in the decoder's count, the
    cross-attention K/V projections apart."""
    config = model.config
    decoder = model.get_decoder()
    cross_kv = sum(_numel(p) for name, m in decoder.named_modules() if _CROSS_KV.search(name)
                   for p in m.parameters(recurse=False))
    head = model.get_output_embeddings()
    n_dec = _params_without_embeddings(decoder) - cross_kv + sum(_numel(p) for p in head.parameters())
    n_layer_enc = config.num_layers
    n_heads, d_kv = config.num_heads, getattr(config, "d_kv", config.d_model // config.num_heads)
    return Seq2SeqShape(n_params_encoder=_params_without_embeddings(model.get_encoder()), n_params_decoder=n_dec,
                        n_params_cross_kv=cross_kv, n_layer_enc=n_layer_enc,
                        n_layer_dec=getattr(config, "num_decoder_layers", None) or n_layer_enc,
                        attn_dim=n_heads * d_kv)


# Lightning precision flag ("bf16-mixed", "16-true", "32-true", 32, ...) -> matmul dtype.
_PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}
_PRECISION_DTYPES |= {f"{k}-{mode}": v for k, v in _PRECISION_DTYPES.items() for mode in ("mixed", "true")}

# Dense (no 2:4 sparsity) Hopper peaks in FLOP/s by form factor, (fp32, tf32, bf16 = fp16), from
# NVIDIA's H100/H200 datasheets (whose headline tensor figures are sparse: twice these). H100 and
# H200 share the compute. Not Lightning's table: 2.6 lists the sparse H200 and H100-NVL figures and
# has no entry for the plain "NVIDIA H200" name of the SXM part (it returns None).
_HOPPER_DENSE: dict[str, tuple[float, float, float]] = {
    "sxm": (67e12, 494.7e12, 989.4e12),
    "pcie": (51e12, 378e12, 756e12),
    "nvl": (60e12, 417.5e12, 835.5e12),
}


def _hopper_form_factor(device_name: str) -> str | None:
    """Key of _HOPPER_DENSE for a CUDA device name ("NVIDIA H100 80GB HBM3" is the SXM part)."""
    name = device_name.lower()
    if "h100" not in name and "h200" not in name:  # "gh200" counts: its GPU is an H100/H200 SXM
        return None
    return "nvl" if "nvl" in name else "pcie" if ("pcie" in name or "hbm2e" in name) else "sxm"


def peak_flops_per_device(device: torch.device, precision: str | int,
                          override: float | None = None) -> float | None:
    """Peak dense FLOP/s of one device at ``precision``; None when unknown (MFU then not reported).

    ``override`` (FLOP/s, > 0) wins. CPU: the matmul probe's fp32 or bf16 FLOP/s on this machine
    (`common.matmul_probe.cpu_peaks`, cached), None for other dtypes. Hopper GPUs use ``_HOPPER_DENSE``; other CUDA GPUs
    Lightning's ``get_available_flops``. fp32 counts as TF32 unless matmul precision is "highest".
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be > 0, got {override}")
        return float(override)
    if (dtype := _PRECISION_DTYPES.get(str(precision))) is None:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(_PRECISION_DTYPES)}")
    device = torch.device(device)
    if device.type == "cpu":  # no trustworthy table for CPUs: this machine's measured matmul peak
        from common.matmul_probe import cpu_peaks

        by_dtype = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed"}
        return cpu_peaks()[by_dtype[dtype]] if dtype in by_dtype else None
    if device.type == "cuda" and (form := _hopper_form_factor(torch.cuda.get_device_name(device))):
        fp32, tf32, half = _HOPPER_DENSE[form]
        if dtype is torch.float32:
            return fp32 if torch.get_float32_matmul_precision() == "highest" else tf32
        return half if dtype in (torch.bfloat16, torch.float16) else None
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, dtype)
    return None if flops is None else float(flops)


def batch_tokens(batch: Mapping[str, Any], encoder_decoder: bool = False) -> int:
    """Tokens of one micro-batch, padding included (the hardware runs it): ``input_ids.numel()``,
    plus for encoder-decoder models ``decoder_input_ids`` (or else ``labels``). Decoder-only
    ``labels`` are the inputs shifted, not extra tokens."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"SpeedMonitor needs dict batches with 'input_ids', got {type(batch).__name__}")
    n = batch["input_ids"].numel()
    if encoder_decoder:
        target = batch.get("decoder_input_ids", batch.get("labels"))
        n += 0 if target is None else target.numel()
    return int(n)


def _batch_flops_fn(pl_module: pl.LightningModule) -> Callable[[Any], float] | None:
    """The module's FLOPs protocol (see SpeedMonitor) as a function of a micro-batch, or None."""
    if callable(per_batch := getattr(pl_module, "flops_per_batch", None)):
        return per_batch
    if callable(per_token := getattr(pl_module, "flops_per_token", None)):
        return lambda batch: per_token(batch["input_ids"].shape[-1]) * batch["input_ids"].numel()  # (B, T)
    return None


class SpeedMonitor(pl.Callback):
    """Logs ``perf/tokens_per_sec``, ``perf/step_time_s`` and ``perf/mfu`` during training.

    Timing: wall time between optimizer-step ends (``time.perf_counter``, every rank), averaged
    over windows of ``log_every_n_steps`` optimizer steps (default: the Trainer's) that rank 0
    writes to every logger. The first step after fit start or resume only starts the clock
    (warmup, compile); validation-loop time is subtracted. The CUDA host runs ahead of the GPU,
    so ``torch.cuda.synchronize`` runs at window ends only: exact window times, negligible cost.
    Tokens: :func:`batch_tokens` per micro-batch times ``world_size`` (assumes equal batches on
    all ranks, true for fixed-shape DDP batches; saves an all-reduce).

    MFU protocol, one of two LightningModule methods: ``flops_per_batch(self, batch) -> float``,
    training FLOPs of one micro-batch on one rank (seq2seq needs this one, its FLOPs depend on
    both lengths: ``B*seq2seq_flops_per_example(...)``), or decoder-only ``flops_per_token(self,
    seq_len: int) -> float`` (``decoder_flops_per_token(...)``), used as ``flops_per_token(T)*B*T``
    for ``(B, T) = input_ids.shape``. MFU = local FLOPs / (window time * peak) = global FLOP/s /
    (world_size * peak). Peak: ``peak_flops``, else :func:`peak_flops_per_device` for the root
    device and Trainer precision. Without peak or protocol, no MFU (said once in the log).

    Results for benchmarks: ``last_tokens_per_sec``, ``last_mfu`` and :meth:`summary` (its means
    cover all measured steps, including a final partial window).
    """

    def __init__(self, peak_flops: float | None = None, log_every_n_steps: int | None = None) -> None:
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.peak_flops = peak_flops
        self.log_every_n_steps = log_every_n_steps
        self.last_tokens_per_sec: float | None = None
        self.last_mfu: float | None = None
        self.total_tokens, self.total_time_s, self.measured_steps = 0, 0.0, 0  # global tokens
        self.total_flops = 0.0  # local FLOPs, like the peak
        self._peak: float | None = None
        self._encoder_decoder = self._cuda = False
        self._flops_fn: Callable[[Any], float] | None = None
        self._restart(0)

    def _restart(self, global_step: int) -> None:
        """Forget the open window; the next optimizer step only starts the clock."""
        self._last_step = global_step
        self._t0: float | None = None
        self._paused_s = 0.0
        self._val_t0: float | None = None
        self._pending = [0, 0.0]  # tokens, FLOPs of micro-batches since the last optimizer step
        self._window = [0, 0.0, 0]  # local tokens, local FLOPs, optimizer steps

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def summary(self) -> dict[str, float | None]:
        """Last-window and whole-run figures (None before the first measured window)."""
        t = self.total_time_s
        mean_mfu = self.total_flops / (t * self._peak) if t > 0 and self._peak and self.total_flops else None
        return {
            "tokens_per_sec_last": self.last_tokens_per_sec,
            "tokens_per_sec_mean": self.total_tokens / t if t > 0 else None,
            "step_time_s_mean": t / self.measured_steps if self.measured_steps else None,
            "mfu_last": self.last_mfu,
            "mfu_mean": mean_mfu,
            "steps_measured": self.measured_steps,
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        self._cuda = device.type == "cuda"
        config = getattr(getattr(pl_module, "model", None), "config", None)
        self._encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self._peak = peak_flops_per_device(device, trainer.precision, self.peak_flops)
        self._flops_fn = _batch_flops_fn(pl_module)
        if self._peak is None or self._flops_fn is None:
            why = (f"no peak FLOP/s known for {device} at {trainer.precision} (pass peak_flops=...)"
                   if self._peak is None else f"{type(pl_module).__name__} defines neither "
                   "flops_per_batch(batch) nor flops_per_token(seq_len)")
            rank_zero_info(f"SpeedMonitor: perf/mfu is not logged: {why}.")
            self._flops_fn = None
        self._restart(trainer.global_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None and not trainer.sanity_checking:
            self._val_t0 = self._now()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_t0 is not None:
            self._paused_s += self._now() - self._val_t0
            self._val_t0 = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._pending[0] += batch_tokens(batch, self._encoder_decoder)
        if self._flops_fn is not None:
            self._pending[1] += float(self._flops_fn(batch))
        if trainer.global_step == self._last_step:
            return  # gradient accumulation: no optimizer step yet
        self._last_step = trainer.global_step
        (tokens, flops), self._pending = self._pending, [0, 0.0]
        if self._t0 is None:
            self._t0 = self._now()  # first step after (re)start: warmup, not measured
            return
        self._window = [self._window[0] + tokens, self._window[1] + flops, self._window[2] + 1]
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if every > 0 and trainer.global_step % every == 0:
            metrics = self._close_window(trainer.world_size)
            # Straight to the loggers, as LearningRateMonitor does: pl_module.log would re-write a
            # stale window at every Lightning flush in between. Same step axis as self.log.
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers if trainer.is_global_zero else ():
                logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None and self._window[2] > 0:
            self._close_window(trainer.world_size)  # the final partial window, for summary()

    def _close_window(self, world_size: int) -> dict[str, float]:
        """Fold the open window into the totals; return its metrics."""
        now = self._now()
        dt = max(now - self._t0 - self._paused_s, 1e-9)
        tokens, flops, steps = self._window
        self._t0, self._paused_s, self._window = now, 0.0, [0, 0.0, 0]
        self.last_tokens_per_sec = tokens * world_size / dt
        self.total_tokens += tokens * world_size
        self.total_time_s += dt
        self.total_flops += flops
        self.measured_steps += steps
        metrics = {"perf/tokens_per_sec": self.last_tokens_per_sec, "perf/step_time_s": dt / steps}
        if self._peak is not None and flops > 0:
            self.last_mfu = flops / (dt * self._peak)
            metrics["perf/mfu"] = self.last_mfu
        return metrics
