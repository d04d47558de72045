"""`vas_vllm:VASProcessor` through vLLM's own loaders: one name that cannot pick the wrong runner.

vLLM's V1 loader (vllm.v1.sample.logits_processor) and Model Runner V2's loader
(vllm.v1.worker.gpu.sample.logits_processor.loader) each accept only subclasses of their own
interface and build them with their own arguments. The same FQCN must pass both, validate
requests in both front ends, and build the adapter of the runner whose loader called.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

FQCN = "vas_vllm:VASProcessor"


class VllmConfig(SimpleNamespace):
    """Named like vLLM's class: admission finds it as `self.vllm_config` on the call stack."""


class _InputProcessor:
    """Plays vLLM's front end, which holds the engine's config and runs the validator."""

    def __init__(self, vllm_config) -> None:
        self.vllm_config = vllm_config

    def validate(self, validator, params) -> None:
        validator(params)


def _config(gen, values) -> VllmConfig:
    return VllmConfig(
        additional_config={"vas": {"value_models": {k: str(v) for k, v in values.items()}}},
        speculative_config=None, cache_config=SimpleNamespace(kv_cache_memory_bytes=None),
        model_config=SimpleNamespace(tokenizer=str(gen), tokenizer_revision=None, trust_remote_code=False,
                                     get_vocab_size=lambda: 49152, max_model_len=64),
        scheduler_config=SimpleNamespace(max_num_seqs=3))


def test_both_loaders_accept_the_one_name_and_validate_with_it(vas_models):
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    gen, values = vas_models
    front = _InputProcessor(_config(gen, {"a": values["a"]}))
    v2_validate = build_custom_logits_processors_params_validator([FQCN])  # raised before: not a V2 class
    for validate in (v2_validate, lambda p: validate_logits_processors_parameters([FQCN], p)):
        front.validate(validate, SamplingParams())  # no VAS knob
        front.validate(validate, SamplingParams(extra_args={"vas_beta": 1.0, "vas_model": "a"}))
        with pytest.raises(VLLMValidationError, match="vas_top_k must be an integer"):
            front.validate(validate, SamplingParams(extra_args={"vas_top_k": "5"}))
        with pytest.raises(VLLMValidationError, match=r"vas_model \['b'\] not loaded"):
            front.validate(validate, SamplingParams(extra_args={"vas_model": "b"}))


def test_each_runner_builds_its_own_adapter(vas_models):
    from vllm.v1.sample.logits_processor import build_logitsprocs
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors

    from vas_vllm.processor_v1 import VASProcessorV1
    from vas_vllm.processor_v2 import VASProcessorV2

    gen, values = vas_models
    config = _config(gen, {"a": values["a"]})
    v1 = build_logitsprocs(config, torch.device("cpu"), False, False, [FQCN])
    (vas,) = [p for p in v1.non_argmax_invariant if hasattr(p, "core")]
    assert type(vas) is VASProcessorV1
    z = lambda *shape: SimpleNamespace(gpu=torch.zeros(shape, dtype=torch.int32))  # noqa: E731
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=3, vocab_size=49152,
                                 all_token_ids=z(3, 64), prompt_len=z(3), prefill_len=z(3), total_len=z(3))
    (built,) = build_custom_logits_processors(config, req_states, False, [FQCN])
    assert type(built) is VASProcessorV2
    assert built.add_request(0, SamplingParams(extra_args={"vas_beta": 1.0})) is True
