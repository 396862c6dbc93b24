"""Tiny random Hugging Face models with real tokenizers, saved like hub checkpoints, for tests of
`finetune` that use them exactly as a user would use `gpt2`, `t5-small`, `bart-base` or `opus-mt`.

The tokenizer is a byte-level BPE trained in milliseconds on a few sentences (the same class of
tokenizer as GPT-2's/BART's), so no file from the hub is needed.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, MarianConfig,
                          MarianMTModel, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)

_TEXT = ("English: I am happy. French: Je suis content.\nEnglish: The cat sleeps. French: Le chat dort.\n"
         "summarize: the meeting is moved to friday. TL;DR: meeting moved\nContext: Paris is in France. "
         "Question: Where is Paris? Answer: France\n") * 20


def tiny_tokenizer(directory: Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_TEXT], vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<pad>", "</s>", "<s>", "<unk>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                  unk_token="<unk>")
    tok.save_pretrained(directory)
    return tok


def save_tiny_model(kind: str, directory: Path) -> Path:
    """``kind`` in gpt2 | t5 | bart | marian | rnn: a small (width-32) random model + tokenizer in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(directory)
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    v = len(tok)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids))
    elif kind == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=v, d_model=32, d_ff=64, d_kv=16, num_layers=2,
                                                    num_heads=2, decoder_start_token_id=tok.pad_token_id, **ids))
    elif kind == "bart":
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
            decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None, **ids))
    elif kind == "marian":
        model = MarianMTModel(MarianConfig(
            vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
            decoder_start_token_id=tok.pad_token_id, **ids))
    elif kind == "rnn":  # our GRU seq2seq with Bahdanau attention (finetune/rnn), as a fine-tuned one is saved
        from finetune.rnn import RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration

        model = RNNSeq2SeqForConditionalGeneration(RNNSeq2SeqConfig(vocab_size=v, embedding_dim=32, hidden_size=32,
                                                                    decoder_start_token_id=tok.pad_token_id, **ids))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    model.generation_config.max_length = None
    model.save_pretrained(directory)
    return directory
