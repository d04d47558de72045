"""Load a value model's weights from an HF safetensors folder into fused, inference-ready tensors.

Fusing q/k/v and gate/up into one matrix each turns five GEMMs per layer into three; the
split afterwards is a free view. Shapes (see runtime/__init__.py for the key):
    qkv_w [(H + 2*Hkv) * D, Hid], o_w [Hid, H * D], gate_up_w [2 * I, Hid], down_w [Hid, I]
The final norm and the score head [O, Hid] (O = 1 for a scalar value, B for reward bins) are kept
in float32 whatever the model's dtype: they run in fp32 so a bf16 model's values are not rounded
to bf16 before VAS compares candidates.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from vas_vllm.runtime.spec import LlamaSpec, UnsupportedModelError


@dataclass
class LayerWeights:
    ln_attn: torch.Tensor          # [Hid]
    qkv_w: torch.Tensor            # [(H + 2*Hkv) * D, Hid]
    qkv_b: torch.Tensor | None     # [(H + 2*Hkv) * D]
    o_w: torch.Tensor              # [Hid, H * D]
    o_b: torch.Tensor | None       # [Hid]
    ln_mlp: torch.Tensor           # [Hid]
    gate_up_w: torch.Tensor        # [2 * I, Hid]
    gate_up_b: torch.Tensor | None # [2 * I]
    down_w: torch.Tensor           # [Hid, I]
    down_b: torch.Tensor | None    # [Hid]


@dataclass
class ValueWeights:
    embed: torch.Tensor            # [V, Hid]
    layers: list[LayerWeights]
    norm: torch.Tensor             # [Hid] fp32
    score_w: torch.Tensor          # [O, Hid] fp32
    score_b: torch.Tensor | None   # [O] fp32


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in value-model folder {folder}")
    return files


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                state[name] = fh.get_tensor(name)
    return state


def load_value_weights(
    folder: str | Path, spec: LlamaSpec, *, dtype: torch.dtype, device: torch.device | str
) -> ValueWeights:
    """Read `folder`'s safetensors (a LlamaForSequenceClassification with num_labels=1)."""
    folder = Path(folder)
    state = _read_state(folder)

    def take(name: str, required: bool = True, as_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        for key in (name, f"model.{name}"):
            if key in state:
                return state[key].to(device=device, dtype=as_dtype or dtype)
        if required:
            raise UnsupportedModelError(f"{folder}: weight {name!r} is missing from the checkpoint")
        return None

    def cat_opt(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise UnsupportedModelError(f"{folder}: some but not all of q/k/v (or gate/up) have a bias")
        return torch.cat(parts, dim=0)  # type: ignore[arg-type]

    layers = []
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        q, k, v = (take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        gate, up = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
        layers.append(LayerWeights(
            ln_attn=take(p + "input_layernorm.weight"),
            qkv_w=torch.cat([q, k, v], dim=0).contiguous(),
            qkv_b=cat_opt([take(p + f"self_attn.{n}_proj.bias", False) for n in "qkv"]),
            o_w=take(p + "self_attn.o_proj.weight"),
            o_b=take(p + "self_attn.o_proj.bias", False),
            ln_mlp=take(p + "post_attention_layernorm.weight"),
            gate_up_w=torch.cat([gate, up], dim=0).contiguous(),
            gate_up_b=cat_opt([take(p + "mlp.gate_proj.bias", False), take(p + "mlp.up_proj.bias", False)]),
            down_w=take(p + "mlp.down_proj.weight"),
            down_b=take(p + "mlp.down_proj.bias", False),
        ))
    score_w = take("score.weight", required=False, as_dtype=torch.float32)
    if score_w is None:
        raise UnsupportedModelError(
            f"{folder}: no 'score.weight'; a value model is a LlamaForSequenceClassification "
            "(make one with value_models.make_value_model)"
        )
    if score_w.shape != (spec.num_labels, spec.hidden_size):
        raise UnsupportedModelError(
            f"{folder}: score head has shape {tuple(score_w.shape)}, expected "
            f"({spec.num_labels}, {spec.hidden_size}) (num_labels {spec.num_labels} in config.json)"
        )
    embed = take("embed_tokens.weight")
    if embed.shape != (spec.vocab_size, spec.hidden_size):
        raise UnsupportedModelError(
            f"{folder}: embed_tokens has shape {tuple(embed.shape)}, config says "
            f"({spec.vocab_size}, {spec.hidden_size})"
        )
    return ValueWeights(embed=embed, layers=layers, norm=take("norm.weight", as_dtype=torch.float32),
                        score_w=score_w, score_b=take("score.bias", False, torch.float32))
