"""Train a value model by TD(lambda) on scored samples of the frozen generator (vas-algorithm.md).

    data -> rewards (cached scores, optional bon_log_cdf transform, standardisation)
    for each optimizer batch (grad_accum micro-batches of batch_size samples):
        targets = lambda_returns(V_old)            V_old from the current weights, no grad
        repeat passes_per_batch times: loss = 0.5 mean (V_new - targets)^2; backward; step
    validation after every epoch (and before the first): TD loss, MSE to the reward, and the
    correlation between V at the last response prefix and the reward
A distributional head (--head distributional) learns the distribution of R over reward bins
chosen from the training rewards (quantiles or evenly spaced), with the distributional TD(lambda)
targets and cross-entropy of td.py (lam 1: Monte Carlo, no V_old forward); its validation adds
the CRPS, a PIT histogram and the correlation of the predicted mean (value_models/training/calibration.py).
    save: LoRA merged (value_models/delta.py) into the initial weights, save_pretrained,
          tokenizer, vas.json (reward, transform, normalisation, hyper-parameters, loss curve)

The initial value model (the generator's first value_layers layers, zero head) is built in
OUT/.init unless --init names one. Resumable: OUT/.checkpoint holds the trainable weights, optimizer state, position and history,
written atomically every `checkpoint_every` steps and at each epoch's end; shuffling is a pure
function of (seed, epoch), so a resumed run takes the same batches (and, on CPU, ends with the
same weights) as an uninterrupted one. Both folders are removed once the model is saved.

Shape key: B samples, T response tokens, L value-model input tokens, D hidden size.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from value_models.training.bon import bon_log_cdf
from value_models.cache_build import build_once
from value_models.delta import DELTA_FILENAME, apply_delta, lora_delta, save_delta
from value_models.metadata import VASMetadata
from value_models.training.rewards import canonical_name, load_scores
from value_models.training.sampling import load_samples, resolve_generator
from value_models.training.prefix_rewards import load_prefix_scores
from value_models.training.td import (
    distributional_loss, distributional_targets, lambda_returns, pack_batch, response_values,
    td_loss, two_hot,
)
from value_models.training.train_config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = ".checkpoint"
INIT_DIR = ".init"
# Fields that may change between a run and its resumption.
_RESUMABLE_FIELDS = {"resume", "checkpoint_every", "log_every", "out", "data", "num_threads"}


# ---- data ----------------------------------------------------------------------------------

def is_validation(prompt_id: int, seed: int, fraction: float) -> bool:
    """Deterministic per-prompt split (all samples of a prompt fall on the same side)."""
    h = int.from_bytes(hashlib.sha256(f"val\0{seed}\0{prompt_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def prepare_data(cfg: TrainConfig) -> tuple[dict[str, Any], list[dict], list[dict], dict | None]:
    """(dataset meta, train examples, val examples, normalisation) with each example's final
    reward under "reward" and the raw score under "score"."""
    meta, samples = load_samples(cfg.data)
    if cfg.max_prompts is not None:
        keep = set(sorted({s["prompt_id"] for s in samples})[:cfg.max_prompts])
        samples = [s for s in samples if s["prompt_id"] in keep]
    if cfg.max_samples_per_prompt is not None:
        samples = [s for s in samples if s["sample"] < cfg.max_samples_per_prompt]
    if not samples:
        raise ValueError(f"{cfg.data} holds no complete samples")
    scores = load_scores(cfg.data, cfg.reward, samples)
    rewards = (bon_log_cdf(scores, [s["prompt_id"] for s in samples])
               if cfg.reward_transform == "bon_log_cdf" else list(scores))
    prefix = (load_prefix_scores(cfg.data, cfg.reward, samples, meta["generator"])
              if cfg.aux_prefix_weight > 0 else [None] * len(samples))
    examples = []
    for s, raw, r, pre in zip(samples, scores, rewards, prefix):
        n = len(s["prompt_token_ids"]) + len(s["response_token_ids"]) - 1
        if n > cfg.max_len or not s["response_token_ids"]:
            raise ValueError(f"sample ({s['prompt_id']}, {s['sample']}): expected 1..{cfg.max_len} "
                             f"value-model tokens and a non-empty response, found {n} tokens")
        examples.append({"prompt_id": s["prompt_id"], "prompt_ids": s["prompt_token_ids"],
                         "response_ids": s["response_token_ids"], "score": raw, "reward": r})
        if pre is not None:  # the raw reward of each state's text (standardised below, like r)
            examples[-1]["prefix_rewards"] = pre
    val = [e for e in examples if is_validation(e["prompt_id"], cfg.seed, cfg.val_fraction)]
    train = [e for e in examples if not is_validation(e["prompt_id"], cfg.seed, cfg.val_fraction)]
    if not train:
        raise ValueError(f"val_fraction={cfg.val_fraction} left no training samples of {len(examples)}")
    norm = None
    if cfg.normalization() == "standardize":
        rs = torch.tensor([e["reward"] for e in train], dtype=torch.float64)
        mean, std = float(rs.mean()), float(rs.std()) if len(rs) > 1 else 1.0
        std = std if std > 1e-8 else 1.0
        norm = {"mean": mean, "std": std}
        for e in examples:
            e["reward"] = (e["reward"] - mean) / std
            if "prefix_rewards" in e:
                e["prefix_rewards"] = [(x - mean) / std for x in e["prefix_rewards"]]
    return meta, train, val, norm


def make_bins(cfg: TrainConfig, rewards: list[float]) -> list[float] | None:
    """The reward bins of a distributional head (None for a scalar head): cfg.num_bins
    quantiles of the training rewards (min and max included; repeated values merged) or evenly
    spaced values over their range."""
    if cfg.head != "distributional":
        return None
    r = torch.tensor(rewards, dtype=torch.float64)
    lo, hi = float(r.min()), float(r.max())
    if hi - lo < 1e-9:
        raise ValueError(f"every training reward equals {lo}: a distributional head needs spread")
    if cfg.bin_spacing == "uniform":
        return torch.linspace(lo, hi, cfg.num_bins, dtype=torch.float64).tolist()
    q = torch.quantile(r, torch.linspace(0, 1, cfg.num_bins, dtype=torch.float64))
    bins = sorted({round(float(x), 6) for x in q})
    bins[0], bins[-1] = min(bins[0], lo), max(bins[-1], hi)
    return bins


# ---- model ---------------------------------------------------------------------------------

def position_values(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The score head at every position: [B, L] float32, or [B, L, O] for a head of O > 1
    outputs. Not the pooled seq-cls output (it pools at the last non-pad token, and pad == eos
    here)."""
    return position_outputs(model, input_ids)[0]


AUX_HEAD = "vas_aux_head"  # attribute of the training-only head (build_model); never saved


def position_outputs(model: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(position_values, the auxiliary head at every position [B, L] or None without one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, L, D]
    out = base.score(hidden).float()                                            # [B, L, O]
    aux = getattr(model, AUX_HEAD, None)
    return (out.squeeze(-1) if out.shape[-1] == 1 else out,
            aux(hidden).squeeze(-1).float() if aux is not None else None)


def _init_folder(cfg: TrainConfig, generator: str, bins: list[float] | None = None) -> Path:
    if cfg.init:
        from value_models.checkpoint import resolve_model_path
        path = resolve_model_path(cfg.init)
        head = VASMetadata.load(path)
        if (head.bins if head.distributional else None) != bins:
            raise ValueError(f"--init {cfg.init} has a {head.value_head} head with bins {head.bins}; "
                             f"this run needs {'bins ' + str(bins) if bins else 'a scalar head'}")
        return path
    from value_models.checkpoint import make_value_model

    def build(tmp: Path) -> None:
        make_value_model(resolve_generator(generator), tmp, num_layers=cfg.value_layers,
                         dtype="float32", generator_name=generator, overwrite=True, bins=bins)

    return build_once(Path(cfg.out).expanduser() / INIT_DIR, build,
                      params={"generator": generator, "num_layers": cfg.value_layers, "bins": bins})


def _load_init(init: Path) -> Any:
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification.from_pretrained(init, dtype=torch.float32)


def build_model(cfg: TrainConfig, init: Path) -> Any:
    """The model to train: LoRA-wrapped (score head trainable) or fully trainable, fp32."""
    model = _load_init(init)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # LoRA A init
            model = get_peft_model(model, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                target_modules=list(cfg.lora_targets)))
        model.get_base_model().score.weight.requires_grad_(True)
    elif cfg.freeze_embeddings:
        model.model.embed_tokens.weight.requires_grad_(False)
    if cfg.aux_prefix_weight > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            head = torch.nn.Linear(model.config.hidden_size, 1)
        setattr(model, AUX_HEAD, head)
    model.train()
    return model


def _optimizer(cfg: TrainConfig, model: Any) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n.endswith("score.weight")]
    body = [p for n, p in named if not n.endswith("score.weight")]
    groups = [{"params": body, "lr": cfg.lr}] if body else []
    groups.append({"params": head, "lr": cfg.head_lr or cfg.lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


# ---- steps ---------------------------------------------------------------------------------

def _autocast(cfg: TrainConfig) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _batch_tensors(batch: list[dict], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, plens, lens = pack_batch([e["prompt_ids"] for e in batch], [e["response_ids"] for e in batch],
                                  pad_id)                                        # [B, L], [B], [B]
    rewards = torch.tensor([e["reward"] for e in batch], dtype=torch.float32)   # [B]
    return ids, plens, lens, rewards


def _aux_targets(batch: list[dict]) -> torch.Tensor | None:
    """The prefix rewards of a batch [B, T] (0 past a row's end), or None without them."""
    if "prefix_rewards" not in batch[0]:
        return None
    T = max(len(e["prefix_rewards"]) for e in batch)
    out = torch.zeros((len(batch), T), dtype=torch.float32)
    for b, e in enumerate(batch):
        out[b, :len(e["prefix_rewards"])] = torch.tensor(e["prefix_rewards"])
    return out


def optimizer_step(cfg: TrainConfig, model: Any, opt: torch.optim.Optimizer,
                   micro: list[list[dict]], pad_id: int, bins: torch.Tensor | None = None) -> float:
    """Targets from V_old (no grad) for every micro-batch, then passes_per_batch updates.
    Returns the first pass's mean loss (the TD error before this step's updates). `bins` [O]:
    a distributional head's bins (distributional targets and cross-entropy). With an auxiliary
    head, its 0.5 MSE to the prefix rewards, times aux_prefix_weight, joins the loss."""
    prepared = []
    with torch.no_grad(), _autocast(cfg):
        for batch in micro:
            ids, plens, lens, rewards = _batch_tensors(batch, pad_id)
            prepared.append((ids, plens, lens, *_targets(cfg, model, ids, plens, lens, rewards, bins),
                             _aux_targets(batch)))
    first = 0.0
    for p in range(cfg.passes_per_batch):
        opt.zero_grad(set_to_none=True)
        for ids, plens, lens, targets, mask, aux_targets in prepared:
            with _autocast(cfg):
                out, aux = position_outputs(model, ids)
                out, _ = response_values(out, plens, lens)
            loss = _loss(out, targets, mask, bins)
            if aux is not None and aux_targets is not None:
                loss = loss + cfg.aux_prefix_weight * td_loss(response_values(aux, plens, lens)[0],
                                                              aux_targets, mask)
            loss = loss / len(prepared)
            loss.backward()
            if p == 0:
                first += float(loss.detach())
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [q for g in opt.param_groups for q in g["params"]], cfg.max_grad_norm)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return first


def _targets(cfg: TrainConfig, model: Any, ids: torch.Tensor, plens: torch.Tensor, lens: torch.Tensor,
             rewards: torch.Tensor, bins: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [B, T] or [B, T, O], mask [B, T]) from the current weights (no grad)."""
    if bins is None:
        v_old, mask = response_values(position_values(model, ids), plens, lens)       # [B, T]
        return lambda_returns(v_old, rewards, lens, cfg.gamma, cfg.lam), mask
    T = int(lens.max())
    mask = torch.arange(T)[None, :] < lens[:, None]                                  # [B, T]
    p_old = None
    if cfg.lam < 1.0:  # Monte Carlo targets do not depend on the model: skip its forward
        logits, _ = response_values(position_values(model, ids), plens, lens)        # [B, T, O]
        p_old = torch.softmax(logits.float(), -1)
    return distributional_targets(p_old, two_hot(rewards, bins), lens, cfg.lam), mask


def _loss(out: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
          bins: torch.Tensor | None) -> torch.Tensor:
    return td_loss(out, targets, mask) if bins is None else distributional_loss(out, targets, mask)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


@torch.no_grad()
def evaluate(cfg: TrainConfig, model: Any, examples: list[dict], pad_id: int,
             bins: torch.Tensor | None = None) -> dict[str, Any]:
    """TD loss (targets from the same weights), 0.5 MSE to the reward at every position, and the
    correlation of V(x + y_1..y_{T-1}) (the last trained prefix) with the reward. A
    distributional head: its loss is the cross-entropy, V is the predicted mean, and its
    calibration at the last prefix and at the prompt is added (calibration.py)."""
    if not examples:
        return {}
    from value_models.training.calibration import calibration

    was_training = model.training
    model.eval()
    sums = {"td": 0.0, "mc": 0.0, "n": 0.0}
    last_v, rew, last_logp, first_logp = [], [], [], []
    for i in range(0, len(examples), cfg.batch_size):
        ids, plens, lens, rewards = _batch_tensors(examples[i:i + cfg.batch_size], pad_id)
        with _autocast(cfg):
            out, mask = response_values(position_values(model, ids), plens, lens)   # [B, T(, O)]
        targets, _ = _targets(cfg, model, ids, plens, lens, rewards, bins)
        if bins is None:
            v = out
        else:
            logp = torch.log_softmax(out.float(), -1)                                # [B, T, O]
            v = (logp.exp() * bins).sum(-1)                                          # [B, T]
            last_logp.append(logp[torch.arange(len(lens)), lens - 1])                 # [B, O]
            first_logp.append(logp[:, 0])                                            # [B, O]
        n = float(mask.sum())
        sums["td"] += float(_loss(out, targets, mask, bins)) * n
        sums["mc"] += float(td_loss(v, rewards[:, None].expand_as(v), mask)) * n
        sums["n"] += n
        last_v.append(v.gather(1, (lens - 1)[:, None]).squeeze(1))               # [B]
        rew.append(rewards)
    model.train(was_training)
    result: dict[str, Any] = {"td_loss": sums["td"] / sums["n"], "mc_loss": sums["mc"] / sums["n"],
                              "corr_last": pearson(torch.cat(last_v), torch.cat(rew))}
    if bins is not None:
        r = torch.cat(rew)
        result["calibration_last"] = calibration(torch.cat(last_logp), bins, r)
        result["calibration_prompt"] = calibration(torch.cat(first_logp), bins, r)
    return result


# ---- checkpoints ---------------------------------------------------------------------------

def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    ck = out / CHECKPOINT_DIR
    ck.mkdir(parents=True, exist_ok=True)
    tmp = ck / "state.pt.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, ck / "state.pt")


def _config_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump().items() if k not in _RESUMABLE_FIELDS}


def _load_checkpoint(cfg: TrainConfig, out: Path) -> dict[str, Any] | None:
    path = out / CHECKPOINT_DIR / "state.pt"
    if not (cfg.resume and path.is_file()):
        return None
    state = torch.load(path, weights_only=False)
    expected, found = _config_fingerprint(cfg), state["config"]
    diff = {k: (expected.get(k), found.get(k)) for k in set(expected) | set(found)
            if expected.get(k) != found.get(k)}
    if diff:
        raise ValueError(f"{path} was written by a run with other settings: " + ", ".join(
            f"{k}: expected {e!r}, found {f!r}" for k, (e, f) in sorted(diff.items()))
            + ". Pass --no-resume to start over, or use another --out.")
    return state


# ---- the loop ------------------------------------------------------------------------------

def train_value_model(cfg: TrainConfig) -> Path:
    """Train, save and return the value-model folder cfg.out (see the module doc)."""
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> Path:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    meta, train, val, norm = prepare_data(cfg)
    logger.info("%d training / %d validation samples; reward %s (%s), normalisation %s",
                len(train), len(val), canonical_name(cfg.reward), cfg.reward_transform, norm)
    bin_list = make_bins(cfg, [e["reward"] for e in train])
    bins = torch.tensor(bin_list, dtype=torch.float32) if bin_list is not None else None
    if bin_list is not None:
        logger.info("distributional head: %d %s bins over [%.4g, %.4g]", len(bin_list),
                    cfg.bin_spacing, bin_list[0], bin_list[-1])
    init = _init_folder(cfg, meta["generator"], bin_list)
    model = build_model(cfg, init)
    pad_id = int(model.config.pad_token_id)
    opt = _optimizer(cfg, model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %d (%s)", n_trainable, "LoRA + head" if cfg.lora else "all")

    group = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(train) / group)
    state = _load_checkpoint(cfg, out)
    if state is not None:
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["optimizer"])
        epoch, step_in_epoch, history = state["epoch"], state["step_in_epoch"], state["history"]
        elapsed_before = state["elapsed_s"]
        logger.info("resuming from %s: epoch %d, step %d/%d", out / CHECKPOINT_DIR, epoch + 1,
                    step_in_epoch, steps_per_epoch)
    else:
        epoch, step_in_epoch, elapsed_before = 0, 0, 0.0
        history = [{"epoch": 0, "train_loss": None, **_val_entry(cfg, model, val, pad_id, bins)}]
        logger.info("epoch 0 (before training): %s", history[0])

    def checkpoint(ep: int, st: int, running: list[float]) -> None:
        _save_checkpoint(out, {"config": _config_fingerprint(cfg), "trainable": _trainable_state(model),
                               "optimizer": opt.state_dict(), "epoch": ep, "step_in_epoch": st,
                               "history": history, "running": running,
                               "elapsed_s": elapsed_before + time.perf_counter() - t_start})

    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=epoch * steps_per_epoch + step_in_epoch,
               unit="step", desc="train", dynamic_ncols=True)
    running: list[float] = list(state["running"]) if state is not None else []
    while epoch < cfg.epochs:
        rng = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # same order on resume
        order = torch.randperm(len(train), generator=rng)
        for step in range(step_in_epoch, steps_per_epoch):
            idx = order[step * group:(step + 1) * group].tolist()
            micro = [[train[i] for i in idx[j:j + cfg.batch_size]]
                     for j in range(0, len(idx), cfg.batch_size)]
            running.append(optimizer_step(cfg, model, opt, micro, pad_id, bins))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{sum(running[-20:]) / len(running[-20:]):.4f}")
            if (step + 1) % cfg.log_every == 0:
                logger.info("epoch %d step %d/%d: loss %.4f", epoch + 1, step + 1, steps_per_epoch,
                            sum(running[-cfg.log_every:]) / len(running[-cfg.log_every:]))
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                checkpoint(epoch, step + 1, running)
        entry = {"epoch": epoch + 1, "train_loss": sum(running) / max(len(running), 1),
                 **_val_entry(cfg, model, val, pad_id, bins)}
        history.append(entry)
        logger.info("epoch %d: %s", epoch + 1, entry)
        epoch, step_in_epoch, running = epoch + 1, 0, []
        checkpoint(epoch, 0, running)
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - t_start
    _save_model(cfg, model, init, out, meta, norm, history, len(train), len(val), elapsed, bin_list)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    shutil.rmtree(out / INIT_DIR, ignore_errors=True)
    (out / f".{INIT_DIR}.lock").unlink(missing_ok=True)  # build_once's lock file
    logger.info("value model saved to %s (%.0f s)", out, elapsed)
    return out


def _val_entry(cfg: TrainConfig, model: Any, val: list[dict], pad_id: int,
               bins: torch.Tensor | None = None) -> dict[str, Any]:
    ev = evaluate(cfg, model, val, pad_id, bins)
    entry = {"val_loss": ev.get("td_loss"), "val_mc_loss": ev.get("mc_loss"),
             "val_corr_last": ev.get("corr_last")}
    for where in ("last", "prompt"):
        if f"calibration_{where}" in ev:
            entry[f"val_calibration_{where}"] = ev[f"calibration_{where}"]
    return entry


def _save_model(cfg: TrainConfig, model: Any, init: Path, out: Path, data_meta: dict[str, Any],
                norm: dict[str, float] | None, history: list[dict], n_train: int, n_val: int,
                elapsed: float, bins: list[float] | None = None) -> None:
    from transformers import AutoTokenizer

    from value_models.checkpoint import torch_dtype

    init_meta = VASMetadata.load(init)
    training: dict[str, Any] = {
        "algorithm": "td_lambda" if bins is None else (
            "distributional_monte_carlo" if cfg.lam == 1.0 else "distributional_td_lambda"),
        "config": cfg.model_dump(mode="json"),
        "dataset": {"path": str(cfg.data), "generator": data_meta["generator"],
                    "prompts": data_meta["prompts"], "num_prompts": data_meta["num_prompts"],
                    "sampling": data_meta["sampling"], "train_samples": n_train,
                    "val_samples": n_val},
        "history": history, "time_s": round(elapsed, 1), "init": init_meta.training.get("init"),
    }
    if cfg.lora:
        delta = lora_delta(model)
        num_layers = int(model.config.num_hidden_layers)
        save_delta(out / DELTA_FILENAME, delta, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                   num_layers=num_layers)
        final = _load_init(init)
        apply_delta(final, delta, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
        training["lora"] = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets,
                            "delta_file": DELTA_FILENAME, "merged": True}
    else:
        final = model
        if hasattr(final, AUX_HEAD):
            delattr(final, AUX_HEAD)  # training-only
    final = final.to(torch_dtype(cfg.save_dtype))
    final.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(init).save_pretrained(out)
    VASMetadata(
        generator_vocab_size=init_meta.generator_vocab_size,
        tokenizer_fingerprint=init_meta.tokenizer_fingerprint,
        generator=data_meta["generator"], reward=canonical_name(cfg.reward),
        reward_transform=cfg.reward_transform, reward_normalization=norm, training=training,
        default_beta=cfg.default_beta, default_top_k=cfg.default_top_k,
        value_head=cfg.head, bins=bins,
    ).save(out)
