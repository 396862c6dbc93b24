"""RNN encoder-decoder baselines as a Hugging Face seq2seq model (issue 6).

``RNNSeq2SeqForConditionalGeneration`` is a ``PreTrainedModel`` + ``GenerationMixin``: ``forward``
takes and returns what T5/BART do (``labels`` are shifted right with ``decoder_start_token_id``,
-100 is ignored by the loss), ``generate`` does greedy/beam search/sampling, and
``save_pretrained`` / ``AutoModelForSeq2SeqLM.from_pretrained`` round-trip once ``finetune.rnn`` is
imported (the import registers ``model_type = "rnn_seq2seq"`` with the Auto classes; no remote code).

Generation cache: ``forward`` returns an ``RNNDecoderCache`` (the decoder's recurrent state, the
Luong input-feed vector and the projected attention keys) as ``cache``; ``generate`` passes it back
with only the newest token, and ``_reorder_cache`` follows beam search. The encoder outputs are not
in the cache: ``generate`` passes ``encoder_outputs`` (expanded once per beam) at every step.

Attention weights for plotting: ``forward(..., output_attentions=True)`` returns
``cross_attentions = (weights (B, T, S),)``, row t being the source distribution used for target
position t (None with ``attention="none"``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import Seq2SeqLMOutput

from finetune.rnn.configuration_rnn_seq2seq import RNNSeq2SeqConfig
from finetune.rnn.decoder import Decoder, RNNDecoderCache
from finetune.rnn.encoder import Encoder, RNNEncoderOutput

# Initialisation (JoeyNMT-style): Glorot/Xavier-uniform for every weight matrix (one recurrent matrix
# per gate), N(0, 1) embeddings (PyTorch's default; zero padding row), zero biases. The former
# uniform(-0.1, 0.1) everywhere (Sutskever et al. / Luong et al., tuned for 1000-d layers and SGD) made
# all activations tiny at small sizes (encoder outputs ~0.005 for embedding_dim 32): the source signal
# was then negligible next to what Adam learns first, the target marginal, and training collapsed onto it.
EMBEDDING_STD = 1.0


def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """labels (B, T) -> decoder_input_ids (B, T): [start, y_1 .. y_{T-1}], -100 replaced by pad."""
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


class RNNSeq2SeqPreTrainedModel(PreTrainedModel):
    config_class = RNNSeq2SeqConfig
    base_model_prefix = ""
    main_input_name = "input_ids"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' `init` functions skip parameters already loaded by from_pretrained.
        if isinstance(module, (nn.Linear, nn.GRU, nn.LSTM, nn.Embedding)):
            gates = 3 if isinstance(module, nn.GRU) else 4 if isinstance(module, nn.LSTM) else 1
            for name, param in module.named_parameters(recurse=False):
                if name.startswith("bias"):
                    init.zeros_(param)
                elif isinstance(module, nn.Embedding):
                    init.normal_(param, 0.0, EMBEDDING_STD)
                elif not getattr(param, "_is_hf_initialized", False):
                    for gate in param.chunk(gates, dim=0):  # views: (gates * H, in) -> one (H, in) per gate
                        nn.init.xavier_uniform_(gate)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            if not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])


class RNNSeq2SeqForConditionalGeneration(RNNSeq2SeqPreTrainedModel, GenerationMixin):
    def __init__(self, config: RNNSeq2SeqConfig):
        config.check_options()  # the config may have been edited after construction
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # v5-style {target: source}; active only while config.tie_word_embeddings (the OR of both switches).
        tied = {}
        if config.share_embeddings:
            tied["decoder.embedding.weight"] = "encoder.embedding.weight"
        if config.tie_embeddings:
            tied["decoder.output.weight"] = ("encoder.embedding.weight" if config.share_embeddings
                                             else "decoder.embedding.weight")
        self._tied_weights_keys = tied
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own RNNDecoderCache, not a key/value DynamicCache

    def get_encoder(self, modality: str | None = None) -> Encoder:
        return self.encoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embedding = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.decoder.output = value

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        """transformers resizes the input (encoder) embedding and the output layer; the decoder embedding too."""
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        rows = embeddings.weight.shape[0]
        if self.decoder.embedding.num_embeddings != rows:
            self.decoder.embedding = self._get_resized_embeddings(self.decoder.embedding, rows,
                                                                  mean_resizing=mean_resizing)
        return embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, S), right-padded
        attention_mask: torch.Tensor | None = None,  # (B, S), 1 at real source tokens
        decoder_input_ids: torch.LongTensor | None = None,  # (B, T)
        decoder_attention_mask: torch.Tensor | None = None,  # unused: the decoder is causal, padding comes last
        labels: torch.LongTensor | None = None,  # (B, T), -100 = ignored
        encoder_outputs: RNNEncoderOutput | None = None,
        cache: RNNDecoderCache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,  # accepted for generate; nothing extra is returned
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,  # accepted because peft's LoRA wrapper passes them (None)
        decoder_inputs_embeds: torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput | tuple:
        if inputs_embeds is not None or decoder_inputs_embeds is not None:
            raise ValueError("rnn_seq2seq takes token ids, not embeddings (inputs_embeds)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("rnn_seq2seq forward needs input_ids or encoder_outputs")
            if attention_mask is None:
                attention_mask = input_ids.ne(self.config.pad_token_id)
            encoder_outputs = self.encoder(input_ids, attention_mask)
        elif not isinstance(encoder_outputs, RNNEncoderOutput):
            raise TypeError(f"rnn_seq2seq: encoder_outputs must be the RNNEncoderOutput of model.get_encoder(), got "
                            f"{type(encoder_outputs).__name__}")
        memory = encoder_outputs.last_hidden_state  # (B, S, H)
        if attention_mask is None:  # generate passes none when the caller gave none
            attention_mask = encoder_outputs.attention_mask
        mask = (torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device) if attention_mask is None
                else attention_mask.bool())  # (B, S)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("rnn_seq2seq forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        if cache is None:
            cache = self.decoder.init_cache(encoder_outputs)

        if self.training and self.config.teacher_forcing_ratio < 1.0:
            logits, weights, cache = self._decode_sampled(decoder_input_ids, encoder_outputs, mask, cache)
        else:
            logits, weights, cache = self._decode_teacher_forced(decoder_input_ids, encoder_outputs, mask, cache)

        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        cross = (weights,) if output_attentions and weights is not None else None
        out = Seq2SeqLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None, cross_attentions=cross,
                              encoder_last_hidden_state=memory)
        return out if return_dict else out.to_tuple()

    def _decode_teacher_forced(self, decoder_input_ids, encoder, mask, cache):
        """decoder_input_ids (B, T) -> logits (B, T, V), weights (B, T, S) or None, cache after step T."""
        embedded = self.decoder.dropout(self.decoder.embedding(decoder_input_ids))  # (B, T, E)
        if self.decoder.parallel:
            pre_output, weights, cache = self.decoder.forward_parallel(embedded, encoder, mask, cache)
            return self.decoder.logits(pre_output), weights, cache
        pre_outputs, weights = [], []
        for t in range(embedded.shape[1]):
            pre_output, step_weights, cache = self.decoder.step(embedded[:, t], encoder, mask, cache)
            pre_outputs.append(pre_output)
            weights.append(step_weights)
        weights = None if weights[0] is None else torch.stack(weights, dim=1)  # (B, T, S)
        return self.decoder.logits(torch.stack(pre_outputs, dim=1)), weights, cache

    def _decode_sampled(self, decoder_input_ids, encoder, mask, cache):
        """Scheduled sampling (Bengio et al. 2015): at step t > 0, each example is fed the gold token with
        probability ``teacher_forcing_ratio``, else the argmax of its own step t-1 prediction.

        Costs one RNN call and one output projection per step, for every attention kind (the parallel
        teacher-forced pass is impossible when inputs depend on predictions).
        """
        ratio = self.config.teacher_forcing_ratio
        logits, weights = [], []
        tokens = decoder_input_ids[:, 0]  # (B,) the start token is always given
        for t in range(decoder_input_ids.shape[1]):
            if t > 0:
                gold = decoder_input_ids[:, t]
                use_gold = torch.rand(gold.shape, device=gold.device) < ratio
                tokens = torch.where(use_gold, gold, logits[-1].argmax(dim=-1))
            embedded = self.decoder.dropout(self.decoder.embedding(tokens))  # (B, E)
            pre_output, step_weights, cache = self.decoder.step(embedded, encoder, mask, cache)
            logits.append(self.decoder.logits(pre_output))  # (B, V)
            weights.append(step_weights)
        weights = None if weights[0] is None else torch.stack(weights, dim=1)
        return torch.stack(logits, dim=1), weights, cache

    def _reorder_cache(self, cache: RNNDecoderCache, beam_idx: torch.Tensor) -> RNNDecoderCache:
        """Beam search: row b of the next step continues row beam_idx[b] of this one."""
        return cache.reorder(beam_idx)

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``, after checking the beam size (transformers 5.24 fails on
        ``num_beams=0`` with a ZeroDivisionError and on negative values deep inside torch)."""
        config = kwargs.get("generation_config") or self.generation_config
        num_beams = kwargs.get("num_beams", config.num_beams)
        if num_beams is not None and (isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1):
            raise ValueError(f"rnn_seq2seq generate: num_beams={num_beams!r} must be an integer >= 1")
        return super().generate(*args, **kwargs)


__all__ = ["RNNSeq2SeqForConditionalGeneration", "RNNSeq2SeqPreTrainedModel", "shift_right"]
