"""VASProcessor: the one class to name, whichever model runner vLLM picks.

    vllm serve GEN --logits-processors vas_vllm:VASProcessor --additional-config '{"vas": ...}'
    LLM(model=GEN, logits_processors=["vas_vllm:VASProcessor"], additional_config={"vas": ...})

vLLM 0.32/0.33 has two logits-processor interfaces, and which one an engine uses depends on
vLLM's own choice of model runner (Model Runner V2 on CUDA when Triton works and no feature
needs V1, or when watermarking / HiSparse force it; V1 on CPU or with VLLM_USE_V2_MODEL_RUNNER=0).
Each runner's loader accepts only subclasses of its own interface. This class subclasses both, so
both loaders accept it, and building it builds the adapter for the runner that calls: V1's
loader calls `cls(vllm_config, device, is_pin_memory)`, Model Runner V2's
`cls(vllm_config, req_states)`. Nothing is guessed, so it cannot pick wrong.

Import-light: vLLM imports it in the API-server process to run validate_params.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState

from vas_vllm.admission import validate_params

if TYPE_CHECKING:
    from vllm import SamplingParams


class VASProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Value Augmented Sampling for either vLLM model runner (builds VASProcessorV1 or V2)."""

    def __new__(cls, vllm_config: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        req_states = kwargs.get("req_states", args[0] if len(args) == 1 else None)
        if isinstance(req_states, LogitsProcRequestState):  # Model Runner V2's loader
            from vas_vllm.processor_v2 import VASProcessorV2

            return VASProcessorV2(vllm_config, req_states)
        from vas_vllm.processor_v1 import VASProcessorV1

        return VASProcessorV1(vllm_config, *args, **kwargs)  # (device, is_pin_memory)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_params(sampling_params)

    # Never instantiated (__new__ returns an adapter): these only satisfy the two ABCs.
    def apply(self, logits, *args):  # pragma: no cover
        raise NotImplementedError

    def is_argmax_invariant(self) -> bool:  # pragma: no cover
        return False

    def update_state(self, batch_update) -> None:  # pragma: no cover
        raise NotImplementedError
