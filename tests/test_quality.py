"""benchmarks/quality_stats.py against direct, obviously-correct computations on random inputs."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random

import numpy as np
import pytest

from benchmarks.quality_stats import (
    best_of_n,
    bon_kl,
    bon_weights,
    bootstrap_ci,
    mean_ci,
    sequence_kl,
    win_scores,
)


@pytest.mark.parametrize("seed", range(5))
def test_mean_ci_is_the_textbook_normal_interval(seed: int) -> None:
    rng = random.Random(seed)
    x = [rng.gauss(0.3, 0.7) for _ in range(rng.randint(2, 300))]
    n = len(x)
    mean = sum(x) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = 1.959963984540054 * sd / math.sqrt(n)
    m, lo, hi = mean_ci(x)
    # float64 sums of at most 300 terms both ways: agree to ~300 * 1.1e-16
    assert (m, lo, hi) == pytest.approx((mean, mean - half, mean + half), rel=1e-12, abs=1e-12)


def test_mean_ci_single_value_and_errors() -> None:
    assert mean_ci([0.25]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        mean_ci([])


@pytest.mark.parametrize("seed", range(3))
def test_bootstrap_ci_matches_a_loop_and_the_normal_interval(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=400)
    m, lo, hi = bootstrap_ci(x, n_boot=500, seed=seed)
    # the same resamples drawn one by one
    draws = np.random.default_rng(seed).integers(0, x.size, size=(500, x.size))
    means = sorted(float(np.mean([x[j] for j in row])) for row in draws)
    assert m == pytest.approx(float(np.mean(x)))
    assert lo == pytest.approx(float(np.quantile(means, 0.025)), rel=1e-9)
    assert hi == pytest.approx(float(np.quantile(means, 0.975)), rel=1e-9)
    # and, for 400 normal values, close to the normal approximation
    _, nlo, nhi = mean_ci(x)
    assert abs(lo - nlo) < 0.03 and abs(hi - nhi) < 0.03, (lo, hi, nlo, nhi)


@pytest.mark.parametrize("seed", range(5))
def test_win_scores_count_ties_half(seed: int) -> None:
    rng = random.Random(seed)
    a = [rng.choice([-1.0, 0.0, 0.5, 1.0]) for _ in range(200)]  # many ties on purpose
    b = [rng.choice([-1.0, 0.0, 0.5, 1.0]) for _ in range(200)]
    expected = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    assert win_scores(a, b).tolist() == expected
    with pytest.raises(ValueError, match="same|one shape"):
        win_scores(a, b[:-1])


@pytest.mark.parametrize("seed", range(5))
def test_sequence_kl_is_the_sum_of_logprob_differences(seed: int) -> None:
    rng = random.Random(seed)
    lens = [rng.randint(1, 40) for _ in range(30)]
    lp = [[math.log(rng.random()) for _ in range(n)] for n in lens]
    ref = [[math.log(rng.random()) for _ in range(n)] for n in lens]
    expected = [sum(a - b for a, b in zip(x, y)) for x, y in zip(lp, ref)]
    assert sequence_kl(lp, ref) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="sample 0"):
        sequence_kl([lp[0] + [0.0]], [ref[0]])


def test_sequence_kl_estimates_the_exact_kl_of_two_token_distributions() -> None:
    """Mean of the per-sample estimator, over samples of pi, approaches KL(pi || ref)."""
    rng = np.random.default_rng(0)
    pi = rng.dirichlet(np.ones(6))
    ref = rng.dirichlet(np.ones(6))
    exact = 2 * float(np.sum(pi * (np.log(pi) - np.log(ref))))  # two independent steps
    toks = rng.choice(6, p=pi, size=(40_000, 2))  # [S, T]
    est = sequence_kl(np.log(pi)[toks].tolist(), np.log(ref)[toks].tolist()).mean()
    # Monte Carlo, not rounding: 40k samples of a per-sample KL with sd ~0.6: 5 sigma ~ 0.015
    assert est == pytest.approx(exact, abs=0.02)


def test_bon_kl_formula() -> None:
    for n in (1, 2, 4, 16, 128):
        assert bon_kl(n) == pytest.approx(math.log(n) - (n - 1) / n)
    assert bon_kl(1) == 0.0
    with pytest.raises(ValueError):
        bon_kl(0)


@pytest.mark.parametrize("m", [1, 2, 5, 9])
def test_bon_weights_are_the_distribution_of_the_subset_maximum(m: int) -> None:
    for n in range(1, m + 1):
        counts = np.zeros(m)
        subsets = list(itertools.combinations(range(m), n))
        for s in subsets:
            counts[max(s)] += 1
        assert bon_weights(m, n) == pytest.approx(counts / len(subsets), abs=1e-15)
        assert bon_weights(m, n).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_best_of_n_equals_the_average_over_all_subsets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    P, M = 7, 8
    rewards = rng.integers(-3, 4, size=(P, M)).astype(float) / 4  # [P, M] with ties
    baseline = rng.integers(-3, 4, size=P).astype(float) / 4  # [P]
    for n in range(1, M + 1):
        subsets = list(itertools.combinations(range(M), n))
        exp_reward = [np.mean([max(rewards[p, list(s)]) for s in subsets]) for p in range(P)]
        exp_win = [np.mean([win_scores([max(rewards[p, list(s)])], [baseline[p]])[0]
                            for s in subsets]) for p in range(P)]
        assert best_of_n(rewards, n) == pytest.approx(exp_reward, abs=1e-12)
        wins = np.stack([win_scores(rewards[:, j], baseline) for j in range(M)], axis=1)
        assert best_of_n(rewards, n, values=wins) == pytest.approx(exp_win, abs=1e-12)
    # N = M is the best sample; N = 1 is the plain mean
    assert best_of_n(rewards, M) == pytest.approx(rewards.max(axis=1))
    assert best_of_n(rewards, 1) == pytest.approx(rewards.mean(axis=1))


def test_best_of_n_with_many_samples_has_no_overflow() -> None:
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(3, 128))
    for n in (2, 16, 64, 127, 128):
        w = bon_weights(128, n)
        assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)
    assert best_of_n(rewards, 128) == pytest.approx(rewards.max(axis=1))
    # monotone in N
    means = [best_of_n(rewards, n).mean() for n in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert all(a <= b + 1e-12 for a, b in zip(means, means[1:])), means


def test_targets_and_the_bon_curve_on_hand_made_rows() -> None:
    """benchmarks.quality_report.targets: the [F] and [G] checks on rows whose answers are known."""
    from benchmarks.quality_report import bon_curve, targets

    rows = [dict(label="plain", kind="plain", reward=0.1, kl=0.0, wall_s_per_prompt=0.05),
            dict(label="best-of-4", kind="bon", n=4, reward=0.6, kl=bon_kl(4), wall_s_per_prompt=0.25),
            dict(label="best-of-16", kind="bon", n=16, reward=0.8, kl=bon_kl(16), wall_s_per_prompt=1.0),
            dict(label="exact-bon N=4", kind="exact_bon", n=4, reward=0.57, kl=1.0,
                 kl_exact_bon=bon_kl(4), wall_s_per_prompt=0.2),
            dict(label="exact-bon N=16", kind="exact_bon", n=16, reward=0.7, kl=2.0,
                 kl_exact_bon=bon_kl(16), wall_s_per_prompt=0.2),
            dict(label="tilt beta=8", kind="tilt", reward=0.81, kl=5.0, wall_s_per_prompt=0.24)]
    # linear between (0, 0.1), (0.636, 0.6) and (1.835, 0.8)
    assert bon_curve(rows, bon_kl(4)) == pytest.approx(0.6)
    assert bon_curve(rows, 1.2) == pytest.approx(0.6 + 0.2 * (1.2 - bon_kl(4)) / (bon_kl(16) - bon_kl(4)))
    t = targets(rows)
    assert t["exact_bon_4"]["met"] and not t["exact_bon_16"]["met"]   # gap 0.03 vs 0.10
    assert t["bon16_at_quarter_cost"]["met"] and t["bon16_at_quarter_cost"]["meeting"] == ["tilt beta=8"]
    low = t["kl_le_2_within_0.05"]                                     # KL <= 2: the two exact-bon rows
    assert set(low["gaps"]) == {"exact-bon N=4", "exact-bon N=16"} and low["best_label"] == "exact-bon N=4"
    assert low["met"] == (low["gap"] <= 0.05)


def test_search_targets_compare_nominal_budgets() -> None:
    """benchmarks.search_report.targets: [K]'s compute and KL checks on hand-made rows. A search
    counts within Best-of-N's budget by its nominal samples (grid `k`), not by tokens that EOS
    made a percent larger; the KL check looks at settings of exactly that budget; the compute
    check reports the fastest setting that reaches Best-of-2N's reward."""
    from benchmarks.search_report import bon_curve, targets

    def bon(n: int, reward: float) -> dict:
        return dict(label=f"best-of-{n}", kind="bon", n=n, reward=reward, kl=bon_kl(n),
                    gen_tokens_per_prompt=40.0 * n * 0.96, wall_s_per_prompt=0.05 * n)

    def search(label: str, k: float, reward: float, kl: float, wall: float, **kw) -> dict:
        return dict(label=label, kind="search", k=k, scorer=kw.pop("scorer", "reward"), reward=reward,
                    kl=kl, gen_tokens_per_prompt=40.0 * k * 0.98, wall_s_per_prompt=wall, **kw)

    rows = [dict(label="plain", kind="plain", n=1, reward=0.2, kl=0.0, gen_tokens_per_prompt=38.0),
            bon(2, 0.44), bon(4, 0.62), bon(8, 0.75), bon(16, 0.84), bon(32, 0.89),
            search("cheap", 2, 0.50, 0.38, 0.10),
            search("fast 4", 4, 0.76, 1.20, 0.24),      # reaches BoN-8, 1.2x BoN-4's timed wall
            search("slow 4", 4, 0.80, 2.50, 0.40),      # higher, but 2x
            search("value 4", 4, 0.70, 1.25, 0.25, scorer="positive"),
            search("only 4", 4, 0.90, 1.25, 0.25, value_only=True),   # no reward at the end: not a rival
            search("sixteen", 16, 0.95, 3.60, 0.70)]
    timed = {"4": dict(wall_s_per_prompt=0.20), "8": dict(wall_s_per_prompt=0.40),
             "16": dict(wall_s_per_prompt=0.80)}
    t = targets(rows, [], timed)
    c4 = t["compute_N4"]
    assert c4["best"] == "fast 4" and c4["met"] and c4["wall_ratio_to_bon_n"] == pytest.approx(1.2)
    assert c4["per_scorer"]["positive"]["gap_to_2n"] == pytest.approx(0.75 - 0.70)
    # within BoN-8's budget "slow 4" has the best reward, short of BoN-16's 0.84
    assert t["compute_N8"]["best"] == "slow 4" and not t["compute_N8"]["reward_met"]
    # "sixteen" is within BoN-16's budget (its tokens are above BoN-16's 614.4: nominal counts)
    assert t["compute_N16"]["best"] == "sixteen" and t["compute_N16"]["met"]
    # KL at budget 4: "cheap" (budget 2) does not count; the smallest gap of the budget-4 rows
    gaps = {lab: bon_curve(rows, kl) - r for lab, r, kl in (("fast 4", 0.76, 1.20), ("slow 4", 0.80, 2.50),
                                                            ("value 4", 0.70, 1.25))}
    assert t["kl_N4"]["best"] == min(gaps, key=gaps.get)
    assert t["kl_N4"]["gap"] == pytest.approx(min(gaps.values()))
    assert t["kl_N4"]["met"] == (min(gaps.values()) <= 0.05)
    assert "kl_N8" not in t                                              # no budget-8 setting
    # the stretch (Best-of-32's 0.89 within Best-of-8's budget) is held to the compute terms:
    # "slow 4" has the budget's best reward, 0.80, short of it
    st = t["stretch_bon32_at_bon8_tokens"]
    assert st["best"] == "slow 4" and not st["reward_met"] and not st["met"]
    # reaching Best-of-32's reward is not enough: at 2.5x Best-of-8's timed wall it misses; at 1.1x
    # it meets, and the faster of the two is reported
    rows += [search("deep 8", 8, 0.93, 9.0, 1.00), search("quick 8", 8, 0.90, 4.0, 0.44)]
    st = targets(rows, [], timed)["stretch_bon32_at_bon8_tokens"]
    assert st["best"] == "quick 8" and st["met"] and st["wall_ratio_to_bon_n"] == pytest.approx(1.1)
    rows.pop()
    st = targets(rows, [], timed)["stretch_bon32_at_bon8_tokens"]
    assert st["best"] == "deep 8" and st["reward_met"] and not st["met"]
    assert st["wall_ratio_to_bon_n"] == pytest.approx(2.5) and st["bon_32_reward"] == 0.89
    # "sixteen" spends 3.60 nats, beyond Best-of-32's 2.50: no measured curve there, so its gap
    # (against Best-of-32's reward, a lower bound) is listed but does not count
    assert bon_kl(32) < 3.60
    assert t["kl_N16"]["best"] is None and not t["kl_N16"]["met"]
    assert t["kl_N16"]["beyond_bon_range"] == {"sixteen": pytest.approx(0.89 - 0.95)}
    assert "beyond_estimate_with_other_run" not in t["kl_N16"]
    # another run's larger N continues the curve for an estimate that never meets the target:
    # its points up to this run's largest KL are ignored; "sixteen" at 3.60 nats lies between
    # Best-of-32 (2.50, this run) and the other run's Best-of-64 (3.17) / 128 (3.86)
    other = [dict(n=32, kl=bon_kl(32), reward=0.5), dict(n=64, kl=bon_kl(64), reward=0.93),
             dict(n=128, kl=bon_kl(128), reward=0.97)]
    est = targets(rows, [], timed, other)["kl_N16"]
    w = (3.60 - bon_kl(64)) / (bon_kl(128) - bon_kl(64))
    assert est["beyond_estimate_with_other_run"] == {
        "other_run_bon": {"64": 0.93, "128": 0.97},
        "gaps": {"sixteen": pytest.approx((1 - w) * 0.93 + w * 0.97 - 0.95)}}
    assert not est["met"] and est["best"] is None


def test_search_cost_model_and_timed_means() -> None:
    """benchmarks.search_report.cost_model recovers the per-token costs of wall-clock built from
    random costs (exactly, up to float64 least squares); rows scored by a value model or by SMC
    are left out. benchmarks.search.timed_means averages Best-of-N's two timed runs."""
    from benchmarks.search import timed_means
    from benchmarks.search_report import cost_model

    rng = np.random.default_rng()
    a, b = rng.uniform(1e-4, 1e-2, size=2)
    timed = {str(n): dict(gen_tokens_per_prompt=38.0 * n, recomputed_tokens_per_prompt=6.5 * n,
                          wall_s_per_prompt=a * 38.0 * n + b * 6.5 * n) for n in (4, 8, 16)}
    rows = []
    for i in range(8):
        g, r = rng.uniform(50, 700), rng.uniform(20, 500)
        rows.append(dict(kind="search", scorer="reward", rule="best_of_k", gen_tokens_per_prompt=g,
                         recomputed_tokens_per_prompt=r, wall_s_per_prompt=a * g + b * r))
    rows.append(dict(kind="search", scorer="positive", rule="best_of_k", gen_tokens_per_prompt=300.0,
                     recomputed_tokens_per_prompt=200.0, wall_s_per_prompt=99.0))   # not a point
    rows.append(dict(kind="search", scorer="reward", rule="smc", gen_tokens_per_prompt=300.0,
                     recomputed_tokens_per_prompt=200.0, wall_s_per_prompt=99.0))   # not a point
    m = cost_model(rows, timed)
    assert m is not None and m["points"] == 11
    assert m["s_per_gen_token"] == pytest.approx(a, rel=1e-9) and m["s_per_recomputed_token"] == pytest.approx(b, rel=1e-9)
    assert m["recomputed_in_gen_tokens"] == pytest.approx(b / a, rel=1e-9) and m["r2"] == pytest.approx(1.0)
    assert cost_model(rows[:1], {}) is None
    t = timed_means({"4": dict(wall_s_per_prompt=0.2, n=4), "8": dict(wall_s_per_prompt=0.4)},
                    {"4": dict(wall_s_per_prompt=0.3)})
    assert t["4"]["wall_s_per_prompt"] == pytest.approx(0.25) and t["4"]["wall_runs_s_per_prompt"] == [0.2, 0.3]
    assert t["4"]["n"] == 4 and t["8"]["wall_runs_s_per_prompt"] == [0.4]


def _cascade_direct(partial: np.ndarray, lengths: np.ndarray, n0: int, plan) -> tuple[list[float], list[int]]:
    """benchmarks.pruning.cascade, one prompt and one sample at a time."""
    rewards, tokens = [], []
    for p in range(partial.shape[0]):
        alive, used, prev = list(range(n0)), 0, 0
        for m, keep in plan:
            for s in alive:
                used += max(0, min(int(lengths[p, s]), m) - prev) if lengths[p, s] > prev else 0
            alive = sorted(alive, key=lambda s: (-partial[p, s, m - 1], s))[:keep]
            prev = m
        for s in alive:
            used += max(0, int(lengths[p, s]) - prev)
        rewards.append(max(partial[p, s, -1] for s in alive))
        tokens.append(used)
    return rewards, tokens


def test_pruning_cascade_matches_a_direct_loop() -> None:
    """The vectorised cascade against a per-prompt loop on fresh random samples: random lengths
    (samples that ended early), random partial rewards with ties, random plans."""
    from benchmarks.pruning import best_under, cascade, cross_fit, evaluate, plans

    rng = np.random.default_rng()
    P, S, T = 7, 12, 10
    lengths = rng.integers(1, T + 1, size=(P, S))
    partial = rng.integers(-3, 4, size=(P, S, T)).astype(float) / 4     # ties on purpose
    for p in range(P):
        for s in range(S):
            partial[p, s, lengths[p, s]:] = partial[p, s, lengths[p, s] - 1]
    grid = plans(T, (4, 8, 12), max_stages=2)
    for i in rng.choice(len(grid), size=40, replace=False):
        n0, plan = grid[i]
        r, t = cascade(partial, lengths, n0, plan)
        r_ref, t_ref = _cascade_direct(partial, lengths, n0, plan)
        assert r.tolist() == r_ref and t.tolist() == t_ref, (n0, plan)
    # no pruning is Best-of-N0
    r, t = cascade(partial, lengths, 8, ())
    assert r.tolist() == partial[:, :8, -1].max(1).tolist() and t.tolist() == lengths[:, :8].sum(1).tolist()
    # the best plan under a budget respects it; with one plan in the grid, cross-fitting scores it
    table = evaluate(partial, lengths, grid)
    b = best_under(table, grid, 30.0)
    assert b is None or b["tokens"] <= 30.0
    if b is not None:   # the best is the best fitting cascade of a direct search over the grid
        direct = [(np.mean(r), -i) for i, (n0, plan) in enumerate(grid)
                  for r, t in [_cascade_direct(partial, lengths, n0, plan)] if np.mean(t) <= 30.0]
        assert (b["reward"], -b["index"]) == pytest.approx(max(direct), rel=1e-12)
    half = np.arange(P) < P // 2
    bh = best_under(table, grid, 1e9, half)
    assert bh["reward"] == pytest.approx(max(cascade(partial[half], lengths[half], n0, plan)[0].mean()
                                             for n0, plan in grid), rel=1e-12)
    one = [grid[0]]
    full = cascade(partial, lengths, *one[0])
    cf = cross_fit(evaluate(partial, lengths, one), one, 1e9)
    assert cf["reward"] == pytest.approx(full[0].mean(), rel=1e-12)
    assert cf["tokens"] == pytest.approx(full[1].mean(), rel=1e-12)


def test_search_grid_appends_extra_value_models_without_moving_the_fixed_grid() -> None:
    """--value-model rows come after the fixed grid (a setting's index picks its seeds, so the
    fixed rows keep theirs), a model's rows are contiguous (adding a model after it keeps its
    rows' indices), score with the model's name, and keep their budgets; a name that shadows a
    built-in scorer is refused."""
    from benchmarks.search import grid

    base = grid(40)
    more = grid(40, ("s19", "s21"))
    assert more[:len(base)] == base
    alone = grid(40, ("s19",))
    assert more[:len(alone)] == alone
    extra = more[len(base):]
    assert len({label for label, _, _ in more}) == len(more)
    assert [label for label, _, _ in extra[:5]] == ["2x20x4 s19", "2x20x8 s19", "8x5x4 s19", "sched 16,8,4,4 s19",
                                                    "2x20x8 s19 value only"]
    for label, knobs, info in extra:
        twin = label.replace("s19", "reward").replace("s21", "reward")
        assert knobs["search_scorer"] == info["scorer"] and info["scorer"] in ("s19", "s21")
        if not info.get("value_only") and twin in {s[0] for s in base}:   # the reward-scored row's knobs, budget
            ref = next(s for s in base if s[0] == twin)
            assert info["k"] == ref[2]["k"]
            assert {k: v for k, v in knobs.items() if k != "search_scorer"} == \
                {k: v for k, v in ref[1].items() if k != "search_scorer"}
    assert [label for label, _, _ in extra[5:9]] == ["8x5x8 s19", "4x10x8 s19", "2x20x4 s21", "2x20x8 s21"]
    assert [label for label, _, _ in extra[12:]] == ["8x5x8 s21", "4x10x8 s21"]
    with pytest.raises(SystemExit, match="built-in scorers"):
        grid(40, ("positive",))


def test_search_benchmark_refuses_to_overwrite_a_partial_run_of_other_settings(tmp_path) -> None:
    """A resumable run whose settings differ is neither resumed nor silently replaced: the
    benchmark stops before it starts an engine, names both settings and the way out."""
    from benchmarks import search

    other = {"settings": {"prompts": 256, "max_tokens": 40, "seed": 0, "nmax": 64, "format": 1}, "rows": {"x": {}}}
    partial = tmp_path / "search.partial.json"
    partial.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other settings.*--fresh"):
        search.main(["--out-dir", str(tmp_path), "--bon-n", "2", "4", "128"])
    assert json.loads(partial.read_text()) == other


def test_search_benchmark_refuses_another_model_under_a_name_it_has_rows_of(tmp_path) -> None:
    """A resumed run records each extra value model's weights (sha256 of model.safetensors) and
    refuses other weights under the same name before it starts an engine; the same weights, or
    a new name, go on (here: to the next check, an engine it cannot start on a missing folder)."""
    from benchmarks import search

    settings = {"prompts": 256, "max_tokens": 40, "seed": 0, "nmax": 64, "format": 1}
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, data in ((a, b"weights a"), (b, b"weights b")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(data)
        (folder / "vas.json").write_text("{}")
    digest = hashlib.sha256(b"weights a").hexdigest()[:16]
    assert search.weights_digest(a) == digest
    saved = {"settings": settings, "rows": {"x": {}}, "value_models": {"m": digest}}
    partial = tmp_path / "search.partial.json"
    partial.write_text(json.dumps(saved))
    argv = ["--out-dir", str(tmp_path), "--bon-n", "2", "4", "8", "16", "32", "64", "--only", "x"]
    with pytest.raises(SystemExit, match=r"--value-model m: .*other weights.*another name"):
        search.main([*argv, "--value-model", f"m={b}"])
    assert json.loads(partial.read_text()) == saved
    with pytest.raises(SystemExit, match="--only: unknown settings"):   # past the check: same weights
        search.main([*argv, "--value-model", f"m={a}"])


def test_search_benchmark_bon_sizes_hold_plain_sampling_once() -> None:
    """Best-of-1 is plain sampling, always a row and only one: asking for it too (as the second
    machine's README command does) must not add a second plain row; sizes below 1 are refused."""
    from benchmarks import search

    assert search._parse(["--bon-n", "1", "2", "4", "4"]).bon_n == [1, 2, 4]
    assert search._parse(["--bon-n", "8", "2"]).bon_n == [1, 2, 8]
    with pytest.raises(SystemExit):
        search._parse(["--bon-n", "0", "2"])
