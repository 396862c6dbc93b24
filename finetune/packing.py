"""Packed fine-tuning batches (``--data.packing true``): several examples per row, kept apart.

A row concatenates whole examples up to the context (``common.resumable_loader.ResumablePackedSampler``
decides which). What keeps them apart is the position ids: they restart at 0 with every example,
and with no attention mask transformers' decoders (``masking_utils.find_packed_sequence_indices``)
turn each restart into a block of the causal mask, so no token attends across a boundary (on GPU,
flash-attention's variable-length kernels read the same ids). Each example's first token gets label
-100: in a row it would be predicted from the previous example's last token. In an unpacked batch
that token is never predicted either (the model shifts labels by one), so a packed batch's loss,
the mean over its label tokens, equals that of the same examples padded (tests/test_packing.py).

Encoder-decoders are refused: transformers builds their encoder and cross attention from a
padding mask, not from positions. A decoder is refused too unless a probe shows it keeps two
packed examples apart (``check_packing``): a model that ignores ``position_ids`` would silently
train on cross-contaminated rows.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


def collate_packed(rows: list[list[dict[str, list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows of decoder examples (``{prompt_ids, completion_ids}``) -> ``input_ids``,
    ``position_ids`` and ``labels``, each (B, T_max); no ``attention_mask`` (see module doc).

    Each row's tail padding gets positions 0, 1, ... too, so it is a block of its own, and labels -100.
    """
    ids, positions, labels = [], [], []
    for row in rows:
        row_ids: list[int] = []
        row_pos: list[int] = []
        row_labels: list[int] = []
        for ex in row:
            seq = ex["prompt_ids"] + ex["completion_ids"]
            row_ids += seq
            row_pos += range(len(seq))
            ex_labels = [IGNORE_INDEX] * len(ex["prompt_ids"]) + ex["completion_ids"]
            ex_labels[0] = IGNORE_INDEX  # never a target: nothing of this example precedes it
            row_labels += ex_labels
        ids.append(row_ids), positions.append(row_pos), labels.append(row_labels)
    width = max(map(len, ids))
    out = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),  # (B, T)
           "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
           "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)}
    for b, (row_ids, row_pos, row_labels) in enumerate(zip(ids, positions, labels)):
        n = len(row_ids)
        out["input_ids"][b, :n] = torch.tensor(row_ids)
        out["position_ids"][b, :n] = torch.tensor(row_pos)
        out["position_ids"][b, n:] = torch.arange(width - n)
        out["labels"][b, :n] = torch.tensor(row_labels)
    return out


def check_packing(model: Any, kind: str) -> None:
    """Refuse ``data.packing`` for a model that cannot keep packed examples apart (module doc):
    encoder-decoders by kind; a decoder unless the logits of an example packed after another equal
    its logits alone."""
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__  # under a LoRA wrapper
    if kind != "decoder":
        raise ValueError(f"data.packing: {name} is an encoder-decoder, whose attention transformers builds from a "
                         "padding mask, so packed examples would attend to each other; use data.batch_tokens for "
                         "batches with little padding")
    vocab = model.get_input_embeddings().num_embeddings
    first, second = [(i % (vocab - 1)) + 1 for i in (5, 6, 7)], [(i % (vocab - 1)) + 1 for i in (8, 9)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: the two forwards must be comparable
    try:
        with torch.no_grad():
            packed = model(input_ids=torch.tensor([first + second], device=device),
                           position_ids=torch.tensor([[0, 1, 2, 0, 1]], device=device), use_cache=False).logits
            alone = model(input_ids=torch.tensor([second], device=device),
                          position_ids=torch.tensor([[0, 1]], device=device), use_cache=False).logits
    except TypeError as err:  # a forward without position_ids
        raise ValueError(f"data.packing: {name} takes no position_ids ({err}), so packed examples cannot be kept "
                         "apart; leave data.packing off") from None
    finally:
        model.train(was_training)
    packed, alone = packed[0, len(first):].float(), alone[0].float()
    if not torch.allclose(packed, alone, rtol=1e-3, atol=1e-4 * float(alone.abs().max()) + 1e-5):
        raise ValueError(f"data.packing: {name} does not keep packed examples apart (an example's logits change when "
                         "another precedes it in the row: its attention ignores the per-example position ids); "
                         "leave data.packing off")
