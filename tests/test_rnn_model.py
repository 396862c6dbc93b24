"""RNN seq2seq baselines (finetune/rnn): attention, packing, generation with/without cache, Auto round trip."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

# importing finetune.rnn registers rnn_seq2seq with the Auto classes
from finetune.rnn import BahdanauAttention, LuongAttention, RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration
from finetune.rnn.encoder import Encoder

PAD, EOS, START = 0, 1, 2
V = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: threads only add contention on the shared cores (seconds per test instead of ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0, sharpen: float = 1.0, **overrides) -> RNNSeq2SeqForConditionalGeneration:
    """A tiny random model; ``sharpen`` scales every weight so predictions vary with the input."""
    options = dict(vocab_size=V, embedding_dim=16, hidden_size=24, num_layers=2, cell="gru", bidirectional=True,
                   attention="bahdanau", dropout=0.0, pad_token_id=PAD, eos_token_id=EOS,
                   decoder_start_token_id=START, bos_token_id=START)
    options.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("rnn_seq2seq", **options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(sharpen)
    return model


def source_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """3 right-padded sources of lengths 6, 3, 1: input_ids (3, 6), attention_mask (3, 6)."""
    ids = torch.tensor([[5, 9, 13, 7, 21, 8], [11, 4, 30, PAD, PAD, PAD], [17, PAD, PAD, PAD, PAD, PAD]])
    return ids, ids.ne(PAD).long()


ALL_DECODERS = [dict(attention="none"), dict(attention="bahdanau"), dict(attention="luong_dot"),
                dict(attention="luong_general"), dict(attention="luong_general", input_feeding=True, cell="lstm"),
                dict(attention="luong_dot", input_feeding=True)]


# ----------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("kind", ["bahdanau", "general", "dot"])
def test_attention_weights_sum_to_one_and_skip_padding(kind):
    torch.manual_seed(0)
    query_size = 20 if kind == "dot" else 12  # H_enc = 20
    attention = BahdanauAttention(12, 20, 8) if kind == "bahdanau" else LuongAttention(query_size, 20, kind)
    query, keys = torch.randn(3, query_size), torch.randn(3, 5, 20)  # (B, H_dec), (B, S, H_enc)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    context, weights = attention(query, keys, mask)  # (B, H_enc), (B, S)
    assert context.shape == (3, 20) and weights.shape == (3, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert torch.all(weights[~mask] == 0)  # exactly zero, not just small
    torch.testing.assert_close(context, torch.einsum("bs,bsh->bh", weights, keys))
    # a precomputed key projection, and a (B, T, H) query, give the same numbers
    again, _ = attention(query, keys, mask, projected_keys=attention.project_keys(keys))
    torch.testing.assert_close(again, context)
    steps, step_weights = attention(query[:, None].expand(3, 4, -1), keys, mask)  # T = 4
    assert steps.shape == (3, 4, 20) and step_weights.shape == (3, 4, 5)
    torch.testing.assert_close(step_weights[:, 2], weights)


def test_luong_dot_rejects_size_mismatch():
    with pytest.raises(ValueError, match="query_size == key_size"):
        LuongAttention(12, 20, "dot")


# ------------------------------------------------------------------------------------------- encoder

@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_packed_encoder_matches_each_sentence_alone(cell):
    model = make_model(cell=cell)
    encoder: Encoder = model.encoder
    ids, mask = source_batch()
    batch = encoder(ids, mask)
    for b, length in enumerate(mask.sum(1).tolist()):
        alone = encoder(ids[b:b + 1, :length], mask[b:b + 1, :length])  # no padding at all
        torch.testing.assert_close(batch.last_hidden_state[b, :length], alone.last_hidden_state[0])
        torch.testing.assert_close(batch.final_hidden[b], alone.final_hidden[0])
        if cell == "lstm":
            torch.testing.assert_close(batch.final_cell[b], alone.final_cell[0])
        assert torch.all(batch.last_hidden_state[b, length:] == 0)


def test_empty_or_left_padded_sources_raise_clear_errors():
    model = make_model()
    ids, mask = source_batch()
    ids[1], mask[1] = PAD, 0
    with pytest.raises(ValueError, match=r"empty source sentence\(s\) at batch index \[1\]"):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :2])
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=torch.tensor([[PAD, 5, 6]]), attention_mask=torch.tensor([[0, 1, 1]]),
              decoder_input_ids=torch.tensor([[START]]))


# ------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("attention,cell,bidirectional",
                         list(itertools.product(["none", "bahdanau", "luong_dot", "luong_general"], ["gru", "lstm"],
                                                [False, True])))
def test_every_combination_trains(attention, cell, bidirectional):
    feeds = [False, True] if attention.startswith("luong") else [False]
    for input_feeding, ratio in itertools.product(feeds, [1.0, 0.5]):
        model = make_model(attention=attention, cell=cell, bidirectional=bidirectional, input_feeding=input_feeding,
                           teacher_forcing_ratio=ratio, dropout=0.1, tie_embeddings=True).train()
        ids, mask = source_batch()
        labels = torch.tensor([[5, 6, EOS], [7, EOS, -100], [EOS, -100, -100]])
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == (3, 3, V) and torch.isfinite(out.loss)
        out.loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"parameters without gradient: {missing}"


def test_loss_shifts_labels_and_ignores_minus_100():
    model = make_model()
    ids, mask = source_batch()
    labels = torch.tensor([[5, 6, EOS], [7, EOS, -100], [EOS, -100, -100]])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    decoder_input_ids = torch.tensor([[START, 5, 6], [START, 7, EOS], [START, EOS, PAD]])
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(out.logits, logits)
    keep = labels != -100
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits[keep], labels[keep]))


@pytest.mark.parametrize("options", ALL_DECODERS, ids=lambda o: "-".join(map(str, o.values())))
def test_cached_steps_equal_one_teacher_forced_pass(options):
    model = make_model(sharpen=3.0, **options)
    ids, mask = source_batch()
    target = torch.tensor([[START, 5, 6, 7], [START, 9, EOS, PAD], [START, 3, 3, 8]])
    full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target, output_attentions=True)
    encoder_outputs, cache, logits, weights = model.encoder(ids, mask), None, [], []
    for t in range(target.shape[1]):
        out = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=target[:, t:t + 1],
                    cache=cache, use_cache=True, output_attentions=True)
        cache = out.cache
        logits.append(out.logits)
        weights.append(None if out.cross_attentions is None else out.cross_attentions[0])
    # float32 round-off of step-by-step vs one-call recurrences (logits of size ~10 with sharpen=3)
    torch.testing.assert_close(torch.cat(logits, dim=1), full.logits, rtol=1e-4, atol=1e-4)
    if options["attention"] == "none":
        assert full.cross_attentions is None
    else:
        cross = full.cross_attentions[0]  # (B, T, S): one source distribution per target position
        assert cross.shape == (3, 4, 6)
        torch.testing.assert_close(torch.cat(weights, dim=1), cross)
        torch.testing.assert_close(cross.sum(-1), torch.ones(3, 4))
        assert torch.all(cross.masked_select(~mask.bool()[:, None, :]) == 0)


def test_teacher_forcing_ratio_zero_feeds_own_predictions():
    model = make_model(sharpen=3.0, teacher_forcing_ratio=0.0).train()  # dropout 0: deterministic
    ids, mask = source_batch()
    labels = torch.tensor([[5, 6, 7, EOS]] * 3)
    logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    own = torch.cat([torch.full((3, 1), START), logits[:, :-1].argmax(-1)], dim=1)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, decoder_input_ids=own).logits, logits)


# ---------------------------------------------------------------------------------------- generation

def greedy_by_hand(model, ids, mask, steps: int) -> torch.Tensor:
    """Argmax decoding with a full forward pass (no cache) per step, no EOS handling."""
    out = torch.full((ids.shape[0], 1), START)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out, use_cache=False).logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def test_greedy_generate_equals_num_beams_1_and_a_hand_loop():
    model = make_model(sharpen=3.0)
    model.decoder.output.bias.data[EOS] = -1e4  # never stop: compare full-length outputs
    ids, mask = source_batch()
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    beam1 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, num_beams=1)
    assert torch.equal(greedy, beam1)
    assert torch.equal(greedy, greedy_by_hand(model, ids, mask, 7))
    assert len({tuple(row) for row in greedy[:, 1:].tolist()}) > 1  # the inputs matter


@pytest.mark.parametrize("options", ALL_DECODERS, ids=lambda o: "-".join(map(str, o.values())))
def test_beam_search_with_cache_equals_without(options, monkeypatch):
    model = make_model(sharpen=3.0, cell=options.get("cell", "lstm"), **{k: v for k, v in options.items()
                                                                         if k != "cell"})
    ids, mask = source_batch()
    reorders = []
    original = model._reorder_cache
    monkeypatch.setattr(model, "_reorder_cache", lambda cache, idx: (reorders.append(idx), original(cache, idx))[1])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=4, num_return_sequences=2,
                  return_dict_in_generate=True, output_scores=True)
    cached = model.generate(**kwargs, use_cache=True)
    uncached = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.sequences.shape[0] == 3 * 2  # 2-best per source
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)
    assert any(not torch.equal(idx, torch.arange(len(idx))) for idx in reorders)  # beams really moved
    best = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=4)
    assert torch.equal(best, cached.sequences[::2, :best.shape[1]])


def test_eos_stops_generation():
    model = make_model()
    model.decoder.output.bias.data[EOS] = 100.0
    ids, mask = source_batch()
    for num_beams in (1, 4):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=num_beams)
        assert out.tolist() == [[START, EOS]] * 3


def test_generate_without_attention_mask_uses_the_encoders():
    model = make_model(sharpen=3.0)
    ids, mask = source_batch()
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, num_beams=2),
                       model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2))


@pytest.mark.parametrize("share", [False, True])
def test_resize_token_embeddings_resizes_both_embeddings(share):
    model = make_model(share_embeddings=share, tie_embeddings=True)
    model.resize_token_embeddings(V + 5, mean_resizing=False)
    assert model.config.vocab_size == V + 5
    for weight in (model.encoder.embedding.weight, model.decoder.embedding.weight, model.decoder.output.weight):
        assert weight.shape[0] == V + 5
    assert model.decoder.output.weight is (model.encoder if share else model.decoder).embedding.weight
    ids, mask = source_batch()
    assert model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits.shape == (3, 6, V + 5)


@pytest.mark.parametrize("num_beams", [0, -2])
def test_bad_beam_size_raises(num_beams):
    model = make_model()
    ids, mask = source_batch()
    with pytest.raises(ValueError, match=f"num_beams={num_beams} must be an integer >= 1"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=num_beams)


def test_save_and_load_through_auto_classes(tmp_path):
    model = make_model(sharpen=3.0, cell="lstm", attention="luong_general", input_feeding=True,
                       tie_embeddings=True, share_embeddings=True)
    assert model.decoder.output.weight is model.encoder.embedding.weight
    assert model.decoder.embedding.weight is model.encoder.embedding.weight
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is RNNSeq2SeqForConditionalGeneration and loaded.config.input_feeding
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.decoder.output.weight is loaded.encoder.embedding.weight
    loaded.eval()
    ids, mask = source_batch()
    labels = torch.tensor([[5, 6, EOS], [7, EOS, -100], [EOS, -100, -100]])
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, labels=labels).logits,
                               model(input_ids=ids, attention_mask=mask, labels=labels).logits, rtol=0, atol=0)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3)
    assert torch.equal(loaded.generate(**kwargs), model.generate(**kwargs))


# -------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("option,value", [("cell", "rnn"), ("attention", "dot"), ("dropout", 1.0),
                                          ("dropout", -0.1), ("teacher_forcing_ratio", 1.5), ("num_layers", 0),
                                          ("hidden_size", 0), ("input_feeding", True), ("pad_token_id", V),
                                          ("decoder_start_token_id", None)])
def test_bad_config_values_name_the_option(option, value):
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        RNNSeq2SeqConfig(**{"vocab_size": V, option: value})


def test_config_edited_after_construction_is_checked_when_building():
    config = RNNSeq2SeqConfig(vocab_size=V)
    config.cell = "transformer"
    with pytest.raises(ValueError, match=r"cell='transformer' is not one of \('gru', 'lstm'\)"):
        RNNSeq2SeqForConditionalGeneration(config)


@pytest.mark.parametrize("cell,attention", [("gru", "luong_dot"), ("lstm", "bahdanau")])
def test_learns_with_mostly_unused_vocabulary(cell, attention):
    """Regression: with a vocabulary much larger than the symbols in use, Adam first learns the target
    marginal; with the old uniform(-0.1, 0.1) init and a tanh pre-output that drove every pre-output
    unit into saturation within ~10 steps, all gradients below the output layer became 0 and the model
    never read the source again (loss stuck at ln(#symbols)). A reverse task must be learnable."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    vocab, symbols = 200, [2 + 19 * k for k in range(6)]  # 6 symbols spread over ids 2..97 of 200
    config = AutoConfig.for_model("rnn_seq2seq", vocab_size=vocab, embedding_dim=16, hidden_size=32, cell=cell,
                                  attention=attention, dropout=0.0, pad_token_id=1, eos_token_id=0,
                                  decoder_start_token_id=0)
    model = AutoModelForSeq2SeqLM.from_config(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        src = torch.tensor(symbols)[torch.randint(len(symbols), (32, 4), generator=generator)]  # (B, 4)
        labels = torch.cat([src.flip(1), torch.zeros(32, 1, dtype=torch.long)], dim=1)  # reversed + EOS
        loss = model(input_ids=src, attention_mask=torch.ones_like(src), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    # ln(6) = 1.79 per symbol (ln(6) * 4/5 = 1.43 per token with the free EOS) is what ignoring the source gives
    assert sum(losses[-10:]) / 10 < 0.5, losses[-10:]
