"""A bag-of-words baseline for the value study: how much of the reward can the study's training
texts teach a model that only counts words?

    python -m benchmarks.value_study_bow --train runs/train16 --heldout runs/heldout16 \
        --max-prompts 192 384 768

For each training size (the first N prompts of the training dataset, all their samples, as the
study's recipes read it), ridge regression on word counts (lower-cased [a-z']+ words of prompt +
response that occur in at least 2 training texts) is fit to the reward of the full text, and
scored by the Pearson correlation with the reward on the held-out dataset's full texts (the
study's "Pearson full"). The ridge strength is picked on the held-out set from --alphas, so the
number is optimistic for this baseline. Its training-set Pearson shows how much of the gap is
words the training texts never showed it. Writes benchmarks/results/value_study/bow_baseline.json.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.value_study import RESULTS

WORD = re.compile(r"[a-z']+")


def full_texts(data: Path, reward: str, max_prompts: int | None) -> tuple[list[list[str]], np.ndarray]:
    """Words of prompt + response of every sample of the first max_prompts prompts, and rewards."""
    from value_models.training.rewards import load_scores
    from value_models.training.sampling import load_samples

    _, samples = load_samples(data)
    if max_prompts is not None:
        ids = sorted({s["prompt_id"] for s in samples})[:max_prompts]
        keep = set(ids)
        samples = [s for s in samples if s["prompt_id"] in keep]
    scores = load_scores(data, reward, samples)
    words = [WORD.findall((s["prompt"] + s["response"]).lower()) for s in samples]
    return words, np.asarray(scores, dtype=np.float64)


def counts(texts: list[list[str]], vocab: dict[str, int]) -> Any:
    """Sparse [texts, vocab + 1] word counts with a constant column (the intercept)."""
    import scipy.sparse as sp

    rows, cols = [], []
    for i, t in enumerate(texts):
        for w in t:
            j = vocab.get(w)
            if j is not None:
                rows.append(i)
                cols.append(j)
        rows.append(i)
        cols.append(len(vocab))
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocab) + 1))


def fit_size(train: tuple[list[list[str]], np.ndarray], held: tuple[list[list[str]], np.ndarray],
             alphas: list[float]) -> dict[str, Any]:
    from sklearn.linear_model import Ridge

    texts, y = train
    df = Counter(w for t in texts for w in set(t))
    vocab = {w: j for j, w in enumerate(sorted(w for w, n in df.items() if n >= 2))}
    a, b = counts(texts, vocab), counts(held[0], vocab)
    seen = sum(1 for t in held[0] for w in t if w in vocab) / max(1, sum(len(t) for t in held[0]))
    fits = []
    for alpha in alphas:
        m = Ridge(alpha=alpha, fit_intercept=False, solver="sparse_cg").fit(a, y)
        fits.append(dict(alpha=alpha, pearson_heldout=float(np.corrcoef(b @ m.coef_, held[1])[0, 1]),
                         pearson_train=float(np.corrcoef(a @ m.coef_, y)[0, 1])))
    best = max(fits, key=lambda f: f["pearson_heldout"])
    return dict(train_texts=len(texts), vocab=len(vocab), heldout_words_in_vocab=seen, best=best,
                fits=fits)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, required=True, help="training dataset folder (vas-vllm sample)")
    p.add_argument("--heldout", type=Path, required=True, help="held-out dataset folder")
    p.add_argument("--reward", default="vader_positive")
    p.add_argument("--max-prompts", type=int, nargs="+", default=[192, 384, 768])
    p.add_argument("--alphas", type=float, nargs="+", default=[1, 3, 10, 30])
    p.add_argument("--out", type=Path, default=RESULTS / "bow_baseline.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    held = full_texts(args.heldout, args.reward, None)
    sizes = {}
    for n in args.max_prompts:
        sizes[str(n)] = fit_size(full_texts(args.train, args.reward, n), held, args.alphas)
        best = sizes[str(n)]["best"]
        print(f"{n} prompts ({sizes[str(n)]['train_texts']} texts, {sizes[str(n)]['vocab']} words): "
              f"held-out Pearson {best['pearson_heldout']:.3f}, train {best['pearson_train']:.3f} "
              f"(alpha {best['alpha']:g}); held-out words in vocabulary "
              f"{sizes[str(n)]['heldout_words_in_vocab']:.1%}")
    result = dict(train=str(args.train), heldout=str(args.heldout), reward=args.reward,
                  heldout_texts=len(held[0]), sizes=sizes, seconds=time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {args.out}")
    return result


if __name__ == "__main__":
    main()
