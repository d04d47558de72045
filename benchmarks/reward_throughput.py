"""Throughput and memory of the `hf:` reward (batched, length-sorted scoring) at a reward model's
real shape, with random weights (no download): by default OpenAssistant's DeBERTa-v3-large
reward model (24 layers, hidden 1024, 16 heads, one logit), on (prompt, response) pairs of
HH-like lengths.

What is measured: `score_dataset`'s unit of work, `HFClassifierReward.score` on `--n` pairs
(prompt 20-200 words, response 10-120 words, random words), batch sizes from `--batch-sizes`:
texts/s, tokens/s and, on a GPU, the peak memory. The tokenizer is SmolLM2's (DeBERTa's
SentencePiece model ships with the hub checkpoint only); token ids differ, shapes do not.

Run:
    .venv/bin/python -m benchmarks.reward_throughput                       # GPU if present
    .venv/bin/python -m benchmarks.reward_throughput --n 64 --batch-sizes 16   # a CPU look
    .venv/bin/python -m benchmarks.reward_throughput --shape tiny          # seconds, any machine
Writes benchmarks/results/reward_throughput.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES: dict[str, dict[str, Any]] = {
    # OpenAssistant/reward-model-deberta-v3-large-v2 (config.json of the hub checkpoint)
    "deberta-v3-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, vocab_size=128100, max_position_embeddings=512,
                             relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
                             share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                             max_relative_positions=-1, type_vocab_size=0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 vocab_size=49152, max_position_embeddings=512, relative_attention=True,
                 position_buckets=64, type_vocab_size=0),
}


def build_model(shape: str, out: Path) -> Path:
    """A random-weight DeBERTa-v2 one-logit classifier of `shape`, with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    from value_models.embedded import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = DebertaV2Config(num_labels=1, pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = "the a of to and is in it that you for was on are with as I his they be at".split()
    words += "good bad help answer question people think know time make want really".split()
    prompts = [" ".join(rng.choices(words, k=rng.randint(20, 200))) for _ in range(n)]
    responses = [" ".join(rng.choices(words, k=rng.randint(10, 120))) for _ in range(n)]
    return prompts, responses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="deberta-v3-large")
    parser.add_argument("--n", type=int, default=512, help="pairs to score per batch size")
    parser.add_argument("--batch-sizes", default="16,32,64", help="comma-separated")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=RESULTS / "reward_throughput.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch
    from tqdm.auto import tqdm

    from value_models.training.rewards import parse_reward

    prompts, responses = pairs(args.n)
    rows = []
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        model = build_model(args.shape, Path(tmp) / "rm")
        for bs in tqdm([int(b) for b in args.batch_sizes.split(",")], desc="batch sizes"):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            rw = parse_reward(f"hf:{model}:output=logit:on=pair:batch_size={bs}:device={args.device}")
            rw.score(prompts[:bs], responses[:bs])  # warm-up
            rw._texts, rw._tokens, rw._seconds = 0, 0, 0.0
            rw.score(prompts, responses)
            st = rw.stats()
            rows.append({"batch_size": bs, **st, "tokens_per_s": st["tokens"] / st["seconds"]})
            del rw
    result = {"shape": args.shape, "n": args.n, "rows": rows, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "machine": platform.platform(), "weights": "random (no download); SmolLM2 tokenizer"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'batch':>6} {'texts/s':>9} {'tokens/s':>10} {'peak GiB':>9}  device")
    for r in rows:
        peak = r.get("peak_gpu_memory_gib")
        peak_s = "-" if peak is None else f"{peak:.2f}"
        print(f"{r['batch_size']:>6} {r['texts_per_s']:>9.1f} {r['tokens_per_s']:>10.0f} "
              f"{peak_s:>9}  {r['device']}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
