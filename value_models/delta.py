"""A trained value model as a small delta over its initialisation: LoRA factors + the score head.

    lora_delta.safetensors
        <module>.lora_A.weight   [r, in]    for every adapted Linear, e.g. <module> =
                                            model.layers.0.self_attn.q_proj
        <module>.lora_B.weight   [out, r]
        score.weight             [1, D]     the whole head (it starts at zero)
        metadata: format, lora_r, lora_alpha, num_layers

Merging is `W <- W + (B @ A) * (alpha / r)` in float32, the same expression peft uses. Training
saves its merged model through `apply_delta` too, so a model rebuilt from the delta and the
same initialisation is bitwise the model training saved.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DELTA_FILENAME = "lora_delta.safetensors"
DELTA_FORMAT = "1"


def lora_delta(peft_model: Any, adapter: str = "default") -> dict[str, torch.Tensor]:
    """LoRA factors of every adapted module of a peft model, plus its score head (fp32 copies)."""
    base = peft_model.get_base_model()
    delta: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and adapter in lora_a:
            delta[f"{name}.lora_A.weight"] = lora_a[adapter].weight.detach().float().clone()
            delta[f"{name}.lora_B.weight"] = module.lora_B[adapter].weight.detach().float().clone()
    if not delta:
        raise ValueError(f"the model has no LoRA adapter named {adapter!r}")
    delta["score.weight"] = base.score.weight.detach().float().clone()
    return delta


def save_delta(path: str | Path, delta: dict[str, torch.Tensor], *, lora_r: int,
               lora_alpha: float, num_layers: int) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.contiguous() for k, v in delta.items()}, path, metadata={
        "format": DELTA_FORMAT, "lora_r": str(lora_r), "lora_alpha": repr(float(lora_alpha)),
        "num_layers": str(num_layers)})
    return path


def load_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, {"lora_r": int, "lora_alpha": float, "num_layers": int})."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("format") != DELTA_FORMAT:
        raise ValueError(f"{path}: expected delta format {DELTA_FORMAT}, found {meta.get('format')!r}")
    info = {"lora_r": int(meta["lora_r"]), "lora_alpha": float(meta["lora_alpha"]),
            "num_layers": int(meta["num_layers"])}
    return tensors, info


def apply_delta(model: Any, delta: dict[str, torch.Tensor], *, lora_r: int,
                lora_alpha: float) -> None:
    """Merge a delta into a float32 LlamaForSequenceClassification in place."""
    import torch

    params = dict(model.named_parameters())
    scaling = lora_alpha / lora_r
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in delta if ".lora_" in k})
    with torch.no_grad():
        for name in modules:
            weight = params.get(f"{name}.weight")
            if weight is None:
                raise KeyError(f"delta adapts {name}, which the model lacks")
            if weight.dtype != torch.float32:
                raise TypeError(f"merge into float32 weights, found {weight.dtype} at {name}")
            a, b = delta[f"{name}.lora_A.weight"], delta[f"{name}.lora_B.weight"]  # [r, in], [out, r]
            if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                raise ValueError(f"{name}: delta is {b.shape[0]}x{a.shape[1]}, weight "
                                 f"{tuple(weight.shape)}")
            weight += (b @ a) * scaling                                    # [out, in]
        head = params["score.weight"]
        if delta["score.weight"].shape != head.shape:
            raise ValueError(f"score.weight: expected {tuple(head.shape)}, found "
                             f"{tuple(delta['score.weight'].shape)}")
        head.copy_(delta["score.weight"])
