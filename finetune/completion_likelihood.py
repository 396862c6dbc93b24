"""How likely a decoder finds the reference answer after a prompt: the graded few-shot signal.

A tiny model's greedy answers can be empty at every k (its most likely first token ends the
answer), which says nothing about whether demonstrations helped. The log-likelihood of the
reference completion does: the template's ``target_delimiter + reference + EOS`` after the very
prompt ``evaluate`` built (saved in its ``predictions.jsonl``), in nats per token. If k
demonstrations lower it, the model used them: in-context learning as lm-evaluation-harness measures
it with loglikelihood requests. Items whose prompt + completion do not fit the context are left out
(and counted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def read_predictions(eval_dir: str | Path) -> list[dict[str, Any]]:
    """The records of an ``evaluate`` run (prompt, prediction, references, ...) in item order."""
    path = Path(eval_dir) / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def completion_nll(model: Any, tokenizer: Any, target_delimiter: str, records: list[dict[str, Any]],
                   max_length: int, batch_size: int = 32) -> list[float | None]:
    """Per record: mean NLL (nats/token) of ``target_delimiter + references[0] + EOS`` after
    ``prompt``, or None when the two together exceed ``max_length`` tokens."""
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs: list[tuple[list[int], list[int]] | None] = []
    for r in records:
        prompt = tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(target_delimiter + r["references"][0], add_special_tokens=False)["input_ids"] + [eos]
        pairs.append((prompt, completion) if len(prompt) + len(completion) <= max_length else None)
    fitting = [i for i, p in enumerate(pairs) if p is not None]
    out: list[float | None] = [None] * len(records)
    for start in range(0, len(fitting), batch_size):
        chunk = fitting[start:start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # (B, T), right-padded
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # (B, T, V)
        for row, i in enumerate(chunk):
            n_prompt, n_total = len(pairs[i][0]), len(seqs[row])
            targets = ids[row, n_prompt:n_total]  # (C,): predicted from positions n_prompt - 1 ... n_total - 2
            out[i] = -float(logp[row, n_prompt - 1:n_total - 1].gather(-1, targets[:, None]).mean())
    return out
