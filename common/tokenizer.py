"""Tokenizer loading, BPE training, fingerprints and checkpoint embedding.

Every tokenizer this project hands out has a pad token that is *not* the EOS token: padded
positions are masked out of the loss, so if pad == EOS the model would never be trained to emit
EOS. GPT-2 ships without a pad token, so ``<|pad|>`` is added as a new special token (and the
model's embedding must be sized ``len(tokenizer)``, not ``tokenizer.vocab_size``).

T5-style span corruption needs sentinel tokens ``<extra_id_0>``, ``<extra_id_1>``, ...; they are
added after loading (:func:`add_sentinel_tokens`), never at corpus preparation, so the shards never
contain them and one prepared corpus serves both the GPT and the T5 objective.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from common.data_root import data_root, resolve_local

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SENTINEL_TEMPLATE = "<extra_id_{}>"

# Keys of the backend JSON that are runtime state, not identity: transformers sets padding /
# truncation on the backend as a side effect of calls like ``tok(x, padding=True)``.
_RUNTIME_KEYS = ("padding", "truncation")
# Binary files (e.g. a SentencePiece model) are embedded as base64 under "<name><suffix>".
_B64_SUFFIX = ".b64"


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tok`` a pad token distinct from its EOS token (adds ``<|pad|>`` when needed), in place."""
    if tok.pad_token is None or (tok.eos_token is not None and tok.pad_token == tok.eos_token):
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def add_sentinel_tokens(tok: PreTrainedTokenizerBase, n: int = 100) -> list[int]:
    """Ensure ``<extra_id_0>`` ... ``<extra_id_{n-1}>`` are special tokens of ``tok`` (in place).

    Missing ones are appended as extra special tokens (existing extra specials are kept), so they are
    never split when encoding text and decode to their literal strings. Idempotent: a tokenizer that
    already has them (e.g. T5's) gains nothing. ``len(tok)`` grows by the number added; size the
    model's embedding from it.

    Args:
        tok: the tokenizer to extend.
        n: number of sentinels (span corruption uses one per noise span, in order).

    Returns:
        ``ids`` with ``ids[k]`` = id of ``<extra_id_k>``.
    """
    if n < 0:
        raise ValueError(f"add_sentinel_tokens: n must be >= 0, got {n}")
    names = [SENTINEL_TEMPLATE.format(k) for k in range(n)]
    have = {str(t) for t in tok.extra_special_tokens}
    missing = [name for name in names if name not in have]
    if missing:
        # transformers 5: "extra_special_tokens" (was "additional_special_tokens"); extend, do not replace.
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = tok.convert_tokens_to_ids(names)
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ValueError(f"add_sentinel_tokens: could not add sentinel tokens to {type(tok).__name__}")
    return [int(i) for i in ids]


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or the Hugging Face hub, with a non-EOS pad token.

    Args:
        name_or_path: a directory (absolute, relative to the working directory, or relative to the
            data root, e.g. ``tokenizers/gpt2``) holding ``save_pretrained`` files, else a hub name.
    """
    local = resolve_local(name_or_path)
    if local is not None:
        if not local.is_dir():
            raise ValueError(f"tokenizer {name_or_path!r}: {local} is a file; expected a directory "
                             "written by save_pretrained (tokenizer.json, tokenizer_config.json)")
        try:
            tok = AutoTokenizer.from_pretrained(str(local))
        except Exception as exc:  # noqa: BLE001 - re-raised with the path named
            raise ValueError(f"tokenizer {name_or_path!r}: cannot load local directory {local}: {exc}") from exc
    else:
        try:
            # Never trust_remote_code: a config must not be able to run code from the hub.
            tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - re-raised with both places we looked
            raise ValueError(
                f"tokenizer {name_or_path!r}: not a local directory (looked in {Path.cwd()} and data root "
                f"{data_root()}) and not loadable from the hub: {type(exc).__name__}: {exc}"
            ) from exc
    return ensure_pad_token(tok)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    special_tokens: Sequence[str] = (EOS_TOKEN, PAD_TOKEN),
    min_frequency: int = 2,
    length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and save it in Hugging Face format to ``out_dir``.

    Args:
        texts: training documents (iterated once).
        vocab_size: total vocabulary size, special tokens and the 256 byte symbols included.
        out_dir: where ``save_pretrained`` writes; ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
        special_tokens: added first (ids 0, 1, ...); the first is EOS/BOS, the second the pad token.
        min_frequency: a pair must occur this often to be merged.
        length: number of texts, only for the progress bar.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if len(special_tokens) < 2:
        raise ValueError(f"special_tokens needs an EOS and a pad token, got {list(special_tokens)}")
    # Byte-level: every string is encodable (no unk), and decode(encode(s)) == s exactly.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    backend.train_from_iterator(texts, trainer, length=length)
    eos, pad = special_tokens[0], special_tokens[1]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=eos, pad_token=pad)
    tok.save_pretrained(str(out_dir))
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """Short sha256 of the tokenizer's vocabulary, merges, pipeline and special tokens.

    Equal for the same tokenizer however it was loaded; different when any of those differ.
    """
    spec = json.loads(tok.backend_tokenizer.to_str())
    for key in _RUNTIME_KEYS:
        spec.pop(key, None)
    specials = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    blob = json.dumps({"backend": spec, "special_tokens": specials}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def tokenizer_to_files(tok: PreTrainedTokenizerBase) -> dict[str, str]:
    """The tokenizer's ``save_pretrained`` files as {file name: text} (strings only, for checkpoints)."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files: dict[str, str] = {}
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(tmp).as_posix()
            data = path.read_bytes()
            try:
                files[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                files[name + _B64_SUFFIX] = base64.b64encode(data).decode("ascii")
    return files


def tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerBase:
    """Rebuild a tokenizer from :func:`tokenizer_to_files` output (same fingerprint)."""
    if not files:
        raise ValueError("tokenizer_from_files: no files given (checkpoint has no embedded tokenizer?)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"tokenizer_from_files: unsafe file name {name!r}")
            if name.endswith(_B64_SUFFIX):
                target = Path(tmp) / name[: -len(_B64_SUFFIX)]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(text))
            else:
                target = Path(tmp) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
        # Loads everything into memory, so the temp dir can go away afterwards.
        return AutoTokenizer.from_pretrained(tmp)
