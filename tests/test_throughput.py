"""Tests for common.throughput: FLOPs formulas, peak lookup, SpeedMonitor in a tiny real fit."""

from __future__ import annotations

import csv
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from common.throughput import (
    SpeedMonitor,
    batch_tokens,
    decoder_flops_per_token,
    decoder_n_params,
    peak_flops_per_device,
    seq2seq_flops_per_example,
    seq2seq_shape,
)


def gpt2_params(d: int, n_layer: int, vocab: int) -> int:
    """Closed form without wpe: per block 12d^2 + 13d (2 LN + 4 Conv1D with biases), ln_f, wte."""
    return n_layer * (12 * d * d + 13 * d) + 2 * d + vocab * d


def test_decoder_flops_gpt2_124m_arithmetic():
    n = gpt2_params(768, 12, 50257)
    assert n == 123_653_376  # 124,439,808 with wpe (1024 x 768)
    # 6 * 123,653,376 = 741,920,256;  12 * 12 * 768 * 1024 = 113,246,208
    assert decoder_flops_per_token(n, 12, 768, 1024) == 855_166_464
    with pytest.raises(ValueError, match="seq_len must be > 0, got 0"):
        decoder_flops_per_token(n, 12, 768, 0)


def train_flops(model: torch.nn.Module, **inputs: torch.Tensor) -> int:
    """FLOPs torch counts for one forward + backward."""
    with FlopCounterMode(display=False) as counter:
        model(**inputs).loss.backward()
    return counter.get_total_flops()


def test_decoder_flops_match_tiny_gpt2_count():
    d, n_layer, vocab, b, t = 128, 2, 256, 2, 48
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=d, n_head=4, vocab_size=vocab, n_positions=t,
                                       bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    n = decoder_n_params(model)
    assert n == gpt2_params(d, n_layer, vocab)
    assert n == sum(p.numel() for p in model.parameters()) - t * d
    ids = torch.randint(0, vocab, (b, t))
    counted = train_flops(model, input_ids=ids, labels=ids)
    # The formula also counts biases and LayerNorm gains as matmul weights (13d of 12d^2 + 13d per block).
    assert b * t * decoder_flops_per_token(n, n_layer, d, t) == pytest.approx(counted, rel=0.02)


def tiny_t5(d: int = 64, d_kv: int = 32, heads: int = 4, enc: int = 2, dec: int = 3, vocab: int = 256):
    return T5ForConditionalGeneration(T5Config(
        num_layers=enc, num_decoder_layers=dec, d_model=d, d_ff=128, num_heads=heads, d_kv=d_kv,
        vocab_size=vocab, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager"))


def test_seq2seq_shape_counts_each_weight_once():
    d, a, d_ff, enc, dec, vocab = 64, 4 * 32, 128, 2, 3, 256
    shape = seq2seq_shape(tiny_t5(d, 32, 4, enc, dec, vocab))
    # Encoder block: q,k,v,o (4*d*a) + wi, wo (2*d*d_ff) + 2 RMSNorm; final norm.
    assert shape.n_params_encoder == enc * (4 * d * a + 2 * d * d_ff + 2 * d) + d
    # Decoder block: self q,k,v,o + cross q,o (the cross k,v apart) + FFN + 3 norms; final norm; head d*V.
    assert shape.n_params_cross_kv == dec * 2 * d * a
    assert shape.n_params_decoder == dec * (6 * d * a + 2 * d * d_ff + 3 * d) + d + vocab * d
    assert (shape.n_layer_enc, shape.n_layer_dec, shape.attn_dim) == (enc, dec, a)
    total = sum(p.numel() for p in tiny_t5(d, 32, 4, enc, dec, vocab).parameters())
    relative_bias = 2 * 32 * 4  # T5's relative-position bucket tables (encoder, decoder): lookups
    assert shape.n_params_encoder + shape.n_params_decoder + shape.n_params_cross_kv == total - relative_bias


@pytest.mark.parametrize("in_len,out_len", [(48, 12), (16, 40), (24, 24)])
def test_seq2seq_flops_match_torch_count(in_len: int, out_len: int):
    """T_in != T_out and num_heads * d_kv != d_model: the cross-attention K/V and the attention width
    are where an approximate formula goes wrong (t5-base MFU was 8% low)."""
    model, b, vocab = tiny_t5(), 2, 256
    shape = seq2seq_shape(model)
    ids, labels = torch.randint(2, vocab, (b, in_len)), torch.randint(2, vocab, (b, out_len))
    counted = train_flops(model, input_ids=ids, labels=labels)
    assert b * seq2seq_flops_per_example(shape, in_len, out_len) == pytest.approx(counted, rel=0.02)
    with pytest.raises(ValueError, match="out_len must be > 0, got -1"):
        seq2seq_flops_per_example(shape, in_len, -1)


def test_peak_flops_override_cpu_and_errors(monkeypatch):
    monkeypatch.setattr("common.matmul_probe.cpu_peaks", lambda: {"32-true": 2e11, "bf16-mixed": 3e11})
    assert peak_flops_per_device(torch.device("cpu"), "bf16-mixed") == 3e11  # this machine's probe
    assert peak_flops_per_device(torch.device("cpu"), "32") == 2e11
    assert peak_flops_per_device(torch.device("cpu"), "16-mixed") is None  # not probed
    assert peak_flops_per_device(torch.device("cpu"), "bf16-mixed", override=4.1e11) == 4.1e11
    with pytest.raises(ValueError, match="override must be > 0, got 0"):
        peak_flops_per_device(torch.device("cpu"), "32-true", override=0)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        peak_flops_per_device(torch.device("cpu"), "fp8")


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),  # the SXM part
    ("NVIDIA H100 PCIe", "16-mixed", 756e12),
    ("NVIDIA H100 NVL", "bf16-true", 835.5e12),
    ("NVIDIA H200", "bf16-mixed", 989.4e12),  # Lightning's table has no entry for this name
    ("NVIDIA H200 NVL", "bf16-mixed", 835.5e12),
    ("NVIDIA H200", "32-true", 67e12),  # torch's default fp32 matmul precision is "highest": no TF32
    ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),  # via Lightning's table
])
def test_peak_flops_cuda_names(monkeypatch, name, precision, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops_per_device(torch.device("cuda", 0), precision) == pytest.approx(expected)


def test_peak_flops_tf32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops_per_device(torch.device("cuda"), "32-true") == pytest.approx(494.7e12)


def test_batch_tokens():
    x = torch.zeros(2, 8, dtype=torch.long)
    y = torch.zeros(2, 3, dtype=torch.long)
    assert batch_tokens({"input_ids": x, "labels": x}) == 16  # decoder labels are the same tokens
    assert batch_tokens({"input_ids": x, "labels": y}, encoder_decoder=True) == 22
    assert batch_tokens({"input_ids": x, "decoder_input_ids": y, "labels": y}, encoder_decoder=True) == 22
    with pytest.raises(TypeError, match="got tuple"):
        batch_tokens((x, x))


class ToyLM(pl.LightningModule):
    """Embedding + linear LM over dict batches; optional slow validation."""

    FLOPS = 1e6

    def __init__(self, val_sleep_s: float = 0.0) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32)
        self.val_sleep_s = val_sleep_s

    def training_step(self, batch, batch_idx):
        logits = self.head(self.emb(batch["input_ids"]))  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten())

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_sleep_s)

    def flops_per_batch(self, batch) -> float:
        return self.FLOPS

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        batches = [{"input_ids": torch.randint(0, 32, (2, 8))} for _ in range(40)]  # 16 tokens each
        return torch.utils.data.DataLoader(batches, batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader([{"input_ids": torch.zeros(2, 8, dtype=torch.long)}], batch_size=None)


def fit(tmp_path, monitor: SpeedMonitor, module: pl.LightningModule, **kwargs) -> list[dict]:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=CSVLogger(tmp_path, name="m"),
                         callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(module)
    with open(trainer.logger.experiment.metrics_file_path) as f:
        return list(csv.DictReader(f))


def test_speed_monitor_logs_tokens_and_mfu(tmp_path):
    monitor = SpeedMonitor(peak_flops=1e12)
    rows = fit(tmp_path, monitor, ToyLM(), log_every_n_steps=1, accumulate_grad_batches=2, limit_val_batches=0)
    logged = [r for r in rows if r.get("perf/tokens_per_sec")]
    # Lightning writes step = global_step - 1; the first optimizer step (row 0) only starts the clock.
    assert [int(r["step"]) for r in logged] == [1, 2, 3, 4]
    assert all(float(r["perf/tokens_per_sec"]) > 0 and float(r["perf/mfu"]) > 0 for r in logged)
    s = monitor.summary()
    # 4 measured optimizer steps x 2 micro-batches x 16 tokens; the last window is closed at train end.
    assert s["steps_measured"] == 4 and monitor.total_tokens == 4 * 2 * 16
    assert monitor.total_flops == 4 * 2 * ToyLM.FLOPS
    assert s["tokens_per_sec_mean"] > 0 and s["mfu_mean"] > 0 and s["tokens_per_sec_last"] > 0


def test_speed_monitor_without_a_peak_logs_no_mfu(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("common.throughput.peak_flops_per_device", lambda *a: None)
    monitor = SpeedMonitor(log_every_n_steps=2)
    rows = fit(tmp_path, monitor, ToyLM(), log_every_n_steps=1, limit_val_batches=0)
    logged = [r for r in rows if r.get("perf/tokens_per_sec")]
    assert [int(r["step"]) for r in logged] == [1, 3]  # windows end at global_step 2 and 4
    assert "perf/mfu" not in rows[0] and monitor.summary()["mfu_mean"] is None
    assert caplog.text.count("perf/mfu is not logged") == 1


def test_speed_monitor_excludes_validation_time(tmp_path):
    monitor = SpeedMonitor()
    rows = fit(tmp_path, monitor, ToyLM(val_sleep_s=0.5), log_every_n_steps=1, val_check_interval=2)
    times = [float(r["perf/step_time_s"]) for r in rows if r.get("perf/step_time_s")]
    assert len(times) == 4 and max(times) < 0.25  # each toy step is ~ms; validation slept 0.5 s


class ToyTokenLM(ToyLM):
    """The decoder-only protocol: flops_per_token(seq_len) instead of flops_per_batch(batch)."""

    flops_per_batch = None

    def flops_per_token(self, seq_len: int) -> float:
        return 1000.0 * seq_len


def test_speed_monitor_flops_per_token_protocol(tmp_path):
    monitor = SpeedMonitor(peak_flops=1e12)
    rows = fit(tmp_path, monitor, ToyTokenLM(), log_every_n_steps=1, limit_val_batches=0)
    assert sum(1 for r in rows if r.get("perf/mfu")) == 4
    assert monitor.total_flops == 4 * (1000.0 * 8) * 16  # 4 measured steps x (B=2, T=8) tokens


def test_matmul_probe_measures_each_dtype_and_picks_the_faster() -> None:
    from common.matmul_probe import faster_precision, matmul_peak

    fp32 = matmul_peak(torch.float32, sizes=(64, 128), reps=2)
    assert 1e6 < fp32 < 1e14  # FLOP/s of a real matmul on any CPU, not 0 or inf
    assert faster_precision({"32-true": fp32, "bf16-mixed": fp32 / 2}) == "32-true"
    assert faster_precision({"32-true": fp32, "bf16-mixed": fp32 * 2}) == "bf16-mixed"


def test_speed_monitor_logs_mfu_on_cpu_from_the_probe(tmp_path, monkeypatch):
    monkeypatch.setattr("common.matmul_probe.cpu_peaks", lambda: {"32-true": 1e9, "bf16-mixed": 1e8})
    monitor = SpeedMonitor()
    rows = fit(tmp_path, monitor, ToyLM(), log_every_n_steps=1, limit_val_batches=0)
    assert sum(1 for r in rows if r.get("perf/mfu")) == 4 and monitor.summary()["mfu_mean"] > 0


@pytest.mark.parametrize(("peaks", "chosen"), [({"32-true": 2e11, "bf16-mixed": 1.4e9}, "32-true"),  # AVX2 only
                                                ({"32-true": 2e11, "bf16-mixed": 3.5e11}, "bf16-mixed")])  # AVX-512 BF16
def test_precision_auto_takes_the_faster_measured_precision_on_cpu(peaks, chosen, monkeypatch, caplog):
    from common.trainer import LMTrainer

    monkeypatch.delenv("LMTRAIN_CPU_PRECISION")
    monkeypatch.setattr("common.matmul_probe.cpu_peaks", lambda: peaks)
    trainer = LMTrainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.precision == chosen
    assert f"trainer.precision auto -> {chosen}: CPU matmul probe" in caplog.text


def test_cpu_probe_is_measured_once_per_machine(tmp_path, monkeypatch):
    import common.matmul_probe as probe

    monkeypatch.setenv("LMTRAIN_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(probe, "matmul_peak", lambda dtype, **kw: calls.append(dtype) or 1e9)
    first = probe.cpu_peaks()
    assert probe.cpu_peaks() == first == {"32-true": 1e9, "bf16-mixed": 1e9}
    assert len(calls) == 2  # fp32 and bf16, once: the second call read the cache
    assert probe.cpu_peaks(refresh=True) == first and len(calls) == 4


def test_the_cpu_probe_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """It can run in the middle of a fit (the first one on a machine): exact resume needs the RNG untouched."""
    import common.matmul_probe as probe

    monkeypatch.setenv("LMTRAIN_CACHE_DIR", str(tmp_path))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    probe.cpu_peaks(refresh=True)
    assert torch.equal(torch.rand(3), expected)
