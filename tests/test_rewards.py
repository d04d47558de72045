"""Rewards: built-ins against their libraries, the spec parser, an HF classifier against a manual
softmax, a py: callable, and the score cache (resume, staleness)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dataset_helpers import write_fake_dataset
from fp_bounds import RoundingTracer, assert_within, watch
from value_reference import RUNTIME_SLACK
from value_models.training.rewards import (
    Reward,
    canonical_name,
    load_scores,
    parse_reward,
    register_reward,
    score_dataset,
    scores_path,
)
from value_models.training.sampling import load_samples

CALLS: list[int] = []


def counting_reward(prompts: list[str], responses: list[str]) -> list[float]:
    CALLS.append(len(responses))
    return [float(len(p) + len(r)) for p, r in zip(prompts, responses)]


def test_vader_positive_scores_prompt_plus_response() -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    rw = parse_reward("vader_positive")
    assert isinstance(rw, Reward) and rw.name == "vader_positive"
    prompts, responses = ["I am so", "This movie was"], [" happy and grateful!", " awful, I hated it."]
    got = rw.score(prompts, responses)
    sia = SentimentIntensityAnalyzer()
    assert got == [sia.polarity_scores(p + r)["compound"] for p, r in zip(prompts, responses)]
    assert got[0] > 0.5 and got[1] < -0.5
    only = parse_reward("vader_positive:on=response")
    assert only.name == "vader_positive:on=response"
    assert only.score(["I hate everything, but"], [" ok"]) == [sia.polarity_scores(" ok")["compound"]]


def test_textblob_polarity() -> None:
    from textblob import TextBlob

    got = parse_reward("textblob_polarity").score(["It is"], [" a wonderful day"])
    assert got == [TextBlob("It is a wonderful day").sentiment.polarity] and got[0] > 0


def test_py_callable_and_registry() -> None:
    rw = parse_reward("py:test_rewards:counting_reward")
    assert rw.score(["ab"], ["cde"]) == [5.0]

    @register_reward("shouting")
    def shouting(name: str, on: str = "full") -> Reward:
        class R:
            def __init__(self) -> None:
                self.name = name

            def score(self, prompts, responses):
                return [float(r.isupper()) for r in responses]
        return R()

    assert parse_reward("shouting").score(["x", "y"], ["HEY", "hey"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec,match", [
    ("nope", r"unknown reward spec 'nope': expected one of \["),
    ("vader_positive:on=elsewhere", r"on must be 'full' or 'response', found 'elsewhere'"),
    ("hf:/nowhere:colour=red", r"bad options \{'colour': 'red'\}"),
    ("vader_positive:colour=red", r"bad options \{'colour': 'red'\}"),
    ("py:no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'"),
    ("py:json:not_there", r"json.not_there is not a callable"),
    ("hf:", r"expected hf:PATH_OR_ID"),
])
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_reward(spec)


def test_canonical_names_and_cache_paths(tmp_path: Path) -> None:
    assert canonical_name("hf:/m/x:output=logit:label=0") == "hf:/m/x:label=0:output=logit"
    assert scores_path(tmp_path, "vader_positive").name == "scores.vader_positive.jsonl"
    a, b = scores_path(tmp_path, "hf:/a/b:label=1"), scores_path(tmp_path, "hf:/a_b:label=1")
    assert a != b and a.name.startswith("scores.hf_a_b_label=1-")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, smollm2_tokenizer: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         num_labels=3, pad_token_id=tok.pad_token_id,
                         id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    out = tmp_path_factory.mktemp("clf")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _bounded(folder: Path, encodings: list, post=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's logits (or post(logits)) for each encoded text, in float64, and their
    float32 error bounds (fp_bounds): [N, C] each. The scorer runs HF's default attention (a
    fused, merged softmax) where this traces the eager one: compare within RUNTIME_SLACK x."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.float64, attn_implementation="eager").eval()
    watch(model)
    wants, bounds = [], []
    for enc in encodings:
        tr = RoundingTracer()
        with tr:
            y = model(**enc).logits[0]                                           # [C]
            y = post(y) if post is not None else y
        wants.append(y.detach())
        bounds.append(tr.bound(y))
    return torch.stack(wants), RUNTIME_SLACK * torch.stack(bounds)


def test_hf_classifier_matches_manual_softmax(tiny_classifier: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts, responses = ["Great", "Terrible day,"], [" stuff!", " really"]
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():  # one text at a time: no padding involved
        logits = torch.cat([model(**tok(p + r, return_tensors="pt")).logits
                            for p, r in zip(prompts, responses)])          # [2, 3]
    encodings = [tok(p + r, return_tensors="pt") for p, r in zip(prompts, responses)]
    want_logits, bound_logits = _bounded(tiny_classifier, encodings)
    want_probs, bound_probs = _bounded(tiny_classifier, encodings, lambda y: torch.softmax(y, -1))
    assert_within(logits, want_logits, bound_logits, "HF forward, one text at a time")
    prob = parse_reward(f"hf:{tiny_classifier}:label=2:batch_size=2").score(prompts, responses)
    assert_within(torch.tensor(prob), want_probs[:, 2], bound_probs[:, 2], "label=2")
    by_name = parse_reward(f"hf:{tiny_classifier}:label=pos").score(prompts, responses)
    assert_within(torch.tensor(by_name), want_probs[:, 2], bound_probs[:, 2], "label=pos")
    raw = parse_reward(f"hf:{tiny_classifier}:label=0:output=logit").score(prompts, responses)
    assert_within(torch.tensor(raw), want_logits[:, 0], bound_logits[:, 0], "output=logit")
    with pytest.raises(ValueError, match=r"label must be in 0..2 .* found 7"):
        parse_reward(f"hf:{tiny_classifier}:label=7")


def test_score_cache_resumes_and_notices_stale_text(tmp_path: Path) -> None:
    data = write_fake_dataset(tmp_path / "data", num_prompts=5, num_samples=3)
    spec = "py:test_rewards:counting_reward"
    _, samples = load_samples(data)
    with pytest.raises(FileNotFoundError, match=r"expected scores for 15 samples, 15 missing"):
        load_scores(data, spec, samples)
    CALLS.clear()
    path = score_dataset(data, spec, batch_size=4)
    assert CALLS == [4, 4, 4, 3]
    expected = [float(len(s["prompt"]) + len(s["response"])) for s in samples]
    assert load_scores(data, spec, samples) == expected
    CALLS.clear()
    score_dataset(data, spec, batch_size=4)
    assert CALLS == [], "a second run must reuse every cached score"
    # an interrupted write (truncated last line) re-scores exactly that sample
    text = path.read_bytes()
    path.write_bytes(text[:-10])
    score_dataset(data, spec)
    assert CALLS == [1]
    # a changed response is stale: scored again
    lines = (data / "samples.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["response"] += " (edited)"
    lines[0] = json.dumps(rec)
    (data / "samples.jsonl").write_text("\n".join(lines) + "\n")
    CALLS.clear()
    score_dataset(data, spec)
    assert CALLS == [1]
    _, samples = load_samples(data)
    assert load_scores(data, spec, samples)[0] == float(len(rec["prompt"]) + len(rec["response"]))


def test_hf_batches_sorted_by_length_equal_one_text_at_a_time(tiny_classifier: Path) -> None:
    """Fresh random texts of mixed lengths: sorting, batching and padding change no score."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import random

    rng = random.Random(1)
    words = ["good", "bad", "day", "the", "a", "movie", "really", "not", "so", "fine"]
    prompts = [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(11)]
    # no space before the responses: "day"+"good" tokenizes otherwise joined than as a pair
    responses = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(11)]
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():  # the slow reference: one unpadded text (or pair) at a time
        full = torch.cat([model(**tok(p + r, return_tensors="pt")).logits for p, r in zip(prompts, responses)])
        pair = torch.cat([model(**tok(p, r, return_tensors="pt")).logits for p, r in zip(prompts, responses)])
    want_full, bound_full = _bounded(tiny_classifier, [tok(p + r, return_tensors="pt") for p, r in zip(prompts, responses)])
    want_pair, bound_pair = _bounded(tiny_classifier, [tok(p, r, return_tensors="pt") for p, r in zip(prompts, responses)])
    assert_within(full, want_full, bound_full, "one text at a time")
    assert_within(pair, want_pair, bound_pair, "one pair at a time")
    rw = parse_reward(f"hf:{tiny_classifier}:label=1:output=logit:batch_size=4")
    assert_within(torch.tensor(rw.score(prompts, responses)), want_full[:, 1], bound_full[:, 1], "batched texts")
    st = rw.stats()
    assert st["texts"] == 11 and st["device"] == "cpu" and st["texts_per_s"] > 0
    assert st["tokens"] == sum(len(tok(p + r)["input_ids"]) for p, r in zip(prompts, responses))
    paired = parse_reward(f"hf:{tiny_classifier}:label=1:output=logit:batch_size=4:on=pair")
    assert_within(torch.tensor(paired.score(prompts, responses)), want_pair[:, 1], bound_pair[:, 1], "batched pairs")
    # other inputs, other values: far beyond torch's default float32 tolerance
    assert not torch.allclose(pair[:, 1], full[:, 1]), "pairs are encoded as two segments"


def test_hf_one_logit_model_defaults_to_its_logit_column(tiny_classifier: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    one = AutoModelForSequenceClassification.from_pretrained(tiny_classifier, num_labels=1,
                                                             ignore_mismatched_sizes=True)
    one.save_pretrained(tmp_path / "one")
    for f in tiny_classifier.glob("tokenizer*"):
        (tmp_path / "one" / f.name).write_bytes(f.read_bytes())
    logit = parse_reward(f"hf:{tmp_path / 'one'}:output=logit").score(["a"], [" b"])
    prob = parse_reward(f"hf:{tmp_path / 'one'}").score(["a"], [" b"])
    # the same forward both times (same text, same batch): prob is torch.sigmoid of that float32
    # logit, within the float32 bound of a sigmoid
    x = torch.tensor(logit[0], dtype=torch.float64).requires_grad_()
    tr = RoundingTracer()
    with tr:
        y = torch.sigmoid(x)
    assert_within(torch.tensor(prob[0]), torch.tensor(1 / (1 + math.exp(-logit[0])), dtype=torch.float64),
                  tr.bound(y), "sigmoid")
    with pytest.raises(ValueError, match="device cuda, but torch sees no CUDA GPU"):
        if not torch.cuda.is_available():
            parse_reward(f"hf:{tmp_path / 'one'}:device=cuda")
        else:
            raise ValueError("device cuda, but torch sees no CUDA GPU")  # nothing to check here
