"""TD(lambda) for value models with a terminal reward, exactly as in docs/vas-algorithm.md. Torch only.

Per response of T tokens y_1..y_T after prompt x (P tokens), with V[t] = V(x + y_1..y_t):

    rew[t]   = 0 for t < T-1,  rew[T-1] = r
    delta[t] = rew[t] + gamma * V[t+1] - V[t]          (V[T] = 0: the episode ends)
    A[t]     = sum_{s=t}^{T-1} (gamma*lam)^(s-t) delta[s]
    target   = A + V
    loss     = 0.5 * mean over real tokens of (V_new - target)^2

The value model reads prompt + response[:-1] (P + T - 1 tokens); V[t] sits at position P-1+t
(t = 0 is the prompt alone). The last token y_T is never a prefix to value: the state after it is
terminal.

Distributional heads (O reward bins r_1 < ... < r_O) learn the distribution of R instead of its
mean. The terminal reward is projected onto the bins ("two-hot": mass on the two bins around r,
so that its mean is r exactly; C51's projection), and the TD(lambda) target becomes a mixture of
distributions, with gamma = 1 and a terminal reward only:

    m[T-1] = twohot(r),    m[t] = (1 - lam) * p_old[t+1] + lam * m[t+1]
    loss   = mean over real tokens of the cross-entropy -Σ_b m[t]_b log p_new[t]_b

lam = 1 is Monte Carlo: every position's target is twohot(r), whatever the model says (and the
no-grad forward for p_old can be skipped).

Shape key: B samples, T response tokens (the batch's longest; shorter rows padded),
L = max(P + T - 1) tokens fed to the value model, O bins.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def lambda_returns(values: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor,
                   gamma: float = 1.0, lam: float = 0.95) -> torch.Tensor:
    """TD(lambda) targets for a batch of episodes with a terminal reward only.

    values [B, T]: V_old[t] (entries at t >= lengths[b] are ignored); rewards [B]; lengths [B]
    (>= 1, <= T). Returns targets [B, T] in float32, zero at t >= lengths[b].
    Vectorised: A = delta @ W^T with W[t, s] = (gamma*lam)^(s-t) for s >= t (a [T, T] matrix).
    """
    if values.dim() != 2:
        raise ValueError(f"values must be [B, T], found shape {tuple(values.shape)}")
    B, T = values.shape
    if rewards.shape != (B,) or lengths.shape != (B,):
        raise ValueError(f"rewards and lengths must be [B]=[{B}], found {tuple(rewards.shape)} "
                         f"and {tuple(lengths.shape)}")
    if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in 1..T={T}, found {lengths.tolist()}")
    device = values.device
    v = values.float()
    t = torch.arange(T, device=device)                                   # [T]
    real = t[None, :] < lengths[:, None].to(device)                      # [B, T]
    v = torch.where(real, v, torch.zeros_like(v))
    v_next = torch.cat([v[:, 1:], v.new_zeros(B, 1)], dim=1)             # [B, T]: V[t+1], V[T]=0
    v_next = torch.where(t[None, :] + 1 < lengths[:, None].to(device), v_next, 0.0)
    last = t[None, :] == (lengths[:, None].to(device) - 1)               # [B, T]
    rew = torch.where(last, rewards.float().to(device)[:, None], 0.0)    # [B, T]
    delta = torch.where(real, rew + gamma * v_next - v, 0.0)             # [B, T]
    gap = t[None, :] - t[:, None]                                        # [T, T]: s - t
    discount = torch.where(gap >= 0, torch.tensor(gamma * lam, dtype=torch.float64,
                                                  device=device).pow(gap.clamp(min=0)), 0.0)
    adv = (delta.double() @ discount.T).float()                          # [B, T]
    return torch.where(real, adv + v, 0.0)


def pack_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value-model inputs for a batch: rows prompt + response[:-1], right-padded with pad_id.

    Returns input_ids [B, L], prompt_lens [B], lengths [B] (response tokens T_b). Right padding
    needs no attention mask: attention is causal, so real positions never see the padding.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(response_ids)} responses")
    rows = []
    for p, r in zip(prompt_ids, response_ids):
        if len(p) < 1 or len(r) < 1:
            raise ValueError(f"need >= 1 prompt and response token, found {len(p)} and {len(r)}")
        rows.append([*p, *r[:-1]])
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)           # [B, L]
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    prompt_lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    lengths = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    return ids, prompt_lens, lengths


def response_values(position_values: torch.Tensor, prompt_lens: torch.Tensor,
                    lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V[t] = position_values[b, P_b - 1 + t] for t < T_b.

    position_values [B, L] (the head at every input position), or [B, L, O] for a head of O
    outputs. Returns values [B, T] (or [B, T, O]; 0 past a row's end) and the mask of real
    entries [B, T], T = max(lengths).
    """
    B, L = position_values.shape[:2]
    T = int(lengths.max())
    t = torch.arange(T, device=position_values.device)                   # [T]
    pos = (prompt_lens.to(t.device) - 1)[:, None] + t[None, :]           # [B, T]
    mask = t[None, :] < lengths.to(t.device)[:, None]                    # [B, T]
    idx = pos.clamp(max=L - 1)
    if position_values.dim() == 3:
        idx = idx[:, :, None].expand(B, T, position_values.shape[2])     # [B, T, O]
        vals = position_values.gather(1, idx)                            # [B, T, O]
        return torch.where(mask[:, :, None], vals, torch.zeros_like(vals)), mask
    vals = position_values.gather(1, idx)                                # [B, T]
    return torch.where(mask, vals, torch.zeros_like(vals)), mask


def two_hot(rewards: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Project rewards [B] onto ascending bins [O]: [B, O] with mass on the two bins around each
    reward (linear weights, so Σ_b m_b r_b = r), clamped to the end bins outside their range."""
    r = rewards.double().clamp(float(bins[0]), float(bins[-1]))          # [B]
    b64 = bins.double()
    hi = torch.searchsorted(b64, r, right=False).clamp(1, len(bins) - 1)  # [B]: first bin >= r
    lo = hi - 1
    w_hi = (r - b64[lo]) / (b64[hi] - b64[lo])                           # [B] in [0, 1]
    out = torch.zeros((len(r), len(bins)), dtype=torch.float64)
    out.scatter_(1, lo[:, None], (1 - w_hi)[:, None])
    out.scatter_add_(1, hi[:, None], w_hi[:, None])
    return out.float()


def distributional_targets(p_old: torch.Tensor | None, terminal: torch.Tensor,
                           lengths: torch.Tensor, lam: float) -> torch.Tensor:
    """The distributional TD(lambda) targets of the module doc: [B, T, O], zero past a row's end.

    p_old [B, T, O]: the model's probabilities at each response position (no grad; ignored and
    may be None when lam == 1); terminal [B, O]: twohot(r); lengths [B] (1..T).
    """
    B, O = terminal.shape
    T = int(lengths.max()) if p_old is None else p_old.shape[1]
    if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in 1..T={T}, found {lengths.tolist()}")
    lengths = lengths.to(terminal.device)
    out = torch.zeros((B, T, O), dtype=torch.float32, device=terminal.device)
    nxt = terminal.float()                                               # [B, O]: m[t+1]
    for t in range(T - 1, -1, -1):
        last = (lengths - 1 == t)[:, None]                               # [B, 1]
        if lam < 1.0 and p_old is not None and t + 1 < T:
            mixed = (1 - lam) * p_old[:, t + 1].float() + lam * nxt
        else:
            mixed = nxt
        cur = torch.where(last, terminal.float(), mixed)                 # [B, O]
        out[:, t] = torch.where((t < lengths)[:, None], cur, 0.0)
        nxt = cur
    return out


def distributional_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of -Σ_b targets_b log softmax(logits)_b; logits/targets [B, T, O]."""
    n = mask.sum()
    if int(n) == 0:
        raise ValueError("distributional_loss: the batch has no real response tokens")
    ce = -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(-1)  # [B, T]
    return torch.where(mask, ce, 0.0).sum() / n


def td_loss(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over real tokens of (values - targets)^2; values/targets/mask [B, T]."""
    n = mask.sum()
    if int(n) == 0:
        raise ValueError("td_loss: the batch has no real response tokens")
    err = torch.where(mask, values.float() - targets.float(), 0.0)
    return 0.5 * err.pow(2).sum() / n
