"""Engine-wide VAS configuration: `additional_config["vas"]`, validated once at start-up.

vLLM hands a logits processor its class, not an instance, and builds it inside the worker from
`(vllm_config, ...)`. So everything engine-wide travels in `vllm_config.additional_config["vas"]`:

    LLM(model=GEN, logits_processors=["vas_vllm:VASProcessor"],
        additional_config={"vas": {"value_models": {"positive": "/path/or/hub-id"}}})
    vllm serve GEN --logits-processors vas_vllm:VASProcessor \
        --additional-config '{"vas": {"value_models": {"positive": "/path"}}}'

Field descriptions live here; README's table lists every field (a test checks it).
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_KEY = "vas"
# vLLM releases whose logits-processor interfaces the adapters are written and tested against
# (setup.py pins the same range).
SUPPORTED_VLLM = ">=0.32,<0.34"
# Candidates scored per row at most; sizes the value model's pending-candidate buffers.
DEFAULT_MAX_TOP_K = 64


class VASConfigError(ValueError):
    """additional_config["vas"] is missing or invalid."""


class VASConfig(BaseModel):
    """The `vas` section of vLLM's `additional_config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value_models: dict[str, str] = Field(
        description="Value models by name: a local checkpoint folder or a Hugging Face hub id. "
        "Requests pick them with `vas_model`.")
    default_model: str | None = Field(
        default=None, description="Model used when a request sets no `vas_model` (default: "
        "the first of `value_models`).")
    default_beta: float | None = Field(
        default=None, ge=0.0, allow_inf_nan=False, description="beta when a request sets "
        "neither `vas_beta` nor `vas_bon_n` (default: the model's vas.json `default_beta`).")
    default_top_k: int | None = Field(
        default=None, ge=1, description="k when a request sets no `vas_top_k` (default: the "
        "model's vas.json `default_top_k`, capped at `max_top_k`).")
    max_top_k: int = Field(
        default=DEFAULT_MAX_TOP_K, ge=1, le=4096,
        description="Largest `vas_top_k` a request may ask for.")
    max_concurrent: int | None = Field(
        default=None, ge=1, description="Value-model cache slots, i.e. VAS requests decoded at "
        "once (default: the engine's max_num_seqs, or fewer if they do not fit in "
        "`memory_fraction`; the start-up log says so). When the rows of one step need more, "
        "slots of requests absent from the step are evicted first; a VAS row that still finds "
        "none is sampled without VAS at that step (counted; see README).")
    memory_fraction: float = Field(
        default=0.25, gt=0.0, le=1.0, description="Share of the memory the value-model caches "
        "may take when `max_concurrent` is not set (CUDA: of the device's total; CPU: of what is "
        "available once vLLM's CPU KV cache is allocated); at least one slot, at most max_num_seqs.")
    max_len: int | None = Field(
        default=None, ge=2, description="Longest prompt + output a VAS request may reach "
        "(default: the engine's max_model_len).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Value-model weights and cache dtype; `auto` is the "
        "generator's dtype.")
    device: str = Field(
        default="auto", description="Device of the value models; `auto` is the generator's.")
    prefill_chunk: int = Field(
        default=256, ge=1, description="Most prompt tokens of one row per catch-up forward.")
    prefill_tokens: int = Field(
        default=2048, ge=1, description="Most (padded) tokens per value-model forward (catch-up "
        "and candidate scoring): bounds a step's activations.")

    @field_validator("value_models")
    @classmethod
    def _non_empty(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("value_models must name at least one value model")
        for name, path in v.items():
            if not name or not isinstance(path, str) or not path:
                raise ValueError(f"value_models[{name!r}] must be a non-empty path or hub id")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> VASConfig:
        if self.default_model is not None and self.default_model not in self.value_models:
            raise ValueError(
                f"default_model {self.default_model!r} is not in value_models "
                f"{sorted(self.value_models)}")
        if self.default_top_k is not None and self.default_top_k > self.max_top_k:
            raise ValueError(
                f"default_top_k {self.default_top_k} exceeds max_top_k {self.max_top_k}")
        if self.prefill_chunk > self.prefill_tokens:
            raise ValueError(
                f"prefill_chunk {self.prefill_chunk} exceeds prefill_tokens {self.prefill_tokens}")
        return self

    @property
    def model_names(self) -> list[str]:
        return list(self.value_models)

    @property
    def default_model_name(self) -> str:
        return self.default_model or next(iter(self.value_models))


def config_from_additional(additional_config: Any) -> VASConfig:
    """Parse `vllm_config.additional_config` (a dict, or a JSON string of one)."""
    raw = additional_config
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise VASConfigError(f"additional_config is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or CONFIG_KEY not in raw:
        raise VASConfigError(
            f'VASProcessor needs additional_config={{"{CONFIG_KEY}": {{"value_models": '
            f'{{"name": "path-or-hub-id"}}}}}}; found additional_config={additional_config!r}')
    section = raw[CONFIG_KEY]
    if isinstance(section, VASConfig):
        return section
    try:
        return VASConfig.model_validate(section)
    except ValidationError as e:
        raise VASConfigError(f'invalid additional_config["{CONFIG_KEY}"]:\n{e}') from e


def vas_engine_kwargs(
    value_models: dict[str, str], *, v2: bool | None = None, **options: Any,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (or AsyncEngineArgs) that turn the VAS plugin on.

        LLM(model=GEN, **vas_engine_kwargs(value_models={"positive": PATH}, default_beta=2.0))

    `options` are the other VASConfig fields; they are validated here, so a typo fails before
    any engine starts. `v2` picks the adapter: None (default) names `vas_vllm:VASProcessor`,
    which both of vLLM's loaders accept and which builds the adapter of the model runner vLLM
    actually runs (vas_vllm/processor.py); True / False force Model Runner V2's / V1's adapter
    (vLLM refuses the one that does not match its runner at start-up).
    """
    cfg = VASConfig(value_models=value_models, **options)
    processor = {None: "vas_vllm.processor:VASProcessor", True: "vas_vllm.processor_v2:VASProcessorV2",
                 False: "vas_vllm.processor_v1:VASProcessorV1"}[v2]
    return {
        "logits_processors": [processor],
        "worker_extension_cls": "vas_vllm.introspect.VASWorkerExtension",
        "additional_config": {CONFIG_KEY: cfg.model_dump(exclude_defaults=True)},
    }
