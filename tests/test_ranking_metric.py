"""The within-sibling ranking metric (benchmarks/sibling_ranking.py, value_study --ranking) against a
direct computation on fresh random siblings: scipy's Spearman per prefix, the best sibling by a
plain loop, the split-half noise ceiling by Spearman-Brown."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from benchmarks import sibling_ranking, value_study


def _fake_draw(rng: np.random.Generator, boundaries=(8, 16), k=8, r=4, prompts=5) -> dict:
    cases = [{"prompt": i, "boundary": t, "prefix": [1, 2, 3]} for i in range(prompts) for t in boundaries]
    values = rng.integers(-3, 4, size=(len(cases), k, r)).astype(float) / 3  # ties, as rewards have
    partial = values.mean(-1) + rng.normal(0, 0.5, size=(len(cases), k))
    partial[1] = 0.25                                        # a constant scorer: no Spearman there
    key = {"prompts": prompts, "prompt_offset": 0, "boundaries": list(boundaries), "k": k, "block": 8,
           "rollouts": r, "max_tokens": 40, "reward": "vader_positive", "seed": 0, "heldout": None}
    return {"key": key, "prompts": ["p"] * prompts, "prompt_ids": [[1]] * prompts, "cases": cases,
            "siblings": [[[5]] * k for _ in cases], "values": values.tolist(), "partial": partial.tolist()}


def _tied_rewards_and_a_model():
    """Fresh siblings whose partial-text rewards take 3 levels (many ties) and a noisy model V of
    their values, ranked: (data, partial, target, model, report)."""
    rng = np.random.default_rng()
    data = _fake_draw(rng, prompts=9)
    values = np.asarray(data["values"])
    partial = rng.integers(0, 3, size=values.shape[:2]).astype(float) / 2
    data["partial"] = partial.tolist()
    target = values.mean(-1)
    model = target + rng.normal(0, 0.5, size=target.shape)
    return data, partial, target, model, sibling_ranking.rank(data, {}, extra_scores={"V": model})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_matches_direct_loop(seed):
    rng = np.random.default_rng(seed)
    data = _fake_draw(rng)
    rep = sibling_ranking.rank(data, {}, seed=seed)
    values, partial = np.asarray(data["values"]), np.asarray(data["partial"])
    target = values.mean(-1)
    perm_rng = np.random.default_rng(seed)
    for t in data["key"]["boundaries"]:
        idx = [j for j, c in enumerate(data["cases"]) if c["boundary"] == t]
        rhos, top1 = [], []
        for j in idx:
            if np.ptp(partial[j]) > 0 and np.ptp(target[j]) > 0:
                rhos.append(spearmanr(partial[j], target[j]).statistic)
            best = max(range(len(partial[j])), key=lambda s: partial[j][s])
            # values are multiples of 1/12: a tie in exact arithmetic is within 1e-12 in float64
            top1.append(1.0 if target[j][best] > max(target[j]) - 1e-12 else 0.0)
        got = rep[str(t)]["scorers"]["partial-text reward"]
        # a mean of <= 5 correlations, each a float64 ratio of rank sums: rounding ~1e-15
        assert got["spearman"]["mean"] == pytest.approx(np.mean(rhos), abs=1e-12)
        assert got["spearman"]["n"] == len(rhos)
        assert got["top1"]["mean"] == pytest.approx(np.mean(top1), abs=1e-12)
        halves, half_gains = [], []
        for j in idx:
            p = perm_rng.permutation(values.shape[-1])
            a, b = values[j][:, p[:2]].mean(-1), values[j][:, p[2:]].mean(-1)
            if np.ptp(a) > 0 and np.ptp(b) > 0:
                halves.append(spearmanr(a, b).statistic)
            top = [s for s in range(len(a)) if a[s] == max(a)]
            half_gains.append(sum(b[s] for s in top) / len(top) - sum(b) / len(b))
        # the split-half gain: choose by two rollouts, value by the other two; means of <= 8
        # float64 values, summed in another order: rounding ~1e-15
        assert rep[str(t)]["split_half_gain"]["mean"] == pytest.approx(np.mean(half_gains), abs=1e-12)
        best = [max(target[j]) - sum(target[j]) / len(target[j]) for j in idx]
        assert rep[str(t)]["max_gain_in_sample"] == pytest.approx(np.mean(best), abs=1e-12)
        h = np.mean(halves)
        rel = 2 * h / (1 + h)
        assert rep[str(t)]["reliability"] == pytest.approx(rel, abs=1e-12)
        if rel > 0:
            assert rep[str(t)]["noise_ceiling_spearman"] == pytest.approx(np.sqrt(rel), abs=1e-12)


def test_perfect_scorer_ranks_at_one():
    rng = np.random.default_rng(5)
    data = _fake_draw(rng)
    values = np.asarray(data["values"])
    data["partial"] = (values.mean(-1) + 1e-3 * np.arange(8)).tolist()  # ties broken, order kept
    exact = values.mean(-1)
    rep = sibling_ranking.rank(data, {})
    for t, r in rep.items():
        assert r["scorers"]["partial-text reward"]["top1"]["mean"] == 1.0
        idx = [j for j, c in enumerate(data["cases"]) if str(c["boundary"]) == t]
        want = np.mean([spearmanr(data["partial"][j], exact[j]).statistic for j in idx if np.ptp(exact[j]) > 0])
        assert r["scorers"]["partial-text reward"]["spearman"]["mean"] == pytest.approx(want, abs=1e-12)


def test_ranking_table_names_models_not_kept(tmp_path):
    data = _fake_draw(np.random.default_rng(3))
    base = {"setting": data["key"], "results": sibling_ranking.rank(data, {})}
    kept = {"name": "s99", "ranking": {"setting": data["key"], "results": {
        t: {"V mean": b["scorers"]["partial-text reward"], "V max": b["scorers"]["partial-text reward"]}
        for t, b in base["results"].items()}}}
    (tmp_path / "vas.json").write_text("{}")
    unranked = {"name": "s98", "model": str(tmp_path)}
    gone = {"name": "s00_gone", "model": str(tmp_path / "gone")}
    md = value_study.ranking_table([kept, unranked, gone, {"name": "s01_no_folder"}], json.loads(json.dumps(base)))
    assert "| s99 (mean) |" in md and "| s99 (max) |" in md
    assert "| s98 | not ranked yet (--ranking) | not ranked yet (--ranking) |" in md
    assert "| s00_gone | model not kept | model not kept |" in md
    assert "| s01_no_folder | model not kept | model not kept |" in md
    sp = base["results"]["8"]["scorers"]["partial-text reward"]["spearman"]
    assert f"{sp['mean']:.2f} [{sp['lo']:.2f}, {sp['hi']:.2f}]" in md
    # the gain table: the reward's own gain, and each ranked model's gain minus the reward's
    bounds = list(base["results"])
    gains = [base["results"][t]["scorers"]["partial-text reward"]["gain"] for t in bounds]
    assert ("| partial-text reward | " + " | ".join(
        f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]" for g in gains) + " |") in md
    assert "| s99 (mean) − reward | +0.000 [+0.000, +0.000] |" in md  # the reward against itself
    old = {"name": "s97", "ranking": {"setting": data["key"], "results": {
        t: {"V": {k: v for k, v in b["scorers"]["partial-text reward"].items() if k != "gain_minus_reward"}}
        for t, b in base["results"].items()}}}
    md = value_study.ranking_table([old], base)
    assert "| s97 − reward | ranked before the gain was recorded |" in md


def test_heldout_answers_reads_first_samples(tmp_path):
    rows = [{"prompt_id": i, "sample": s, "prompt": f"p{i}", "prompt_token_ids": [i], "response_token_ids": [i, s]}
            for i in (2, 0, 1) for s in (1, 0)]
    (tmp_path / "dataset.json").write_text(json.dumps({"format": 1, "num_prompts": 3, "sampling": {"num_samples": 2}}))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, pids, answers = sibling_ranking.heldout_answers(tmp_path, 2, 1)
    assert prompts == ["p1", "p2"] and pids == [[1], [2]] and answers == [[1, 0], [2, 0]]
    with pytest.raises(ValueError, match="3 prompts, 4 needed"):
        sibling_ranking.heldout_answers(tmp_path, 3, 1)


def test_blends_are_cross_fitted_against_a_direct_loop():
    """r + a (V - r): a chosen on one half of a boundary's prefixes by a plain loop over the grid,
    scored on the other half, both ways; a = 0 (V = r) gives back the reward's own figure."""
    rng = np.random.default_rng()
    data = _fake_draw(rng, prompts=9)
    values, partial = np.asarray(data["values"]), np.asarray(data["partial"])
    target = values.mean(-1)
    model = target + rng.normal(0, 0.7, size=target.shape)            # a noisy value model
    rep = sibling_ranking.rank(data, {}, extra_scores={"V": model, "same": partial.copy()})
    for t in data["key"]["boundaries"]:
        idx = [j for j, c in enumerate(data["cases"]) if c["boundary"] == t]
        halves = (idx[:len(idx) // 2], idx[len(idx) // 2:])

        def rhos(score, js):
            return [spearmanr(score[j], target[j]).statistic for j in js
                    if np.ptp(score[j]) > 0 and np.ptp(target[j]) > 0]

        want, chosen = [], []
        for fit, test in (halves, halves[::-1]):
            best_a, best = None, -np.inf
            for a in sibling_ranking.ALPHAS:
                m = np.mean(rhos(partial + a * (model - partial), fit) or [-np.inf])
                if m > best + 1e-12:      # the first (smallest) a on ties
                    best_a, best = a, m
            chosen.append(best_a)
            want += rhos(partial + best_a * (model - partial), test)
        got = rep[str(t)]["scorers"][sibling_ranking.blend_name("V")]
        assert got["alphas"] == chosen
        # means of <= 9 float64 correlations: rounding ~1e-15; ties between grid points within
        # that are broken by the smallest a in both
        assert got["spearman"]["mean"] == pytest.approx(np.mean(want), abs=1e-12)
        same = rep[str(t)]["scorers"][sibling_ranking.blend_name("same")]
        assert same["spearman"]["mean"] == pytest.approx(
            rep[str(t)]["scorers"]["partial-text reward"]["spearman"]["mean"], abs=1e-12)


def test_within_reward_ties_against_a_direct_loop():
    data, partial, target, model, rep = _tied_rewards_and_a_model()
    for t in data["key"]["boundaries"]:
        want = []
        for j, c in enumerate(data["cases"]):
            if c["boundary"] != t:
                continue
            for level in sorted(set(partial[j])):
                g = [s for s in range(len(partial[j])) if partial[j][s] == level]
                if len(g) >= 3 and np.ptp(model[j][g]) > 0 and np.ptp(target[j][g]) > 0:
                    want.append(spearmanr(model[j][g], target[j][g]).statistic)
        got = rep[str(t)]["scorers"]["V"]["within_reward_ties"]
        assert got["n"] == len(want)
        # means of float64 correlations, summed in another order: rounding ~1e-15
        assert got["mean"] == pytest.approx(np.mean(want), abs=1e-12)


def test_selection_gain_against_a_direct_loop():
    """The value of each scorer's choice (a uniform pick among its ties) minus the siblings' mean,
    and its paired difference to the reward's, cross-fitted blends included, by plain loops."""
    data, partial, target, model, rep = _tied_rewards_and_a_model()

    def gain(scores, j):
        top = [s for s in range(len(scores)) if scores[s] == max(scores)]
        return sum(target[j][s] for s in top) / len(top) - sum(target[j]) / len(target[j])

    for t in data["key"]["boundaries"]:
        idx = [j for j, c in enumerate(data["cases"]) if c["boundary"] == t]
        got = rep[str(t)]["scorers"]
        want_r = [gain(partial[j], j) for j in idx]
        want_v = [gain(model[j], j) for j in idx]
        # means of 9 float64 differences of means of <= 8 values: rounding ~1e-15
        assert got["partial-text reward"]["gain"]["mean"] == pytest.approx(np.mean(want_r), abs=1e-12)
        assert got["V"]["gain"]["mean"] == pytest.approx(np.mean(want_v), abs=1e-12)
        assert got["V"]["gain_minus_reward"]["mean"] == pytest.approx(np.mean(want_v) - np.mean(want_r), abs=1e-12)
        # the blend with the a that was chosen on the other half of the prefixes
        blend = got[sibling_ranking.blend_name("V")]
        halves = (idx[:len(idx) // 2], idx[len(idx) // 2:])
        want_b = [gain(partial[j] + a * (model[j] - partial[j]), j)
                  for a, test in zip(blend["alphas"], halves[::-1]) for j in test]
        assert blend["gain"]["mean"] == pytest.approx(np.mean(want_b), abs=1e-12)
        assert blend["gain"]["n"] == len(idx)


def test_reward_ties_broken_by_a_model_against_a_direct_loop():
    """'reward, ties by V': the reward's order, V's among equal rewards only; its Spearman and its
    choice by a lexicographic sort."""
    data, partial, target, model, rep = _tied_rewards_and_a_model()
    for t in data["key"]["boundaries"]:
        rhos, gains = [], []
        for j, c in enumerate(data["cases"]):
            if c["boundary"] != t:
                continue
            order = sorted(range(8), key=lambda s: (partial[j][s], model[j][s]))   # ascending
            pos = np.empty(8)
            pos[order] = np.arange(8)
            if np.ptp(target[j]) > 0:
                rhos.append(spearmanr(pos, target[j]).statistic)
            gains.append(target[j][order[-1]] - target[j].mean())   # continuous V: no ties left
        got = rep[str(t)]["scorers"][sibling_ranking.tiebreak_name("V")]
        assert got["spearman"]["n"] == len(rhos)
        # means of float64 correlations and differences: rounding ~1e-15
        assert got["spearman"]["mean"] == pytest.approx(np.mean(rhos), abs=1e-12)
        assert got["gain"]["mean"] == pytest.approx(np.mean(gains), abs=1e-12)
