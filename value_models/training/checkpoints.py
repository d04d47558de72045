"""The trainer's files: resumable checkpoints (OUT/.checkpoint) and the saved value model.

A checkpoint is one torch file, written by the main process and renamed into place atomically:
the run's settings (a resumed run must match them), the full trainable weights and optimizer
state (engine.trainable_state: unsharded, so 1 process, DDP and FSDP write the same format), the
position (epoch, step in epoch), the history and the elapsed time. The position counts optimizer
batches, whose size depends on the number of processes: that number is part of the settings.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from value_models.delta import DELTA_FILENAME, apply_delta, lora_delta, save_delta
from value_models.metadata import VASMetadata
from value_models.training.rewards import canonical_name
from value_models.training.train_config import TrainConfig

CHECKPOINT_DIR = ".checkpoint"
CHECKPOINT_FORMAT = 2  # 2: keys of the engine's PositionValues module, DCP optimizer state
# Fields that may change between a run and its resumption.
RESUMABLE_FIELDS = {"resume", "checkpoint_every", "log_every", "out", "data", "num_threads",
                    "num_processes", "device", "distributed"}


def config_fingerprint(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    fp = {k: v for k, v in cfg.model_dump().items() if k not in RESUMABLE_FIELDS}
    return {**fp, "world_size": world_size}


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    ck = out / CHECKPOINT_DIR
    ck.mkdir(parents=True, exist_ok=True)
    tmp = ck / "state.pt.tmp"
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, ck / "state.pt")


def load_checkpoint(cfg: TrainConfig, out: Path, world_size: int) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start afresh); refuses one written with other
    settings, naming each difference."""
    path = out / CHECKPOINT_DIR / "state.pt"
    if not (cfg.resume and path.is_file()):
        return None
    state = torch.load(path, weights_only=False, map_location="cpu")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {state.get('format')!r}, expected "
                         f"{CHECKPOINT_FORMAT} (written by another vas-vllm version). Pass "
                         "--no-resume to start over, or use another --out.")
    expected, found = config_fingerprint(cfg, world_size), state["config"]
    diff = {k: (expected.get(k), found.get(k)) for k in set(expected) | set(found)
            if expected.get(k) != found.get(k)}
    if diff:
        raise ValueError(f"{path} was written by a run with other settings: " + ", ".join(
            f"{k}: expected {e!r}, found {f!r}" for k, (e, f) in sorted(diff.items()))
            + ". Pass --no-resume to start over, or use another --out"
            + (" (world_size is the number of processes)." if "world_size" in diff else "."))
    return state


def save_value_model(cfg: TrainConfig, model: Any, init: Path, out: Path,
                     data_meta: dict[str, Any], norm: dict[str, float] | None,
                     history: list[dict], n_train: int, n_val: int, elapsed: float,
                     bins: list[float] | None = None, world_size: int = 1) -> None:
    """Save the trained HF model (LoRA merged into the initial weights), its tokenizer and
    vas.json. `model`: the HF model (or peft model) on the CPU."""
    from transformers import AutoTokenizer

    from value_models.checkpoint import torch_dtype
    from value_models.training.trainer import load_init

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
        "processes": world_size,
    }
    if cfg.lora:
        delta = lora_delta(model)
        num_layers = int(model.config.num_hidden_layers)
        save_delta(out / DELTA_FILENAME, delta, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                   num_layers=num_layers)
        final = load_init(init)
        apply_delta(final, delta, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
        training["lora"] = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets,
                            "delta_file": DELTA_FILENAME, "merged": True}
    else:
        final = model
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
        value_parametrization="residual" if cfg.residual else "direct",
    ).save(out)
