"""Single-process CPU training speed on the embedded recipe, this tree vs a baseline revision.

What is measured: `train_value_model` on the embedded "positive" recipe's model and settings
(the first 4 layers of SmolLM2-135M with LoRA r 16 + score head, batch 32, 2 passes per batch,
bf16 autocast, 1 thread), on `--steps` optimizer steps of synthetic samples shaped like the
recipe's (8-token prompts, 40-token responses, SmolLM2 token ids). Per run: the CPU time (one
thread: other jobs on the machine hardly change it) and the wall time of the whole call
(accelerator set-up, validation, checkpoints and the save included) and of one optimizer step.
The initial value model is built once beforehand and passed as --init, so neither side pays for
it.

Each tree runs in its own subprocess (PYTHONPATH = that tree), alternating A, B, A, B, ... so
that load from other jobs hits both alike; the table gives the median and the best run.

Run:
    .venv/bin/python -m benchmarks.train_speed --baseline d4975f8     # vs the pre-accelerate trainer
    .venv/bin/python -m benchmarks.train_speed --steps 4 --repeats 1  # a quick look
Writes benchmarks/results/train_speed.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.train_speed")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = dict(value_layers=4, lora=True, lora_r=16, lora_alpha=32, batch_size=32, passes_per_batch=2,
              precision="bf16", lr=2e-4, epochs=1, val_fraction=0.1, num_threads=1, seed=0,
              checkpoint_every=50)


class LengthReward:
    """A cheap deterministic reward (the reward does not change the training cost)."""

    name = "bench_length"

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(len(r) % 7) for r in responses]


def write_dataset(out: Path, num_samples: int, seed: int = 0) -> Path:
    """Samples shaped like the embedded recipe's: 4 per prompt, 8 + 40 tokens."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    prompts = num_samples // 4
    meta = {"format": 1, "generator": "embedded:smollm2", "prompts": "bench", "num_prompts": prompts,
            "prompts_sha256": "0", "sampling": {"num_samples": 4}}
    (out / "dataset.json").write_text(json.dumps(meta))
    with open(out / "samples.jsonl", "w") as fh:
        for pid in range(prompts):
            p = [rng.randrange(100, 49000) for _ in range(8)]
            for j in range(4):
                r = [rng.randrange(100, 49000) for _ in range(40)]
                fh.write(json.dumps({"prompt_id": pid, "prompt": f"p{pid}", "sample": j,
                                     "response": f"r{pid}.{j}" + "x" * rng.randrange(7),
                                     "prompt_token_ids": p, "response_token_ids": r,
                                     "finish_reason": "length"}) + "\n")
    return out


def worker(data: Path, init: Path, out: Path) -> dict[str, Any]:
    """One timed training run with whichever value_models is on the path."""
    import torch

    from value_models import TrainConfig, score_dataset, train_value_model

    trainer = sys.modules[train_value_model.__module__]  # value_models(.training).trainer
    score_dataset(data, LengthReward())
    step_times: list[float] = []
    step_cpu: list[float] = []
    real = trainer.optimizer_step

    def timed(*a: Any, **kw: Any) -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = real(*a, **kw)
        step_times.append(time.perf_counter() - t0)
        step_cpu.append(time.process_time() - c0)
        return loss

    trainer.optimizer_step = timed
    cfg = TrainConfig(data=str(data), out=str(out), reward=LengthReward.name, init=str(init),
                      resume=False, **RECIPE)
    t0, c0 = time.perf_counter(), time.process_time()
    train_value_model(cfg)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"total_s": total, "step_s": statistics.mean(step_times), "total_cpu_s": total_cpu,
            "step_cpu_s": statistics.median(step_cpu), "steps": len(step_times),
            "torch": torch.__version__}


def init_folder(cache: Path) -> Path:
    from value_models import build_smollm2, make_value_model
    from value_models.cache_build import build_once

    return build_once(cache / "train-speed-init-4l", lambda tmp: make_value_model(
        build_smollm2(), tmp, num_layers=RECIPE["value_layers"], dtype="float32",
        overwrite=True), params={"layers": RECIPE["value_layers"]})


def run_tree(tree: Path, data: Path, init: Path, out: Path) -> dict[str, Any]:
    """One run in a subprocess whose value_models is `tree`'s (this file runs as a script, so
    its own folder, not a tree's benchmarks package, comes first on the path)."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(data), str(init), str(out)],
        env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
        cwd=tempfile.gettempdir())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training run in {tree} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print("RESULT " + json.dumps(worker(*(Path(a) for a in argv[1:4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="d4975f8",
                        help="git revision to compare with (default d4975f8, before accelerate)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree (alternating)")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from tqdm.auto import tqdm

    from value_models import cache_dir

    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp_name:
        tmp = Path(tmp_name)
        base = tmp / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        # ceil(steps / 0.9) * 32 samples: `steps` training steps after the 10 % validation split
        data = write_dataset(tmp / "data", num_samples=-(-args.steps * 32 * 10 // 9) // 4 * 4 + 4)
        init = init_folder(cache_dir())
        trees = {"baseline": base, "this tree": ROOT}
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
        for i in tqdm(range(args.repeats * len(trees)), desc="train runs", unit="run"):
            name = list(trees)[i % len(trees)]
            runs[name].append(run_tree(trees[name], data, init, tmp / f"out-{i}"))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    summary = {name: {"step_cpu_s_median": statistics.median(r["step_cpu_s"] for r in rs),
                      "total_cpu_s_median": statistics.median(r["total_cpu_s"] for r in rs),
                      "step_s_median": statistics.median(r["step_s"] for r in rs),
                      "step_s_best": min(r["step_s"] for r in rs),
                      "total_s_median": statistics.median(r["total_s"] for r in rs),
                      "steps": rs[0]["steps"]} for name, rs in runs.items()}
    ratio = summary["this tree"]["step_cpu_s_median"] / summary["baseline"]["step_cpu_s_median"]
    total_ratio = summary["this tree"]["total_cpu_s_median"] / summary["baseline"]["total_cpu_s_median"]
    result = {"baseline": args.baseline, "head": head, "recipe": RECIPE, "runs": runs,
              "summary": summary, "step_cpu_ratio": ratio, "total_cpu_ratio": total_ratio,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "note": "CPU time (1 thread, so contention from other jobs barely moves it) is the "
                      "measure; wall-clock on a shared machine is noisy; runs alternate"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'tree':<12} {'step CPU s':>11} {'run CPU s':>10} {'step wall s':>12} {'run wall s':>11}")
    for name, s in summary.items():
        print(f"{name:<12} {s['step_cpu_s_median']:>11.3f} {s['total_cpu_s_median']:>10.1f} "
              f"{s['step_s_median']:>12.3f} {s['total_s_median']:>11.1f}")
    print(f"CPU time this tree / baseline (medians): per step {ratio:.3f}, per run {total_ratio:.3f}; "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
