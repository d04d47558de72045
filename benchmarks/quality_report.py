"""Reporting of the quality benchmark (benchmarks/quality.py): the per-row summary, the markdown
table, the [F]/[G] targets and the plots. numpy (and matplotlib for the plots) only, no engine."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality_stats import best_of_n, mean_ci, win_scores


def summarise(rows: list[dict], plain_rewards: np.ndarray, bon_matrix: np.ndarray | None,
              n_prompts: int) -> None:
    """Adds reward / win-rate intervals and per-prompt costs to each row, in place."""
    for r in rows:
        rew = np.asarray(r["rewards"])
        r["reward"], *ci = mean_ci(rew)
        r["reward_ci"] = ci
        if r["kind"] == "bon" and bon_matrix is not None:
            # win indicator of the best sample of each N-subset, averaged over subsets
            wins = best_of_n(bon_matrix, r["n"], values=np.stack(
                [win_scores(bon_matrix[:, j], plain_rewards) for j in range(bon_matrix.shape[1])],
                axis=1))
        else:
            wins = win_scores(rew, plain_rewards)
        r["win"], *wci = mean_ci(wins)
        r["win_ci"] = wci
        r["gen_tokens_per_prompt"] = r["gen_tokens"] / n_prompts
        r["value_tokens_per_prompt"] = r["value_tokens"] / n_prompts
        r["wall_s_per_prompt"] = r["wall_s"] / n_prompts


def table(rows: list[dict]) -> str:
    lines = ["| method | mean reward [95% CI] | win vs plain [95% CI] | KL (nats) | "
             "gen tokens / prompt | value-model tokens / prompt | wall-clock (s) | s / prompt |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"{r['kl']:.2f}" + (" (formula)" if r["kind"] == "bon" else "")
        if r.get("kl_exact_bon") is not None:
            kl += f" (exact BoN: {r['kl_exact_bon']:.2f})"
        wall = f"{r['wall_s']:.1f}" + (f" (scaled from N={r['wall_scaled_from']})"
                                       if r.get("wall_scaled_from") else "")
        if r.get("wall_timed_s") is not None:
            wall += f"; timed alone {r['wall_timed_s']:.1f}"
        lines.append(
            f"| {r['label']} | {r['reward']:+.3f} [{r['reward_ci'][0]:+.3f}, {r['reward_ci'][1]:+.3f}] "
            f"| {r['win']:.3f} [{r['win_ci'][0]:.3f}, {r['win_ci'][1]:.3f}] | {kl} "
            f"| {r['gen_tokens_per_prompt']:.1f} | {r['value_tokens_per_prompt']:.0f} | {wall} "
            f"| {r['wall_s_per_prompt']:.3f} |")
    return "\n".join(lines)


def bon_curve(rows: list[dict], kl: float) -> float:
    """Best-of-N's reward at a KL bound, interpolated linearly in KL between its N (plain at 0).
    Beyond the largest N's KL it holds that N's reward (np.interp clamps), so a gap to it there is
    a lower bound (search_report.beyond_bon says when)."""
    pts = sorted([(0.0, r["reward"]) for r in rows if r["kind"] == "plain"]
                 + [(r["kl"], r["reward"]) for r in rows if r["kind"] == "bon"])
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return float(np.interp(kl, xs, ys))


def targets(rows: list[dict]) -> dict[str, Any]:
    """The quality targets of issues [F] and [G], evaluated on this run's rows."""
    bon = {r["n"]: r for r in rows if r["kind"] == "bon"}
    guided = [r for r in rows if r["kind"] not in ("plain", "bon")]
    out: dict[str, Any] = {}
    for r in rows:
        if r["kind"] in ("exact_bon", "exact_bon_keep") and r["n"] in bon:
            b = bon[r["n"]]
            out[f"{r['kind']}_{r['n']}"] = dict(
                reward=r["reward"], bon_reward=b["reward"], gap=b["reward"] - r["reward"],
                kl=r["kl"], kl_limit=2 * r["kl_exact_bon"],
                met=bool(b["reward"] - r["reward"] <= 0.05 and r["kl"] <= 2 * r["kl_exact_bon"]))
    if 16 in bon and guided:
        b16 = bon[16]
        ok = [r for r in guided if r["reward"] >= b16["reward"]
              and r["wall_s_per_prompt"] <= b16["wall_s_per_prompt"] / 4]
        best = max(guided, key=lambda r: r["reward"])
        out["bon16_at_quarter_cost"] = dict(
            met=bool(ok), bon16_reward=b16["reward"], bon16_s=b16["wall_s_per_prompt"],
            best_label=best["label"], best_reward=best["reward"], best_s=best["wall_s_per_prompt"],
            meeting=[r["label"] for r in ok])
    low = [r for r in guided if r["kl"] <= 2.0]
    if low and bon:
        gaps = {r["label"]: bon_curve(rows, r["kl"]) - r["reward"] for r in low}
        best = min(gaps, key=gaps.get)
        out["kl_le_2_within_0.05"] = dict(met=bool(gaps[best] <= 0.05), best_label=best,
                                          gap=gaps[best], gaps=gaps)
    return out


def plot(rows: list[dict], out_dir: Path, name: str, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"vas": ("VAS 'positive' (beta)", "o-", "C0"),
              "vas_bon": ("VAS 'positive-bon' (vas_bon_n)", "s--", "C2"),
              "tilt": ("exact tilt 'positive-dist' (vas_tilt)", "D-", "C1"),
              "exact_bon": ("exact Best-of-N 'positive-dist' (vas_bon_n)", "v-", "C4"),
              "tilt_keep": ("tilt, vas_rest keep 'positive-dist'", "D--", "C5"),
              "exact_bon_keep": ("exact Best-of-N, vas_rest keep 'positive-dist'", "v--", "C6"),
              "bon": ("Best-of-N (N)", "^:", "C3"), "plain": ("plain sampling", "*", "k")}

    def series(ax, xkey: str) -> None:
        for kind, (lab, style, color) in groups.items():
            rs = [r for r in rows if r["kind"] == kind]
            if not rs:
                continue
            x = [r[xkey] for r in rs]
            y = [r["reward"] for r in rs]
            err = np.array([[r["reward"] - r["reward_ci"][0] for r in rs],
                            [r["reward_ci"][1] - r["reward"] for r in rs]])
            ax.errorbar(x, y, yerr=err, fmt=style, color=color, label=lab, capsize=2, ms=6)
            for r, xi, yi in zip(rs, x, y):
                tag = r.get("tag")
                if tag:
                    ax.annotate(tag, (xi, yi), textcoords="offset points", xytext=(4, -10),
                                fontsize=7, color=color)
        ax.set_ylabel("mean reward (VADER compound of prompt + response)")
        ax.grid(alpha=0.3)

    paths = []
    fig, ax = plt.subplots(figsize=(7, 5))
    series(ax, "kl")
    ax.set_xlabel("KL(pi || pi_ref) in nats per answer (Best-of-N: log N - (N-1)/N)")
    ax.set_title(f"Reward vs KL: {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{name}_reward_kl.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    series(axes[0], "wall_s_per_prompt")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("wall-clock seconds per prompt (log; Best-of-N scaled N/Nmax)")
    series(axes[1], "gen_tokens_per_prompt")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("generated tokens per prompt (log)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Reward vs cost: {title}", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / f"{name}_reward_cost.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
