"""How much GPU memory training a value model takes, and how many FLOPs: estimates from the
Llama config, checked against autograd's saved tensors on small models (tests/test_memory.py).

Per process (GiB = 2^30 bytes), P parameters, T trainable, S = processes sharing under FSDP:
    weights       4 P / S            fp32 master weights (autocast computes in bf16)
    bf16 copies   2 P_layers         autocast's bf16 casts of the weights, held for backward
                                     (FSDP: its shard plus two gathered layers)
    gradients     4 T / S
    Adam          8 T / S            two fp32 moments
    activations   B L (layers * a + tail)   saved tensors of one micro-batch of B rows, L tokens
    workspace     activations / layers       the backward's temporaries (one layer's worth)
    overhead      1 GiB              CUDA context, allocator slack (a rule of thumb)
with, per token and layer (h hidden, i intermediate, k = key/value width, n heads), read off
autograd's saved tensors (full fine-tuning; LoRA keeps less, see activation_bytes_per_token):
    bf16: a = 30 h + 4 k + 8 i + 4 n + 8 bytes      fp32: a = 32 h + 8 k + 16 i + 4 n + 8
(norm inputs and outputs, the bf16 casts of the q/k/v/gate/up inputs, q k v, attention output
and log-sum-exp of a fused attention kernel, the MLP's gate, up, activation and product).
Everything the V_old forward allocates is freed before the passes start, so it does not add up.

FLOPs per token (N = parameters in the layers and head): V_old forward 2N, then per pass a
forward 2N and a backward 4N (2N without weight gradients, LoRA), so 2N + passes * 6N (full)
or 2N + passes * 4N (LoRA).

Shape key: B rows, L tokens, h hidden, i intermediate, k key/value width, n heads, r LoRA rank.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

GIB = 2 ** 30
OVERHEAD_GIB = 1.0
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The published configs (config.json on the hub) of the paper's models.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
}


def _shape(config: Any) -> tuple[int, int, int, int, int, int]:
    """(vocab, h, i, layers, heads, key/value width) of a Llama config (object or dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    h, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv = int(get("num_key_value_heads") or heads) * (int(get("head_dim") or h // heads))
    return (int(get("vocab_size")), h, int(get("intermediate_size")), int(get("num_hidden_layers")),
            heads, kv)


def module_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one decoder layer."""
    _, h, i, _, heads, kv = _shape(config)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def param_counts(config: Any, *, lora: bool, lora_r: int = 16,
                 lora_targets: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
                 num_outputs: int = 1) -> dict[str, int]:
    """Parameters of a value model with this config: total, in the layers + head (what the
    forward multiplies), and trainable (LoRA adapters + head, or everything)."""
    vocab, h, _, layers, _, _ = _shape(config)
    shapes = module_shapes(config)
    per_layer = sum(a * b for a, b in shapes.values()) + 2 * h                 # linears, 2 norms
    head = num_outputs * h
    body = layers * per_layer + h + head                                       # + final norm
    total = vocab * h + body
    adapters = layers * sum(lora_r * (a + b) for name, (a, b) in shapes.items() if name in lora_targets)
    trainable = adapters + head if lora else total
    return {"total": total, "body": body, "trainable": trainable, "adapters": adapters if lora else 0}


def activation_bytes_per_token(config: Any, *, precision: str, lora: bool, lora_r: int = 16,
                               lora_targets: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS
                               ) -> float:
    """Bytes autograd keeps per token of a micro-batch: every layer, the final norm, the head
    input and the ids (the tensors listed in the module doc, read off saved-tensor hooks)."""
    _, h, i, layers, heads, kv = _shape(config)
    attention = (4 * h + 4 * kv if precision == "bf16" else 8 * h + 8 * kv) + 4 * heads  # q k v out lse
    if not lora:
        if precision == "bf16":  # norms: x, normed (fp32); bf16 input casts of q k v gate up
            per_layer = 16 * h + 8 + 10 * h + attention + 8 * i
            return layers * per_layer + 10 * h + 12
        per_layer = 24 * h + 8 + attention + 16 * i  # norms: x, normed, scaled (fp32)
        return layers * per_layer + 12 * h + 12
    # LoRA: frozen norms keep only their input; adapters keep their inputs and rank-r outputs
    targets = set(lora_targets)
    down = "down_proj" in targets
    if precision == "bf16":
        casts = 2 * h * len(targets & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
        per_layer = (8 * h + 8 + casts + attention + 6 * i + (2 * i if down else 0)
                     + 2 * lora_r * len(targets))
        return layers * per_layer + 6 * h + 12
    inputs = 4 * h * (bool(targets & {"q_proj", "k_proj", "v_proj"})
                      + bool(targets & {"gate_proj", "up_proj"}))
    per_layer = (8 * h + 8 + inputs + attention + 12 * i + (4 * i if down else 0)
                 + 4 * lora_r * len(targets))
    return layers * per_layer + 8 * h + 12


def estimate_training_memory(config: Any, *, lora: bool, micro_batch: int, seq_len: int,
                             precision: str = "bf16", lora_r: int = 16,
                             lora_targets: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
                             num_outputs: int = 1, fsdp_processes: int = 1) -> dict[str, float]:
    """Peak memory of one training process, by part and in total (GiB); see the module doc."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, found {precision!r}")
    if micro_batch < 1 or seq_len < 1 or fsdp_processes < 1:
        raise ValueError(f"expected micro_batch, seq_len, fsdp_processes >= 1, found {micro_batch}, "
                         f"{seq_len}, {fsdp_processes}")
    n = param_counts(config, lora=lora, lora_r=lora_r, lora_targets=lora_targets,
                     num_outputs=num_outputs)
    s = fsdp_processes
    parts = {
        "weights": 4 * n["total"] / s,
        # FSDP gathers a layer's weights (in bf16) for its forward and again for its backward
        "bf16_copies": (0.0 if precision != "bf16" else 2 * n["body"] if s == 1
                        else 2 * n["body"] / s + 2 * 2 * (n["body"] / _shape(config)[3])),
        "gradients": 4 * n["trainable"] / s,
        "adam": 8 * n["trainable"] / s,
        "activations": micro_batch * seq_len * activation_bytes_per_token(
            config, precision=precision, lora=lora, lora_r=lora_r, lora_targets=lora_targets),
    }
    # the backward's working set: about one layer's saved tensors again
    parts["workspace"] = parts["activations"] / max(_shape(config)[3], 1)
    out = {k: v / GIB for k, v in parts.items()}
    out["overhead"] = OVERHEAD_GIB
    out["total"] = sum(out.values())
    return out


def training_flops_per_token(config: Any, *, lora: bool, passes_per_batch: int = 2) -> float:
    """FLOPs per trained token: the V_old forward plus `passes_per_batch` forward + backward."""
    body = param_counts(config, lora=lora)["body"]
    return 2 * body + passes_per_batch * (4 if lora else 6) * body


def estimate_hours(config: Any, tokens: float, *, lora: bool, gpus: int, peak_tflops: float,
                   mfu: float = 0.35, passes_per_batch: int = 2) -> float:
    """Training hours for `tokens` trained tokens at a model-FLOPs utilisation `mfu` of
    `peak_tflops` (dense bf16) per GPU. An estimate: nothing here measures a GPU."""
    flops = tokens * training_flops_per_token(config, lora=lora, passes_per_batch=passes_per_batch)
    return flops / (gpus * peak_tflops * 1e12 * mfu) / 3600


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m value_models.training.memory",
                                     description="Estimate a value model's training memory per "
                                     "GPU (GiB) from its Llama config.")
    parser.add_argument("config", help=f"a config.json, a model folder, or one of {sorted(SHAPES)}")
    parser.add_argument("--lora", action="store_true", help="LoRA (default: full fine-tuning)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row (padded)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--fsdp-processes", type=int, default=1, help="GPUs FSDP shards over")
    args = parser.parse_args(argv)
    if args.config in SHAPES:
        config: Any = SHAPES[args.config]
    else:
        path = Path(args.config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    est = estimate_training_memory(config, lora=args.lora, lora_r=args.lora_r,
                                   micro_batch=args.micro_batch, seq_len=args.seq_len,
                                   precision=args.precision, fsdp_processes=args.fsdp_processes)
    print(json.dumps({k: round(v, 2) for k, v in est.items()}, indent=2))


if __name__ == "__main__":
    main()
