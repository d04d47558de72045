"""Training data for a value model: M responses per prompt from the frozen generator (plain vLLM).

Dataset folder layout:
    dataset.json     what was sampled and how (generator, prompt source, sampling parameters)
    samples.jsonl    one line per response: prompt_id, prompt, sample, response,
                     prompt_token_ids, response_token_ids, finish_reason
    scores.*.jsonl   reward caches (rewards.py)
    runs.jsonl       one line per `vas-vllm sample` run that sampled something, interrupted ones
                     included: prompts and tokens it added, wall-clock, start-up, tokens/s, machine
                     (`dataset_summary` adds them up: `vas-vllm sample-summary DIR`)

Chat (`--chat`): each prompt is a conversation rendered by vLLM's own chat path (`LLM.chat`, the
generator's chat template, generation prompt added), as `/v1/chat/completions` renders it; the
record's `prompt` is then the rendered text, `messages` the conversation, and prompt_token_ids
the ids the server's engine (and so the VAS plugin) holds for that conversation.

Engines: `data_parallel_size` vLLM engines (default 1), each in a child process
(sample_engines.py) on its own `tensor_parallel_size` GPUs, taking chunks round-robin; on a
CPU-only host an engine runs its model inside that child (local_engine.py's layout, ~2x faster
on 2 cores). A caller may pass its own engine instead (`llm=`).

Resumable without loss: prompts are processed in fixed chunks (prompt ids [c*C, (c+1)*C)); each
finished chunk is appended (under a file lock), flushed and fsynced. On restart the file is
scanned: a truncated last line and prompts with fewer than M samples are dropped (the file is
rewritten atomically), and a chunk is regenerated only if one of its prompts is missing. A regenerated chunk is run in full,
so vLLM sees the same batch as an uninterrupted run would, and only its missing prompts are
written. Prompt i is sampled with seed `prompt_seed(seed, i)` (vLLM gives its n children
seed+0..n-1), so a resumed run writes the same samples as one that was never interrupted.

vLLM is imported inside functions; scripts that call `generate_dataset` must guard their entry
point with `if __name__ == "__main__":` (vLLM spawns worker processes).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from value_models.training.prompts import Conversation, Prompt, load_prompts
from value_models.training.train_config import EMBEDDED_SMOLLM2, SampleConfig

if TYPE_CHECKING:
    from vllm import LLM

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
DATASET_FILE = "dataset.json"
RUNS_FILE = "runs.jsonl"
DATASET_FORMAT = 1
# SampleConfig fields that change what is sampled: a resumed run must match them.
_SAMPLING_KEYS = ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens", "seed",
                  "chunk_prompts", "dtype", "max_model_len")


class DatasetMismatchError(ValueError):
    """The dataset folder was started with other settings or other prompts."""


SEED_STRIDE = 4096  # > any n: prompt i's children use seeds base + i*STRIDE + 0..n-1


def prompt_seed(seed: int, prompt_id: int) -> int:
    """Seed of prompt `prompt_id`'s request. vLLM gives the n children of a request seeds
    seed + 0..n-1, so prompts are spaced SEED_STRIDE apart from a base hashed from `seed`: no two
    samples share a seed for n <= 4096 and fewer than 2^31 / 4096 (524,288) prompts."""
    base = int.from_bytes(hashlib.sha256(f"vas-sample\0{seed}".encode()).digest()[:4], "big")
    return (base + prompt_id * SEED_STRIDE) % 2**31


def resolve_generator(generator: str) -> Path:
    """A generator folder: `embedded:smollm2` is built (cached); anything else is resolved as a
    local folder or hub id."""
    if generator == EMBEDDED_SMOLLM2:
        from value_models.embedded import build_smollm2

        return build_smollm2("bfloat16")
    from value_models.checkpoint import resolve_model_path

    return resolve_model_path(generator)


def prompt_key(prompt: Prompt) -> str:
    """A prompt's identity: its text, or its conversation as compact JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))


def record_key(rec: dict[str, Any]) -> str:
    """The identity of the prompt a sample record was drawn from (see prompt_key)."""
    return prompt_key(rec["messages"]) if "messages" in rec else rec["prompt"]


def as_conversation(prompt: Prompt) -> Conversation:
    """A chat prompt: a text prompt becomes one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _prompts_digest(prompts: list[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(prompt_key(p).encode("utf-8") + b"\0")
    return h.hexdigest()


def dataset_meta(cfg: SampleConfig, prompts: list[Prompt]) -> dict[str, Any]:
    """The dataset.json content for a config and its prompt list."""
    sampling: dict[str, Any] = {k: getattr(cfg, k) for k in _SAMPLING_KEYS}
    if cfg.chat:  # only when set: datasets written before chat existed still resume
        sampling["chat"] = True
    # the batch shapes change bf16 rounding, so a resumed run must keep them; recorded only
    # when not the defaults of datasets written before they were settable
    for key, old_default in (("max_num_seqs", 256), ("max_num_batched_tokens", 4096)):
        if getattr(cfg, key) != old_default:
            sampling[key] = getattr(cfg, key)
    return {
        "format": DATASET_FORMAT,
        "generator": cfg.generator,
        "prompts": cfg.prompts,
        "num_prompts": len(prompts),
        "prompts_sha256": _prompts_digest(prompts),
        "sampling": sampling,
    }


def _check_meta(path: Path, expected: dict[str, Any]) -> None:
    def flat(d: dict[str, Any]) -> dict[str, Any]:
        return {f"{k}.{k2}" if isinstance(v, dict) else k: v2
                for k, v in d.items() for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])}

    exp, found = flat(expected), flat(json.loads(path.read_text(encoding="utf-8")))
    diff = {k: (exp.get(k), found.get(k)) for k in set(exp) | set(found) if exp.get(k) != found.get(k)}
    if diff:
        lines = "\n".join(f"  {k}: expected {e!r}, found {f!r}" for k, (e, f) in sorted(diff.items()))
        raise DatasetMismatchError(
            f"{path} was written with other settings; resuming would mix two datasets:\n{lines}\n"
            "Use another --out folder (or delete this one).")


@dataclass
class ScanResult:
    complete: dict[int, list[dict[str, Any]]]  # prompt_id -> its M lines, by sample index
    dropped_lines: int                         # truncated / unparsable / partial-prompt lines


def scan_samples(path: Path, num_samples: int, prompts: list[Prompt] | None = None) -> ScanResult:
    """Read samples.jsonl, keeping only prompts with all `num_samples` samples. A truncated or
    unparsable line is dropped (counted), never fatal. With `prompts`, each line's prompt (text
    or conversation) must equal prompts[prompt_id]."""
    by_prompt: dict[int, dict[int, dict[str, Any]]] = {}
    dropped = 0
    if path.exists():
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                    pid, j = int(rec["prompt_id"]), int(rec["sample"])
                except (ValueError, KeyError, TypeError):
                    dropped += 1
                    continue
                if prompts is not None and (pid >= len(prompts)
                                            or prompt_key(prompts[pid]) != record_key(rec)):
                    raise DatasetMismatchError(
                        f"{path}: prompt_id {pid} holds prompt {record_key(rec)!r}, expected "
                        f"{prompt_key(prompts[pid]) if pid < len(prompts) else '<no such prompt>'!r}")
                by_prompt.setdefault(pid, {})[j] = rec
    complete: dict[int, list[dict[str, Any]]] = {}
    for pid, recs in by_prompt.items():
        if sorted(recs) == list(range(num_samples)):
            complete[pid] = [recs[j] for j in range(num_samples)]
        else:
            dropped += len(recs)
    return ScanResult(complete, dropped)


def drop_partial_line(path: Path) -> None:
    """Cut a file back to its last newline (an interrupted append leaves a partial line), so the
    next append starts on a fresh line."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)
            fh.flush()
            os.fsync(fh.fileno())


def _fsync_write(path: Path, lines: Iterable[str], mode: str) -> None:
    """Write lines, flush and fsync; under an exclusive lock on the file, so that several
    sampling engines can append to one file whole chunks at a time."""
    with open(path, mode, encoding="utf-8") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            for line in lines:
                fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _rewrite(path: Path, complete: dict[int, list[dict[str, Any]]]) -> None:
    """Atomically replace `path` with only the complete prompts' lines."""
    tmp = path.with_suffix(".jsonl.tmp")
    _fsync_write(tmp, (json.dumps(r) + "\n" for pid in sorted(complete) for r in complete[pid]), "w")
    os.replace(tmp, path)


def _records(prompt_id: int, output: Any, messages: Conversation | None = None
             ) -> list[dict[str, Any]]:
    completions = sorted(output.outputs, key=lambda c: c.index)
    extra = {"messages": messages} if messages is not None else {}
    return [{
        "prompt_id": prompt_id, "prompt": output.prompt, **extra, "sample": c.index,
        "response": c.text, "prompt_token_ids": list(output.prompt_token_ids),
        "response_token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
    } for c in completions]


def in_process(cfg: SampleConfig) -> bool:
    """Whether the engine runs in the sampling process (SampleConfig.in_process_engine)."""
    if cfg.in_process_engine != "auto":
        return cfg.in_process_engine == "on"
    import torch

    return cfg.tensor_parallel_size == 1 and not torch.cuda.is_available()


def build_llm(cfg: SampleConfig, model_path: Path | None = None) -> LLM:
    """A vLLM engine for `cfg` (model_path defaults to the resolved cfg.generator). With the
    in-process layout (in_process) the engine binds this process's OpenMP threads to cores:
    call it in a process of its own (sample_engines does)."""
    from vllm import LLM

    from vas_vllm.local_engine import in_process_engine_kwargs

    path = model_path or resolve_generator(cfg.generator)
    kwargs: dict[str, Any] = dict(
        model=str(path), dtype=cfg.dtype, seed=cfg.seed, max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
        tensor_parallel_size=cfg.tensor_parallel_size, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=max(cfg.max_num_batched_tokens, cfg.max_model_len))
    if cfg.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    if not in_process(cfg):
        return LLM(**kwargs)
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING",
                                            "VLLM_CPU_NUM_OF_RESERVED_CPU")}
    try:  # read while the engine starts; restored so that later subprocesses do not inherit them
        return LLM(**kwargs, **in_process_engine_kwargs())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sample_chunks(cfg: SampleConfig, llm: LLM, prompts: list[Prompt], chunks: list[range],
                  done: set[int], samples_path: Path,
                  on_chunk: Callable[[int, int], None] = lambda new, tokens: None) -> None:
    """Sample each chunk in full (vLLM sees the batch an uninterrupted run would) and append
    the lines of its prompts not in `done`; on_chunk(new prompts, tokens sampled) after each."""
    from vllm import SamplingParams

    for chunk in chunks:
        params = [SamplingParams(n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k if cfg.top_k > 0 else -1,
                                 max_tokens=cfg.max_new_tokens, seed=prompt_seed(cfg.seed, i))
                  for i in chunk]
        if cfg.chat:
            convs = [as_conversation(prompts[i]) for i in chunk]
            outputs = llm.chat(convs, params, use_tqdm=False)
        else:
            if any(not isinstance(prompts[i], str) for i in chunk):
                raise ValueError(f"{cfg.prompts}: conversations ('messages') need --chat")
            convs = [None] * len(chunk)
            outputs = llm.generate([prompts[i] for i in chunk], params, use_tqdm=False)
        lines: list[str] = []
        tokens = 0
        for i, conv, output in zip(chunk, convs, outputs):
            tokens += sum(len(c.token_ids) for c in output.outputs)
            if i not in done:
                lines.extend(json.dumps(r) + "\n" for r in _records(i, output, conv))
        _fsync_write(samples_path, lines, "a")
        on_chunk(sum(i not in done for i in chunk), tokens)
        done.update(chunk)


def generate_dataset(cfg: SampleConfig, *, llm: LLM | None = None,
                     max_chunks: int | None = None, stats: dict[str, Any] | None = None) -> Path:
    """Sample cfg.num_samples responses for every prompt into cfg.out (resuming if present).

    `llm`: an engine to reuse (tests share one); it must serve cfg.generator with cfg.dtype.
    `max_chunks`: stop after generating that many chunks (simulates an interruption).
    `stats`: filled with tokens, wall_s, startup_s (until the first engine was ready) and
    sampling_tokens_per_s (tokens over the time after start-up: the rate the progress bar shows).
    Returns the dataset folder.
    """
    from tqdm.auto import tqdm

    prompts = load_prompts(cfg.prompts, cfg.max_prompts)
    if not prompts:
        raise ValueError(f"prompt source {cfg.prompts!r} gave no prompts")
    if not cfg.chat and not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{cfg.prompts} holds conversations ('messages'): sample them with --chat")
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    meta = dataset_meta(cfg, prompts)
    meta_path, samples_path = out / DATASET_FILE, out / SAMPLES_FILE
    if meta_path.exists():
        _check_meta(meta_path, meta)
    else:
        meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    scan = scan_samples(samples_path, cfg.num_samples, prompts)
    if scan.dropped_lines:
        logger.warning("%s: dropping %d incomplete line(s) (truncated write or partial prompt); "
                       "their prompts are sampled again", samples_path, scan.dropped_lines)
        _rewrite(samples_path, scan.complete)
    done = set(scan.complete)
    C = cfg.chunk_prompts
    chunks = [range(s, min(s + C, len(prompts))) for s in range(0, len(prompts), C)]
    todo = [ch for ch in chunks if any(i not in done for i in ch)][:max_chunks]
    logger.info("%s: %d/%d prompts already complete; %d chunk(s) of <= %d prompts to sample",
                out, len(done), len(prompts), len(todo), C)
    if not todo:
        return out

    missing = sum(i not in done for ch in todo for i in ch)
    tokens, t0 = 0, time.perf_counter()
    ready = t0 if llm is not None else None   # the rate counts from the first engine ready
    bar = tqdm(total=missing, unit="prompt", desc="sample", dynamic_ncols=True)

    def on_ready() -> None:
        nonlocal ready
        if ready is None:
            ready = time.perf_counter()
            logger.info("engine ready after %.0f s", ready - t0)

    added = 0   # prompts this run completed

    def on_chunk(new: int, chunk_tokens: int) -> None:
        nonlocal tokens, added
        tokens += chunk_tokens
        added += new
        bar.update(new)
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - (ready or t0), 1e-9):.0f}")

    started, finished = time.time(), False
    try:
        if llm is None:
            from value_models.training.sample_engines import run_engines

            run_engines(cfg, todo, done, samples_path, on_chunk, on_ready)
        else:
            sample_chunks(cfg, llm, prompts, todo, done, samples_path, on_chunk)
        finished = True
    finally:   # interrupted runs are recorded too: the dataset's wall-clock is the sum of its runs
        bar.close()
        end = time.perf_counter()
        start_up = (ready or t0) - t0
        rate = tokens / max(end - (ready or t0), 1e-9)
        if stats is not None:
            stats.update(tokens=tokens, wall_s=end - t0, startup_s=start_up, sampling_tokens_per_s=rate)
        if added:
            _record_run(out / RUNS_FILE, dict(
                started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                prompts=added, tokens=tokens, wall_s=round(end - t0, 3),
                startup_s=round(start_up, 3), sampling_tokens_per_s=round(rate, 1), interrupted=not finished))
    complete = scan_samples(samples_path, cfg.num_samples).complete
    logger.info("%s: %d/%d prompts complete, %d tokens sampled in %.0f s (engine start-up %.0f s, "
                "then %.0f tokens/s)", out, len(complete), len(prompts), tokens, end - t0, start_up, rate)
    return out


def _record_run(path: Path, run: dict[str, Any]) -> None:
    from vas_vllm.provenance import cpu_info

    run["machine"] = cpu_info()
    _fsync_write(path, [json.dumps(run) + "\n"], "a")


def _dataset_meta(data_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the folder, its dataset.json), or FileNotFoundError naming what is missing."""
    data = Path(data_dir).expanduser()
    meta_path = data / DATASET_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {data} is not a dataset folder written "
                                "by `vas-vllm sample`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return data, meta


def dataset_summary(data_dir: str | Path) -> dict[str, Any]:
    """What a dataset folder holds and what sampling it cost: complete prompts, samples and
    response tokens (counted in samples.jsonl), and the recorded runs (runs.jsonl) summed: the
    prompts they completed, the tokens they generated (a resumed chunk is generated in full again,
    so these include prompts sampled twice), wall-clock, engine start-up, and tokens/s over the
    sampling time after start-up. `unrecorded_prompts`: complete prompts beyond those the recorded
    runs completed (sampled before runs.jsonl existed)."""
    data, meta = _dataset_meta(data_dir)
    complete = scan_samples(data / SAMPLES_FILE, meta["sampling"]["num_samples"]).complete
    samples = sum(len(v) for v in complete.values())
    tokens = sum(len(r["response_token_ids"]) for v in complete.values() for r in v)
    runs = []
    if (data / RUNS_FILE).is_file():
        runs = [json.loads(line) for line in (data / RUNS_FILE).read_text(encoding="utf-8").splitlines()
                if line.strip()]
    run_tokens = sum(r["tokens"] for r in runs)
    sampling_s = sum(r["wall_s"] - r["startup_s"] for r in runs)
    machines = []
    for r in runs:
        if r.get("machine") not in machines:
            machines.append(r.get("machine"))
    return {"dataset": str(data), "num_prompts": meta["num_prompts"], "complete_prompts": len(complete),
            "samples": samples, "response_tokens": tokens, "sampling": meta["sampling"],
            "runs": len(runs), "recorded_prompts": sum(r["prompts"] for r in runs),
            "unrecorded_prompts": max(0, len(complete) - sum(r["prompts"] for r in runs)),
            "recorded_tokens": run_tokens, "wall_s": sum(r["wall_s"] for r in runs),
            "startup_s": sum(r["startup_s"] for r in runs),
            "sampling_tokens_per_s": run_tokens / sampling_s if sampling_s > 0 else None,
            "machines": machines}


def load_samples(data_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(dataset.json, samples of complete prompts ordered by (prompt_id, sample))."""
    data, meta = _dataset_meta(data_dir)
    scan = scan_samples(data / SAMPLES_FILE, meta["sampling"]["num_samples"])
    if len(scan.complete) < meta["num_prompts"]:
        logger.warning("%s holds %d of %d prompts (sampling unfinished?); using those", data,
                       len(scan.complete), meta["num_prompts"])
    samples = [r for pid in sorted(scan.complete) for r in scan.complete[pid]]
    return meta, samples
