"""A stable fingerprint of a tokenizer's vocabulary.

The value model scores candidates by *generator* token id, so generator and value model must map
ids to the same strings. Comparing vocab sizes alone misses a reordered or different vocabulary
of the same size; this hashes the whole id<->token map.

Deterministic across processes and machines: no Python `hash()`, sorted input, explicit JSON.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol


class _TokenizerLike(Protocol):
    def get_vocab(self) -> dict[str, int]: ...


def tokenizer_fingerprint(tokenizer: _TokenizerLike | Any) -> str:
    """sha256 (hex) over the sorted (token, id) pairs, added tokens included, and the
    bos/eos/unk ids. The pad id is left out on purpose: a value model may set its own pad."""
    vocab: dict[str, int] = dict(tokenizer.get_vocab())
    # HF fast tokenizers already include added tokens in get_vocab(); merging
    # added_tokens_decoder as well covers slow tokenizers that do not.
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        vocab.setdefault(str(tok), int(idx))
    pairs = sorted((int(i), str(t)) for t, i in vocab.items())  # by id, then token
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk")
    }
    payload = json.dumps(
        {"vocab": pairs, "special": special}, ensure_ascii=False, separators=(",", ":")
    )
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()
