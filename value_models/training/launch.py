"""`vas-vllm train --num-processes N`: start N local training processes with torch's elastic
launcher (what `torchrun` and `accelerate launch` run), each running the trainer with the same
configuration; the launcher sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT and the
Accelerator picks them up (engine.make_accelerator). If one process fails, the launcher stops the
others and raises; the checkpoint in OUT/.checkpoint lets the next run resume.

On CPU each process gets cores // N threads (OMP_NUM_THREADS) unless --num-threads says more.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from value_models.training.train_config import TrainConfig

logger = logging.getLogger(__name__)


def _worker(cfg_json: str) -> str:
    """One process: train with the configuration (module-level, so that spawn can pickle it)."""
    from value_models.training.trainer import train_value_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return str(train_value_model(TrainConfig.model_validate_json(cfg_json)))


def launch_local(cfg: TrainConfig) -> Path:
    """Run the trainer in cfg.num_processes local processes; returns the model folder."""
    import torch
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = cfg.num_processes
    if torch.cuda.is_available() and cfg.device != "cpu" and torch.cuda.device_count() < n:
        raise ValueError(f"num_processes {n} but torch sees {torch.cuda.device_count()} GPU(s): "
                         "one process per GPU")
    threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // n)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"vas-train-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, start_method="spawn",
        monitor_interval=0.5)
    logger.info("starting %d training processes (%d CPU threads each)", n, threads)
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = before or str(threads)  # the children inherit it
    try:
        results = elastic_launch(config, _worker)(cfg.model_dump_json())
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
    return Path(results[0])
