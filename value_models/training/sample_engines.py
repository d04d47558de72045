"""The processes that sample: `data_parallel_size` vLLM engines, each in a child process.

Engine r takes chunks r, r + D, r + 2D, ... of the chunks left to sample (D engines), on its own
`tensor_parallel_size` GPUs (CUDA_VISIBLE_DEVICES) or, without GPUs, its own share of the CPU
cores (VLLM_CPU_OMP_THREADS_BIND). A chunk is always sampled whole by one engine and prompt i's
seed depends on i only, so the samples are those one engine would draw; the engines append whole
chunks to samples.jsonl under a file lock, and a rerun resumes chunk by chunk.

A child of our own also contains what an engine does to its process: the in-process layout
(sampling.in_process) binds the process's OpenMP threads to cores and fixes vLLM's environment.
Stopping the sampler (Ctrl-C, or SIGTERM from a job runner) stops its engine processes too: a
SIGTERM is turned into SystemExit in the main thread so the engines are terminated on the way out.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from value_models.training.train_config import SampleConfig

logger = logging.getLogger(__name__)


def _visible_gpus() -> list[str]:
    """The GPU ids this process may use (CUDA_VISIBLE_DEVICES, else every GPU torch sees)."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g for g in env.split(",") if g.strip()] if env else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def engine_envs(cfg: SampleConfig) -> list[dict[str, str]]:
    """The environment of each engine process: its GPUs, or its CPU cores."""
    dp, tp = cfg.data_parallel_size, cfg.tensor_parallel_size
    gpus = _visible_gpus()
    if gpus:
        if len(gpus) < dp * tp:
            raise ValueError(f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {dp * tp} "
                             f"GPUs, found {len(gpus)} ({','.join(gpus)})")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[r * tp:(r + 1) * tp])} for r in range(dp)]
    if dp == 1:
        return [{}]
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // dp
    if per < tp:
        logger.warning("%d CPU cores for %d engines x %d: the engines share cores", len(cores),
                       dp, tp)
        return [{"VLLM_CPU_OMP_THREADS_BIND": "nobind"} for _ in range(dp)]
    # one core list per tensor-parallel rank of each engine, "|"-separated
    return [{"VLLM_CPU_OMP_THREADS_BIND": "|".join(
        ",".join(str(c) for c in cores[r * per:(r + 1) * per][k::tp]) for k in range(tp))}
        for r in range(dp)]


def _engine_main(cfg_json: str, chunks: list[tuple[int, int]], done: list[int], samples_path: str,
                 env: dict[str, str], progress: Any) -> None:
    """One engine process: sample `chunks` (start, stop) and report (new prompts, tokens)."""
    os.environ.update(env)  # before vLLM (and CUDA) are imported here
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from value_models.training.prompts import load_prompts
    from value_models.training.sampling import build_llm, sample_chunks

    cfg = SampleConfig.model_validate_json(cfg_json)
    prompts = load_prompts(cfg.prompts, cfg.max_prompts)
    llm = build_llm(cfg)
    progress.put(("ready",))
    sample_chunks(cfg, llm, prompts, [range(a, b) for a, b in chunks], set(done),
                  Path(samples_path), on_chunk=lambda new, tokens: progress.put(("chunk", new, tokens)))


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit here (main thread only), so finally blocks run and the engine
    processes are terminated instead of outliving the sampler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_engines(cfg: SampleConfig, todo: list[range], done: set[int], samples_path: Path,
                on_chunk: Callable[[int, int], None], on_ready: Callable[[], None] = lambda: None) -> None:
    """Sample the chunks `todo` with cfg.data_parallel_size engine processes; on_ready() when an
    engine has started, on_chunk(new prompts, tokens) as chunks finish. Raises if an engine fails
    (finished chunks stay)."""

    def handle(msg: tuple) -> None:
        if msg[0] == "ready":
            on_ready()
        else:
            on_chunk(*msg[1:])

    ctx = mp.get_context("spawn")  # vLLM and CUDA do not survive fork
    progress = ctx.Queue()
    envs = engine_envs(cfg)
    with _sigterm_exits():
        _run(cfg, todo, done, samples_path, ctx, progress, envs, handle)


def _run(cfg: SampleConfig, todo: list[range], done: set[int], samples_path: Path, ctx: Any,
         progress: Any, envs: list[dict[str, str]], handle: Callable[[tuple], None]) -> None:
    procs: list[tuple[int, Any]] = []
    try:
        for r, env in enumerate(envs):
            mine = [(ch.start, ch.stop) for ch in todo[r::len(envs)]]
            if not mine:
                continue
            proc = ctx.Process(target=_engine_main, name=f"vas-sample-engine-{r}",
                               args=(cfg.model_dump_json(), mine, sorted(done), str(samples_path), env,
                                     progress))
            proc.start()
            procs.append((r, proc))
        logger.info("sampling with %d engine process(es): %s", len(procs), [e or "default" for e in envs])
        while True:
            try:
                handle(progress.get(timeout=0.5))
                continue
            except queue_mod.Empty:
                pass
            failed = [(r, p.exitcode) for r, p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"sampling engine(s) failed (engine, exit code): {failed}; the "
                                   "chunks already written are kept, run again to resume")
            if all(p.exitcode == 0 for _, p in procs):
                break
    finally:
        for _, p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    while True:  # progress sent just before the last engine exited
        try:
            handle(progress.get_nowait())
        except queue_mod.Empty:
            break
