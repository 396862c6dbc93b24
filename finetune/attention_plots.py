"""Source x target attention heatmaps for any seq2seq model: our RNN's attention, or a
transformer's cross-attention (one layer, averaged over heads or one panel per head).

The target is the model's own greedy translation; it is fed back through the decoder (teacher-
forced on its own output) with ``output_attentions=True``, so the weights are the ones that
produced each generated token. Plots are PNG files with words on both axes (the shape of
Bahdanau et al. 2014, Fig. 3), and W&B images during validation (`AttentionPlots`). Words, not
sub-word pieces: each word is its decoded text (no byte-level artefacts such as ``Ã©`` or ``Ġ``),
a source word's weight is the sum over its pieces (each row stays a distribution), a target word's
row the mean over its pieces; the task prefix ("translate English to French:") is left off the
source axis and the share of attention it received is given in the title.

    python -m finetune attention --model runs/rnn-bahdanau/checkpoints/last.ckpt \
        --task tatoeba_en_fr --examples "[0, 5, 9]" --out runs/rnn-bahdanau/attention
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from common.wandb_logger import logging_step

HeadMode = Literal["mean", "all"]


def cross_attention(model: Any, tokenizer: Any, source: str, max_new_tokens: int = 48,
                    layer: int = -1) -> tuple[list[str], list[str], torch.Tensor]:
    """(source tokens, generated target tokens, weights (H, T, S)) of one layer for ``source``."""
    src_ids, tgt_ids, weights = _attend(model, tokenizer, source, max_new_tokens, layer)
    src_tokens, tgt_tokens = tokenizer.convert_ids_to_tokens(src_ids), tokenizer.convert_ids_to_tokens(tgt_ids)
    # Ids past the tokenizer (the model's vocabulary is padded to a multiple of 64, and an untrained
    # model generates them) have no token: None, shown as their id.
    src = [_readable(t) if t is not None else f"<{i}>" for i, t in zip(src_ids, src_tokens)]
    tgt = [_readable(t) if t is not None else f"<{i}>" for i, t in zip(tgt_ids, tgt_tokens)]
    return src, tgt, weights


def word_attention(model: Any, tokenizer: Any, prompt: str, source_from: int = 0, max_new_tokens: int = 48,
                   layer: int = -1) -> tuple[list[str], list[str], torch.Tensor, float]:
    """:func:`word_alignment` of the model's attention for ``prompt`` (the source text starts at
    character ``source_from``: what precedes it, the task prefix, is left off)."""
    _, tgt_ids, weights = _attend(model, tokenizer, prompt, max_new_tokens, layer)
    return word_alignment(tokenizer, prompt, tgt_ids, weights, source_from)


@torch.no_grad()
def _attend(model: Any, tokenizer: Any, source: str, max_new_tokens: int,
            layer: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(source ids, generated ids, weights (H, T, S) of decoder layer ``layer``)."""
    if not getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("attention plots are for encoder-decoder models (source x target); this one is decoder-only")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        enc = tokenizer(source, return_tensors="pt").to(device)  # input_ids: (1, S)
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)  # (1, 1+T)
        decoder_input_ids = generated[:, :-1] if generated.shape[1] > 1 else generated  # (1, T): inputs of each step
        out = _forward_with_attentions(model, enc, decoder_input_ids)
    finally:
        model.train(was_training)
    layers = out.cross_attentions  # per layer: (1, H, T, S) for transformers, (1, T, S) for our RNN
    if not layers:
        raise ValueError(f"{type(model).__name__} returned no cross-attention weights "
                         "(an RNN with attention 'none' has none to plot)")
    weights = layers[layer][0]
    weights = weights.unsqueeze(0) if weights.dim() == 2 else weights  # (H, T, S)
    return enc["input_ids"][0].tolist(), generated[0, 1:].tolist(), weights.float().cpu()


def _forward_with_attentions(model: Any, enc: Any, decoder_input_ids: torch.Tensor) -> Any:
    # SDPA kernels do not return weights; the eager implementation computes the same attention.
    implementation = getattr(model.config, "_attn_implementation", None)
    switch = implementation not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        return model(**enc, decoder_input_ids=decoder_input_ids, output_attentions=True, return_dict=True)
    finally:
        if switch:
            model.set_attn_implementation(implementation)


def word_alignment(tokenizer: Any, prompt: str, target_ids: list[int], weights: torch.Tensor,
                   source_from: int = 0) -> tuple[list[str], list[str], torch.Tensor, float]:
    """Sub-word attention ``weights`` (H, T, S) of ``prompt`` -> (source words, target words,
    word weights (H, T_w, S_w), share of attention on the omitted prompt text before ``source_from``).

    Needs a fast tokenizer (character offsets of the source pieces)."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]  # per source piece: (start, end) in prompt characters
    if len(offsets) != weights.shape[-1]:
        raise ValueError(f"{len(offsets)} source pieces but {weights.shape[-1]} attention columns")
    groups: list[list[int]] = []
    words: list[str] = []
    special: list[bool] = []
    previous_end = 0
    for i, (start, end) in enumerate(offsets):
        if start == end:  # a special token (EOS): a column of its own, labelled as the token
            groups.append([i]); special.append(True)
            words.append(tokenizer.convert_ids_to_tokens(enc["input_ids"][i]))
            continue
        if end <= source_from:  # the task prefix
            previous_end = end
            continue
        # A piece starts a word after whitespace, unless it continues a character the previous
        # piece began (byte-level BPE splits "É" into two pieces with the same span) or the word
        # so far is only a space piece.
        starts_word = start >= previous_end and (prompt[start - 1].isspace() or prompt[start].isspace())
        if not groups or special[-1] or (starts_word and words[-1]):
            groups.append([i]); special.append(False); words.append("")
        else:
            groups[-1].append(i)
        words[-1] = prompt[max(offsets[groups[-1][0]][0], source_from):end].strip()
        previous_end = max(previous_end, end)
    tgt_groups, tgt_words = _target_words(tokenizer, target_ids)
    by_src = torch.stack([weights[..., g].sum(-1) for g in groups], dim=-1)  # (H, T, S_w)
    by_word = torch.stack([by_src[:, g].mean(1) for g in tgt_groups], dim=1)  # (H, T_w, S_w)
    hidden = float(1.0 - by_src.sum(-1).mean()) if source_from else 0.0
    return words, tgt_words, by_word, hidden


def _target_words(tokenizer: Any, ids: list[int]) -> tuple[list[list[int]], list[str]]:
    """Generated ids grouped into words: a piece whose decoded text starts with a space starts one;
    special and out-of-vocabulary ids (an untrained model's padded vocabulary) are rows of their own."""
    groups: list[list[int]] = []
    words: list[str] = []
    special: list[bool] = []
    specials = set(tokenizer.all_special_ids)
    for k, token_id in enumerate(ids):
        if token_id >= len(tokenizer) or token_id in specials:
            groups.append([k]); special.append(True)
            words.append(f"<{token_id}>" if token_id >= len(tokenizer) else tokenizer.convert_ids_to_tokens(token_id))
            continue
        piece = tokenizer.decode(ids[: k + 1])[len(tokenizer.decode(ids[:k])):]
        if not groups or special[-1] or piece[:1].isspace():
            groups.append([k]); special.append(False); words.append("")
        else:
            groups[-1].append(k)
        words[-1] = tokenizer.decode([ids[j] for j in groups[-1]]).strip()
    return groups, words


def _readable(token: str) -> str:
    # Byte-level BPE marks a leading space with "Ġ", SentencePiece with "▁".
    return token.replace("Ġ", "␣").replace("▁", "␣").replace("Ċ", "\\n")


def plot_alignment(weights: torch.Tensor, src_tokens: list[str], tgt_tokens: list[str], path: str | Path,
                   title: str = "", heads: HeadMode = "mean") -> Path:
    """Heatmap(s) of ``weights`` (H, T, S): rows = target tokens, columns = source tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [weights.mean(0)] if heads == "mean" else list(weights)
    n = len(panels)
    width = max(4.0, 0.35 * len(src_tokens) + 1.5)
    height = max(3.0, 0.3 * len(tgt_tokens) + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    for h, (ax, panel) in enumerate(zip(axes[0], panels)):
        image = ax.imshow(panel.numpy(), cmap="viridis", vmin=0.0, vmax=float(panel.max()) or 1.0, aspect="auto")
        ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=90, fontsize=8)
        ax.set_yticks(range(len(tgt_tokens)), tgt_tokens, fontsize=8)
        ax.set_xlabel("source")
        ax.set_ylabel("generated target")
        ax.set_title(title if heads == "mean" else f"{title} head {h}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_examples(model: Any, tokenizer: Any, sources: list[str], out_dir: str | Path, layer: int = -1,
                  heads: HeadMode = "mean", max_new_tokens: int = 48, prefix: str = "example",
                  raw_sources: list[str] | None = None) -> list[Path]:
    """One PNG per prompt in ``sources`` in ``out_dir``, words on both axes (sub-word pieces with a
    slow tokenizer); ``raw_sources``: the source texts inside those prompts, so that the task prefix
    before them is left off. Returns the paths."""
    paths = []
    layer_name = "last layer" if layer == -1 else f"layer {layer}"
    for i, prompt in enumerate(sources):
        title = f"{type(model).__name__}, {layer_name}"
        if getattr(tokenizer, "is_fast", False):
            raw = raw_sources[i] if raw_sources else ""
            source_from = prompt.rfind(raw) if raw and raw in prompt else 0
            src, tgt, weights, hidden = word_attention(model, tokenizer, prompt, source_from, max_new_tokens, layer)
            if source_from:
                title += f"; task prefix left off ({hidden:.0%} of the attention)"
        else:
            src, tgt, weights = cross_attention(model, tokenizer, prompt, max_new_tokens, layer)
        paths.append(plot_alignment(weights, src, tgt, Path(out_dir) / f"{prefix}-{i}.png", title=title, heads=heads))
    return paths


def main(
    model: str,
    task: str | None = None,
    sources: list[str] | None = None,
    split: str = "test",
    examples: list[int] = [0, 1, 2],
    layer: int = -1,
    heads: HeadMode = "mean",
    max_new_tokens: int = 48,
    out: str = "attention",
) -> list[Path]:
    """Plot source x target attention of a seq2seq model for chosen examples (`python -m finetune attention`).

    Args:
        model: Anything ``--model.init`` accepts (checkpoint, run dir, HF directory, hub name).
        task: Task whose ``split`` rows ``examples`` are plotted (rendered with the model's template).
        sources: Source texts to plot as given (in addition to the task examples).
        split: Split of ``task``.
        examples: Row indices in ``split``.
        layer: Decoder layer whose cross-attention is shown (-1 = last).
        heads: "mean" over heads, or "all": one panel per head.
        max_new_tokens: Length limit of the generated target.
        out: Output directory for the PNG files.
    """
    from finetune.pretrained import load_pretrained

    loaded = load_pretrained(model)
    texts = list(sources or [])
    raw = list(texts)  # a given source has no prefix; a task row's prompt does
    if task is not None:
        from finetune.tasks import load_split, load_task

        config = load_task(task)
        rows = load_split(config, split)
        template = config.template(loaded.kind)
        for i in examples:
            if not 0 <= i < len(rows):
                raise ValueError(f"examples: row {i} is outside split {split!r} of {config.name} ({len(rows)} rows)")
            texts.append(template.render_prompt(rows[i]))
            raw.append(rows[i]["source"])
    if not texts:
        raise ValueError("nothing to plot: give --task (and --examples) or --sources")
    paths = plot_examples(loaded.model, loaded.tokenizer, texts, out, layer, heads, max_new_tokens, raw_sources=raw)
    for path in paths:
        print(path)
    return paths


class AttentionPlots(pl.Callback):
    """After each validation, plot the attention of the first ``n_examples`` validation prompts
    (encoder-decoder models; rank 0; not under ZeRO-3 / FSDP, whose weights are sharded).
    PNGs go to ``<run dir>/attention/step<N>/`` and to W&B as images (key ``attention``).

    Args:
        n_examples: Validation prompts plotted each time (0 disables the plots).
        layer: Decoder layer (-1 = last).
        heads: "mean" over heads or "all".
    """

    def __init__(self, n_examples: int = 2, layer: int = -1, heads: HeadMode = "mean") -> None:
        self.n_examples, self.layer, self.heads = n_examples, layer, heads

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.n_examples == 0 or trainer.sanity_checking or not trainer.is_global_zero
                or getattr(pl_module, "kind", "") != "encoder_decoder" or trainer.world_size > 1
                and getattr(trainer.strategy, "zero_stage_3", False)):
            return
        items = trainer.datamodule.eval_items.get("val", [])[: self.n_examples]
        out = Path(trainer.default_root_dir) / "attention" / f"step{trainer.global_step:07d}"
        try:
            paths = plot_examples(pl_module.model, pl_module.tokenizer, [it["text"] for it in items], out,
                                  self.layer, self.heads, max_new_tokens=pl_module.hparams.max_new_tokens,
                                  raw_sources=[it.get("source", "") for it in items])
        except ValueError:  # e.g. an RNN without attention: nothing to plot
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="attention", images=[str(p) for p in paths], step=logging_step(trainer))

