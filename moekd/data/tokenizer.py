"""Train a small byte-level BPE tokenizer (for the demo and tests), and fingerprint tokenizers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None):
    """A byte-level BPE tokenizer trained on `texts`, saved with save_pretrained when `out_dir` is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD, bos_token=None)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def tokenizer_fingerprint(tokenizer) -> dict:
    """`vocab_sha256` identifies the token-to-id mapping; `sha256` the whole tokenizer (mapping, rules, specials)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    vocab_sha = hashlib.sha256(vocab.encode()).hexdigest()
    backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else ""
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    full_sha = hashlib.sha256((vocab_sha + backend + specials).encode()).hexdigest()
    return {"vocab_sha256": vocab_sha, "sha256": full_sha}


def tokenizer_differences(tokenizer, size: int, sha256: str, vocab_sha256: str) -> tuple[bool, list[str]]:
    """How `tokenizer` differs from the tokenizer fingerprinted by (size, sha256, vocab_sha256).

    Returns (whether both map tokens to ids the same way, the differences in words); the list is
    empty when the tokenizers are identical.
    """
    found = tokenizer_fingerprint(tokenizer)
    if found["sha256"] == sha256:
        return True, []
    same_ids = found["vocab_sha256"] == vocab_sha256
    how = [f"size {len(tokenizer)} vs {size}"] if len(tokenizer) != size else []
    if same_ids:
        how.append(
            f"same token-to-id mapping but other rules or special tokens (sha256 {found['sha256'][:12]} vs {sha256[:12]})"
        )
    else:
        how.append(f"token-to-id mapping differs (vocab_sha256 {found['vocab_sha256'][:12]} vs {vocab_sha256[:12]})")
    return same_ids, how
