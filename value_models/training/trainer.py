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

The initial value model (the generator's first value_layers layers, or a separate base LM
sharing its tokenizer, with a zero head) is built in OUT/.init unless --init names one.
Resumable: OUT/.checkpoint (checkpoints.py) holds the trainable weights, optimizer state,
position and history, written atomically every `checkpoint_every` steps and at each epoch's
end; shuffling is a pure function of (seed, epoch), so a resumed run takes the same batches
(and, on CPU, ends with the same weights) as an uninterrupted one. Both folders are removed once
the model is saved.

The engine is Hugging Face accelerate (engine.py): CPU or GPU, bf16 autocast, several processes
(DDP, or FSDP on GPUs). An optimizer batch is batch_size * grad_accum * processes samples; each
process takes its share of the micro-batches, and the result equals (to float rounding) one
process running all of them.

Shape key: B samples, T response tokens, L value-model input tokens, D hidden size.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from value_models.cache_build import build_once
from value_models.metadata import VASMetadata
from value_models.training.calibration import pearson
from value_models.training.checkpoints import (
    CHECKPOINT_DIR, config_fingerprint, load_checkpoint, save_checkpoint, save_value_model,
)
from value_models.training.engine import (  # noqa: F401 (AUX_HEAD: part of this module's API)
    AUX_HEAD, PositionValues, autocast, gather_objects, in_distributed_launch, load_trainable_state,
    make_accelerator, model_device, position_outputs, prepare, score_positions, shard,
    sum_over_processes, trainable_state,
)
from value_models.training.rewards import canonical_name
from value_models.training.sampling import resolve_generator
from value_models.training.data import is_validation, make_bins, prepare_data  # noqa: F401 (API)
from value_models.training.td import (
    distributional_loss, distributional_targets, lambda_returns, pack_batch, response_values,
    td_loss, two_hot,
)
from value_models.training.train_config import TrainConfig

logger = logging.getLogger(__name__)

INIT_DIR = ".init"
DEFAULT_VALUE_LAYERS = 4  # of the generator, when neither --value-layers nor --value-base is given


# ---- data (data.py) ---------------------------------------------------------------------------

position_values = score_positions  # for plain HF models (evaluate.py, tests)


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

    layers = cfg.value_layers if cfg.value_layers or cfg.value_base else DEFAULT_VALUE_LAYERS

    def build(tmp: Path) -> None:
        make_value_model(resolve_generator(generator), tmp, num_layers=layers, dtype="float32",
                         generator_name=generator, overwrite=True, bins=bins, base=cfg.value_base)

    return build_once(Path(cfg.out).expanduser() / INIT_DIR, build,
                      params={"generator": generator, "num_layers": layers, "bins": bins,
                              **({"base": cfg.value_base} if cfg.value_base else {})})


def load_init(init: Path) -> Any:
    """The initial value model, an HF LlamaForSequenceClassification in fp32 on the CPU."""
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification.from_pretrained(init, dtype=torch.float32)


def build_model(cfg: TrainConfig, init: Path) -> PositionValues:
    """The model to train, fp32 on the CPU: LoRA-wrapped (score head trainable) or fully
    trainable, inside the engine's PositionValues (`.net` is the HF / peft model)."""
    model = load_init(init)
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
    aux = None
    if cfg.aux_prefix_weight > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            aux = torch.nn.Linear(model.config.hidden_size, 1)
    wrapped = PositionValues(model, aux_head=aux)
    wrapped.train()
    return wrapped


def _optimizer(cfg: TrainConfig, model: Any) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n.endswith("score.weight")]
    body = [p for n, p in named if not n.endswith("score.weight")]
    groups = [{"params": body, "lr": cfg.lr}] if body else []
    groups.append({"params": head, "lr": cfg.head_lr or cfg.lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


# ---- steps ---------------------------------------------------------------------------------

def _batch_tensors(batch: list[dict], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids [B, L], prompt lengths [B], response lengths [B], rewards [B]) on the CPU."""
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
                   micro: list[list[dict]], pad_id: int, bins: torch.Tensor | None = None,
                   acc: Any = None) -> float:
    """Targets from V_old (no grad) for every micro-batch, then passes_per_batch updates.
    Returns the first pass's mean loss (the TD error before this step's updates). `bins` [O]:
    a distributional head's bins (distributional targets and cross-entropy). With an auxiliary
    head, its 0.5 MSE to the prefix rewards, times aux_prefix_weight, joins the loss. `acc`: the
    Accelerator when the model was prepared by it; with W processes this process takes its
    share of `micro` (the whole optimizer batch; engine.shard) and weights each by W / K."""
    world, rank = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
    device, K = model_device(model), len(micro)
    prepared = []
    with torch.no_grad(), autocast(cfg, device):
        for batch, real in shard(micro, rank, world):
            ids, plens, lens, rewards = _batch_tensors(batch, pad_id)
            ids = ids.to(device)
            aux_targets = _aux_targets(batch)                       # [B, T] r(s_t), standardised
            if aux_targets is not None:
                aux_targets = aux_targets.to(device)
            offset = aux_targets if cfg.residual else None
            prepared.append((ids, plens, lens, *_targets(cfg, model, ids, plens, lens, rewards, bins, offset),
                             aux_targets, real))
    first = 0.0
    for p in range(cfg.passes_per_batch):
        opt.zero_grad(set_to_none=True)
        for i, (ids, plens, lens, targets, mask, aux_targets, real) in enumerate(prepared):
            # DDP: gradients are averaged over processes at the last micro-batch's backward only
            sync = acc is None or i == len(prepared) - 1
            with nullcontext() if sync else acc.no_sync(model):
                with autocast(cfg, device):
                    out, aux = position_outputs(model, ids)
                    out, _ = response_values(out, plens, lens)
                if cfg.residual:  # V = r + U
                    out = out.float() + aux_targets
                loss = _loss(out, targets, mask, bins)
                if aux is not None and aux_targets is not None and cfg.aux_prefix_weight > 0:
                    loss = loss + cfg.aux_prefix_weight * td_loss(
                        response_values(aux, plens, lens)[0], aux_targets, mask)
                scaled = loss * world / K if real else loss * 0.0
                if acc is not None:
                    acc.backward(scaled)
                else:
                    scaled.backward()
            if p == 0 and real:
                first += float(loss.detach() * world / K) / world
        if cfg.max_grad_norm is not None:
            if acc is not None:
                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(
                    [q for g in opt.param_groups for q in g["params"]], cfg.max_grad_norm)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return sum_over_processes(acc, first)


def _targets(cfg: TrainConfig, model: Any, ids: torch.Tensor, plens: torch.Tensor, lens: torch.Tensor,
             rewards: torch.Tensor, bins: torch.Tensor | None, offset: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [B, T] or [B, T, O], mask [B, T]) from the current weights (no grad), on the
    model's device; rewards [B] and bins [O] on the CPU. offset [B, T]: a residual model's r(s_t)
    (V = r + U; the targets are V's, so U's loss is that of U + r)."""
    if bins is None:
        v_old, mask = response_values(position_outputs(model, ids)[0], plens, lens)  # [B, T]
        if offset is not None:
            v_old = v_old + offset
        return lambda_returns(v_old, rewards, lens, cfg.gamma, cfg.lam), mask
    T = int(lens.max())
    mask = torch.arange(T, device=ids.device)[None, :] < lens.to(ids.device)[:, None]  # [B, T]
    p_old = None
    if cfg.lam < 1.0:  # Monte Carlo targets do not depend on the model: skip its forward
        logits, _ = response_values(position_outputs(model, ids)[0], plens, lens)  # [B, T, O]
        p_old = torch.softmax(logits.float(), -1)
    terminal = two_hot(rewards, bins).to(ids.device)                                # [B, O]
    return distributional_targets(p_old, terminal, lens, cfg.lam), mask


def _loss(out: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
          bins: torch.Tensor | None) -> torch.Tensor:
    return td_loss(out, targets, mask) if bins is None else distributional_loss(out, targets, mask)


@torch.no_grad()
def _eval_batch(cfg: TrainConfig, model: Any, batch: list[dict], pad_id: int,
                bins: torch.Tensor | None) -> dict[str, Any]:
    """One validation batch's loss sums and per-sample values (CPU tensors)."""
    device = model_device(model)
    ids, plens, lens, rewards = _batch_tensors(batch, pad_id)
    ids = ids.to(device)
    with autocast(cfg, device):
        out, mask = response_values(position_outputs(model, ids)[0], plens, lens)  # [B, T(, O)]
    offset = _aux_targets(batch) if cfg.residual else None                       # [B, T] r(s_t)
    if offset is not None:
        offset = offset.to(device)
        out = out.float() + offset                                               # V = r + U
    targets, _ = _targets(cfg, model, ids, plens, lens, rewards, bins, offset)
    res: dict[str, Any] = {}
    if bins is None:
        v = out
    else:
        logp = torch.log_softmax(out.float(), -1)                                 # [B, T, O]
        v = (logp.exp() * bins.to(device)).sum(-1)                                # [B, T]
        res["last_logp"] = logp[torch.arange(len(lens)), lens - 1].cpu()          # [B, O]
        res["first_logp"] = logp[:, 0].cpu()                                      # [B, O]
    n = float(mask.sum())
    res["td"] = float(_loss(out, targets, mask, bins)) * n
    res["mc"] = float(td_loss(v, rewards.to(device)[:, None].expand_as(v), mask)) * n
    res["n"] = n
    res["last_v"] = v.gather(1, (lens - 1).to(device)[:, None]).squeeze(1).cpu()  # [B]
    res["rew"] = rewards
    return res


@torch.no_grad()
def evaluate(cfg: TrainConfig, model: Any, examples: list[dict], pad_id: int,
             bins: torch.Tensor | None = None, acc: Any = None) -> dict[str, Any]:
    """TD loss (targets from the same weights), 0.5 MSE to the reward at every position, and the
    correlation of V(x + y_1..y_{T-1}) (the last trained prefix) with the reward. A
    distributional head: its loss is the cross-entropy, V is the predicted mean, and its
    calibration at the last prefix and at the prompt is added (calibration.py). With several
    processes each evaluates a share of the batches; the results are summed in batch order, so
    they equal one process's."""
    if not examples:
        return {}
    from value_models.training.calibration import calibration

    world, rank = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
    batches = [examples[i:i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    was_training = model.training
    model.eval()
    mine = []
    for (k, batch), real in shard(list(enumerate(batches)), rank, world):
        result = _eval_batch(cfg, model, batch, pad_id, bins)  # a pad too: FSDP forwards are collective
        if real:
            mine.append((k, result))
    model.train(was_training)
    parts = [r for _, r in sorted((kr for got in gather_objects(acc, mine) for kr in got),
                                  key=lambda kr: kr[0])]
    sums = {key: sum(r[key] for r in parts) for key in ("td", "mc", "n")}
    rew = torch.cat([r["rew"] for r in parts])
    result: dict[str, Any] = {"td_loss": sums["td"] / sums["n"], "mc_loss": sums["mc"] / sums["n"],
                              "corr_last": pearson(torch.cat([r["last_v"] for r in parts]), rew)}
    if bins is not None:
        result["calibration_last"] = calibration(torch.cat([r["last_logp"] for r in parts]), bins, rew)
        result["calibration_prompt"] = calibration(torch.cat([r["first_logp"] for r in parts]), bins,
                                                   rew)
    return result


# ---- the loop ------------------------------------------------------------------------------

def train_value_model(cfg: TrainConfig) -> Path:
    """Train, save and return the value-model folder cfg.out (see the module doc). With
    cfg.num_processes > 1 (outside a launcher) it starts that many local processes."""
    if cfg.num_processes > 1 and not in_distributed_launch():
        from value_models.training.launch import launch_local

        return launch_local(cfg)
    threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> Path:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    acc = make_accelerator(cfg)
    if cfg.num_threads is not None:  # after the Accelerator, which may set its own
        torch.set_num_threads(cfg.num_threads)
    main, world = acc.is_main_process, acc.num_processes
    log = logger.info if main else (lambda *a, **k: None)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    meta, train, val, norm = prepare_data(cfg)
    log("%d training / %d validation samples; reward %s (%s), normalisation %s; %d process(es) "
        "on %s", len(train), len(val), canonical_name(cfg.reward), cfg.reward_transform, norm,
        world, acc.device)
    if cfg.keep_best and not val:
        raise ValueError(f"keep_best: the validation split is empty (val_fraction "
                         f"{cfg.val_fraction}); raise val_fraction or drop keep_best")
    bin_list = make_bins(cfg, [e["reward"] for e in train])
    bins = torch.tensor(bin_list, dtype=torch.float32) if bin_list is not None else None
    if bin_list is not None:
        log("distributional head: %d %s bins over [%.4g, %.4g]", len(bin_list), cfg.bin_spacing,
            bin_list[0], bin_list[-1])
    # transformers' save_pretrained writes weights from the main process only: it builds
    with acc.main_process_first():
        init = _init_folder(cfg, meta["generator"], bin_list)
    model = build_model(cfg, init)
    pad_id = int(model.net.config.pad_token_id)
    opt = _optimizer(cfg, model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log("trainable parameters: %d (%s)", n_trainable, "LoRA + head" if cfg.lora else "all")
    model, opt = prepare(acc, model, opt)

    group = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(len(train) / group)
    state = load_checkpoint(cfg, out, world)
    if state is not None:
        load_trainable_state(model, opt, state["trainable"], state["optimizer"])
        epoch, step_in_epoch, history = state["epoch"], state["step_in_epoch"], state["history"]
        best = state.get("best")
        elapsed_before = state["elapsed_s"]
        log("resuming from %s: epoch %d, step %d/%d", out / CHECKPOINT_DIR, epoch + 1,
            step_in_epoch, steps_per_epoch)
    else:
        epoch, step_in_epoch, elapsed_before, best = 0, 0, 0.0, None
        history = [{"epoch": 0, "train_loss": None, **_val_entry(cfg, model, val, pad_id, bins, acc)}]
        log("epoch 0 (before training): %s", history[0])

    def checkpoint(ep: int, st: int, running: list[float]) -> None:
        weights, optim = trainable_state(model, opt)  # every process (collective under FSDP)
        if main:
            save_checkpoint(out, {"config": config_fingerprint(cfg, world), "trainable": weights,
                                  "optimizer": optim, "epoch": ep, "step_in_epoch": st,
                                  "history": history, "running": running, "best": best,
                                  "elapsed_s": elapsed_before + time.perf_counter() - t_start})
        acc.wait_for_everyone()

    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=epoch * steps_per_epoch + step_in_epoch,
               unit="step", desc="train", dynamic_ncols=True, disable=not main)
    running: list[float] = list(state["running"]) if state is not None else []
    while epoch < cfg.epochs:
        rng = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # same order on resume
        order = torch.randperm(len(train), generator=rng)
        for step in range(step_in_epoch, steps_per_epoch):
            idx = order[step * group:(step + 1) * group].tolist()
            micro = [[train[i] for i in idx[j:j + cfg.batch_size]]
                     for j in range(0, len(idx), cfg.batch_size)]
            running.append(optimizer_step(cfg, model, opt, micro, pad_id, bins, acc))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{sum(running[-20:]) / len(running[-20:]):.4f}")
            if (step + 1) % cfg.log_every == 0:
                log("epoch %d step %d/%d: loss %.4f", epoch + 1, step + 1, steps_per_epoch,
                    sum(running[-cfg.log_every:]) / len(running[-cfg.log_every:]))
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                checkpoint(epoch, step + 1, running)
        entry = {"epoch": epoch + 1, "train_loss": sum(running) / max(len(running), 1),
                 **_val_entry(cfg, model, val, pad_id, bins, acc)}
        history.append(entry)
        log("epoch %d: %s", epoch + 1, entry)
        if cfg.keep_best and (best is None or entry["val_loss"] < best["val_loss"]):
            best = {"epoch": epoch + 1, "val_loss": entry["val_loss"],
                    "weights": trainable_state(model, opt)[0]}  # every process (FSDP)
        epoch, step_in_epoch, running = epoch + 1, 0, []
        checkpoint(epoch, 0, running)
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - t_start
    if best is not None:  # keep_best: the epoch with the lowest validation loss
        weights = best["weights"]
        history[best["epoch"]]["kept"] = True
        log("keep_best: saving epoch %d (validation loss %.4f)", best["epoch"], best["val_loss"])
    else:
        weights, _ = trainable_state(model, opt)
    if main:
        final = build_model(cfg, init)  # on the CPU, whatever the engine sharded
        missing, unexpected = final.load_state_dict(weights, strict=False)
        if unexpected or set(weights) != {n for n, p in final.named_parameters() if p.requires_grad}:
            raise RuntimeError(f"trained weights do not fit a fresh model: unexpected {unexpected}")
        save_value_model(cfg, final.net, init, out, meta, norm, history, len(train), len(val),
                         elapsed, bin_list, world)
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        shutil.rmtree(out / INIT_DIR, ignore_errors=True)
        (out / f".{INIT_DIR}.lock").unlink(missing_ok=True)  # build_once's lock file
        log("value model saved to %s (%.0f s)", out, elapsed)
    acc.wait_for_everyone()
    return out


def _val_entry(cfg: TrainConfig, model: Any, val: list[dict], pad_id: int,
               bins: torch.Tensor | None = None, acc: Any = None) -> dict[str, Any]:
    ev = evaluate(cfg, model, val, pad_id, bins, acc)
    entry = {"val_loss": ev.get("td_loss"), "val_mc_loss": ev.get("mc_loss"),
             "val_corr_last": ev.get("corr_last")}
    for where in ("last", "prompt"):
        if f"calibration_{where}" in ev:
            entry[f"val_calibration_{where}"] = ev[f"calibration_{where}"]
    return entry
