"""Correctness checks of benchmarks/gpu_scale.py, run on the benchmark's own device and dtype
before it times anything: the value runtime (chunked catch-up, commit-on-accept steps) and the
generator's decode step, each against an uncached forward of the same weights."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.gpu_models import GeneratorWeights, decode_step
from vas_vllm.runtime import LlamaSpec, ValueRuntime, ValueWeights
from vas_vllm.runtime.forward import run_layers


def _causal(batch: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.ones((n, n), dtype=torch.bool, device=device).tril().expand(batch, 1, n, n)  # [B, 1, N, N]


def uncached_forward(spec: LlamaSpec, weights: ValueWeights, tokens: torch.Tensor,
                     sink: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """run_layers over whole sequences tokens [B, N] with no cache -> head outputs [B, N(, V)]."""
    B, N = tokens.shape
    dev = tokens.device
    positions = torch.arange(N, device=dev).expand(B, N)                       # [B, N]
    return run_layers(spec, weights, spec.inv_freq().to(dev), tokens, positions, _causal(B, N, dev),
                      None, sink or (lambda *_: None))


def check_value_runtime(spec: LlamaSpec, weights: ValueWeights, *, k: int, device: torch.device,
                        dtype: torch.dtype, lengths: tuple[int, ...] = (5, 11, 2), steps: int = 3,
                        seed: int = 0) -> dict[str, Any]:
    """Runtime values (chunked catch-up, then commit-on-accept steps) vs an uncached forward."""
    rt = ValueRuntime(spec, weights, max_slots=len(lengths), max_len=max(lengths) + steps + 1,
                      max_candidates=k, device=device, dtype=dtype, prefill_chunk=4, prefill_tokens=8)
    gen = torch.Generator().manual_seed(seed)
    hists = [torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    slots = [rt.allocate() for _ in lengths]
    err = scale = 0.0
    for _ in range(steps):
        cands = torch.randint(0, spec.vocab_size, (len(lengths), k), generator=gen)  # [B, K]
        values = rt.score(slots, hists, cands.to(device)).cpu()                     # [B, K]
        for b, hist in enumerate(hists):
            seqs = torch.tensor([hist + [a] for a in cands[b].tolist()], device=device)  # [K, n + 1]
            ref = uncached_forward(spec, weights, seqs)[:, -1, 0].cpu()                  # [K]
            err, scale = max(err, (values[b] - ref).abs().max().item()), max(scale, ref.abs().max().item())
            hist.append(cands[b, int(torch.randint(0, k, (1,), generator=gen))].item())
    expected = len(lengths) * (steps - 1)
    if rt.stats["commits"] != expected:
        raise RuntimeError(f"correctness check: expected {expected} commits, runtime stats say {rt.stats}")
    return {"what": "value runtime vs uncached run_layers", "layers": spec.num_layers, "hidden": spec.hidden_size,
            "dtype": str(dtype).removeprefix("torch."), "max_abs_err": err, "max_abs_value": scale}


def check_decode_step(spec: LlamaSpec, w: GeneratorWeights, *, device: torch.device, dtype: torch.dtype,
                      batch: int = 2, prefix: int = 7, seed: int = 0) -> dict[str, Any]:
    """decode_step over a cache prefilled by an uncached forward vs the uncached forward's logits."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, spec.vocab_size, (batch, prefix + 1), device=device, generator=gen)  # [B, P + 1]
    # "score" = LM head; run_layers runs the final norm and head in fp32
    as_value = ValueWeights(w.embed, w.layers, w.norm.float(), score_w=w.lm_head.float(), score_b=None)
    ref = uncached_forward(spec, as_value, tokens)[:, -1]                      # [B, V]
    shape = (spec.num_layers, batch, spec.num_kv_heads, prefix + 1, spec.head_dim)
    k_cache, v_cache = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:          # k, v [B, P, Hkv, D]
        k_cache[layer, :, :, :prefix] = k.transpose(1, 2)
        v_cache[layer, :, :, :prefix] = v.transpose(1, 2)

    uncached_forward(spec, as_value, tokens[:, :prefix], sink)
    got = decode_step(spec, w, spec.inv_freq().to(device), tokens[:, prefix], prefix, k_cache, v_cache).float()
    return {"what": "generator decode_step vs uncached run_layers", "layers": spec.num_layers,
            "hidden": spec.hidden_size, "dtype": str(dtype).removeprefix("torch."),
            "max_abs_err": (got - ref).abs().max().item(), "max_abs_value": ref.abs().max().item()}
