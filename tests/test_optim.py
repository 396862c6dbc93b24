"""Tests for common.optim: decay groups on tiny GPT-2 / T5, the warmup-cosine schedule."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from common.optim import build_adamw, build_warmup_cosine, param_groups, warmup_cosine


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def tiny_t5() -> T5ForConditionalGeneration:
    cfg = T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16,
                   vocab_size=100, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg)


def group_names(model: torch.nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    """(decay names, no-decay names), each parameter under its first named_parameters() name."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    by_wd = {g["weight_decay"]: {name_of[id(p)] for p in g["params"]} for g in groups}
    return by_wd.get(0.1, set()), by_wd.get(0.0, set())


def test_gpt2_groups():
    model = tiny_gpt2()
    decay, no_decay = group_names(model, param_groups(model, 0.1))
    # 4 Conv1D matrices per block (c_attn, attn.c_proj, c_fc, mlp.c_proj) x 2 layers.
    assert decay == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert "transformer.wte.weight" in no_decay and "transformer.wpe.weight" in no_decay
    assert "transformer.h.0.ln_1.weight" in no_decay and "transformer.h.0.attn.c_attn.bias" in no_decay
    # Every trainable parameter exactly once.
    assert decay.isdisjoint(no_decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_tied_lm_head_is_an_embedding_in_one_group():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = param_groups(model, 0.1)
    hits = [g["weight_decay"] for g in groups for p in g["params"] if p is model.lm_head.weight]
    assert hits == [0.0]


def test_t5_groups_tied_and_untied():
    model = tiny_t5()
    decay, no_decay = group_names(model, param_groups(model, 0.1))
    # Encoder: q,k,v,o + wi,wo = 6 per block; decoder: 2x(q,k,v,o) + wi,wo = 10 per block.
    assert len(decay) == 2 * 6 + 2 * 10
    assert "shared.weight" in no_decay  # also is lm_head.weight and both embed_tokens
    assert "encoder.final_layer_norm.weight" in no_decay  # T5LayerNorm (RMSNorm)
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))

    # transformers 5 forces T5's tie_word_embeddings=True, so untie by hand (T5 v1.1 layout).
    untied = tiny_t5()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    decay_u, _ = group_names(untied, param_groups(untied, 0.1))
    assert decay_u == decay | {"lm_head.weight"}  # a separate output projection is a matrix


@pytest.mark.parametrize("cell", [torch.nn.GRU, torch.nn.LSTM])
def test_recurrent_matrices_decay_their_biases_do_not(cell: type) -> None:
    class Seq2Seq(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.rnn = cell(8, 16, num_layers=2, bidirectional=True)
            self.out = torch.nn.Linear(32, 50)

    model = Seq2Seq()
    decay, no_decay = group_names(model, param_groups(model, 0.1))
    matrices = {f"rnn.weight_{kind}_l{layer}{suffix}" for kind in ("ih", "hh") for layer in (0, 1)
                for suffix in ("", "_reverse")}
    assert decay == matrices | {"out.weight"}
    assert {"rnn.bias_ih_l0", "rnn.bias_hh_l1_reverse", "emb.weight", "out.bias"} <= no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_our_rnn_seq2seq_decays_its_cell_matrices() -> None:
    from finetune.rnn import RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration

    model = RNNSeq2SeqForConditionalGeneration(RNNSeq2SeqConfig(vocab_size=60, cell="lstm", attention="bahdanau",
                                                                 pad_token_id=0, eos_token_id=1))
    decay, _ = group_names(model, param_groups(model, 0.1))
    cell_matrices = {n for n, _ in model.named_parameters() if ".weight_ih" in n or ".weight_hh" in n}
    assert cell_matrices and cell_matrices <= decay


def test_frozen_params_left_out_and_bad_decay():
    model = tiny_gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    ids = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert id(model.transformer.wpe.weight) not in ids
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1"):
        param_groups(model, -1)


def test_build_adamw_steps():
    model = tiny_gpt2()
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    assert opt.param_groups[0]["fused"] == ("cpu" in _get_fused_kernels_supported_devices())
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not build_adamw(model, lr=1e-3, weight_decay=0.1, fused=False).param_groups[0]["fused"]
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        build_adamw(model, lr=0, weight_decay=0.1)


def test_schedule_values():
    w, m, lo = 10, 110, 0.1
    assert warmup_cosine(0, w, m, lo) == pytest.approx(1 / 11)
    assert warmup_cosine(5, w, m, lo) == pytest.approx(6 / 11)
    assert warmup_cosine(w, w, m, lo) == 1.0
    assert warmup_cosine(60, w, m, lo) == pytest.approx(lo + (1 - lo) * 0.5)  # cos(pi/2) = 0
    assert warmup_cosine(m, w, m, lo) == pytest.approx(lo)
    assert warmup_cosine(m + 500, w, m, lo) == lo
    assert warmup_cosine(0, 0, 10, 0.0) == 1.0  # no warmup: starts at the peak
    decay = [warmup_cosine(s, w, m, lo) for s in range(w, m + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    ramp = [warmup_cosine(s, w, m, lo) for s in range(w + 1)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))


@pytest.mark.parametrize("args, msg", [
    ((0, 10, 10, 0.1), r"max_steps \(10\) must be > warmup_steps \(10\)"),
    ((0, -1, 10, 0.1), "warmup_steps must be >= 0, got -1"),
    ((0, 1, 10, 1.5), r"min_lr_ratio must lie in \[0, 1\], got 1.5"),
    ((-1, 1, 10, 0.1), "step must be >= 0, got -1"),
])
def test_schedule_validation(args, msg):
    with pytest.raises(ValueError, match=msg):
        warmup_cosine(*args)


def test_scheduler_state_round_trip():
    def make():
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1.0)
        return opt, build_warmup_cosine(opt, warmup_steps=3, max_steps=20, min_lr_ratio=0.1)

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(warmup_cosine(7, 3, 20, 0.1))

    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain numbers only
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    for _ in range(5):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(warmup_cosine(12, 3, 20, 0.1))
    pickle.loads(pickle.dumps(sched))  # a partial, not a closure: the scheduler pickles
    assert not math.isnan(sched.get_last_lr()[0])
