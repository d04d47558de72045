"""validate_params for every adapter: refuse at admission (HTTP 400) what VAS could not serve.

vLLM calls a logits processor's `validate_params(sampling_params)` with no configuration. It
does so from its InputProcessor, which holds the engine's VllmConfig: this module finds it on
the call stack, reads `additional_config["vas"]`, and checks the request against it (model names,
heads and rules, lengths). Errors are KnobError (a ValueError): vLLM answers them with HTTP 400.

No request is admitted that the engine would later sample without VAS for a reason known now:
- when the engine's configuration cannot be found (another vLLM front end, a vLLM version that
  calls validate_params elsewhere), a VAS request is refused rather than sampled plainly;
- with `vas.max_len` below the engine's max_model_len, a request whose `max_tokens` is unset or
  cannot fit is refused (the prompt's length is not known here; a prompt that makes the
  request outgrow max_len is counted at run time, see README "No silent fallbacks").
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from vas_vllm.config import VASConfig, config_from_additional
from vas_vllm.knobs import KnobError, parse_knobs, wants_vas

if TYPE_CHECKING:
    from vllm import SamplingParams

_MAX_FRAMES = 32


def find_vllm_config() -> Any | None:
    """The VllmConfig of the engine whose front end is calling (a frame's `self.vllm_config`)."""
    frame = inspect.currentframe()
    try:
        for _ in range(_MAX_FRAMES):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            vllm_config = getattr(owner, "vllm_config", None)
            if type(vllm_config).__name__ == "VllmConfig" and \
                    getattr(vllm_config, "additional_config", None) is not None:
                return vllm_config
            frame = frame.f_back
        return None
    finally:
        del frame


_parsed: dict[int, tuple[Any, VASConfig]] = {}


def engine_config(vllm_config: Any) -> VASConfig:
    """`additional_config["vas"]` of a VllmConfig, parsed once per config object."""
    additional = vllm_config.additional_config
    hit = _parsed.get(id(additional))
    if hit is not None and hit[0] is additional:
        return hit[1]
    cfg = config_from_additional(additional)
    _parsed[id(additional)] = (additional, cfg)
    return cfg


@lru_cache(maxsize=64)
def metadata_for_path(path: str) -> Any:
    from value_models.compat import load_value_model_metadata

    return load_value_model_metadata(path)


def check_request(extra_args: Mapping[str, Any] | None, cfg: VASConfig, max_tokens: int | None = None,
                  max_model_len: int | None = None) -> None:
    """Every admission check against a known engine configuration; KnobError naming the knob."""
    parse_knobs(extra_args, cfg, lambda name: metadata_for_path(cfg.value_models[name]))
    limit = cfg.max_len
    if limit is not None and (max_model_len is None or limit < max_model_len):
        if max_tokens is None or max_tokens >= limit:
            raise KnobError(
                f"max_tokens={max_tokens} with VAS: this server's additional_config.vas.max_len is "
                f"{limit} tokens (prompt + output), below the engine's max_model_len; set "
                f"max_tokens below {limit} (and keep prompt + max_tokens within it)")


def validate_params(sampling_params: SamplingParams) -> None:
    """The adapters' validate_params: KnobError (HTTP 400) naming the knob, or nothing."""
    extra_args = sampling_params.extra_args
    if not wants_vas(extra_args):
        return
    if not isinstance(extra_args, Mapping):
        raise KnobError(f"extra_args must be a mapping, found {type(extra_args).__name__}")
    vllm_config = find_vllm_config()
    if vllm_config is None:
        parse_knobs(extra_args, None)  # what the request alone gets wrong, named first
        raise KnobError(
            "this request sets vas_* knobs, but VAS could not find the engine's configuration to "
            "check them (validate_params was not called from vLLM's InputProcessor): refusing it "
            "rather than sampling it without VAS; see README, 'No silent fallbacks'")
    max_model_len = getattr(getattr(vllm_config, "model_config", None), "max_model_len", None)
    check_request(extra_args, engine_config(vllm_config), sampling_params.max_tokens, max_model_len)
