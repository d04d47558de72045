"""The value-model runtime: an exact, cached Llama-family forward that scores VAS candidates.

Shape key used across this package:
    B rows in a step, K candidates per row, N new tokens per row, T max tokens per sequence,
    Tb longest cached prefix in a step, S cache slots, L layers, H query heads, Hkv KV heads,
    G = H // Hkv, D head dim, Hid hidden size, I MLP size, V vocabulary.
"""
from vas_vllm.runtime.kv_cache import SequenceTooLongError, SlotKVCache, SlotsExhaustedError
from vas_vllm.runtime.spec import LlamaSpec, UnsupportedModelError
from vas_vllm.runtime.value_runtime import ValueRuntime
from vas_vllm.runtime.weights import ValueWeights, load_value_weights

__all__ = [
    "LlamaSpec", "SequenceTooLongError", "SlotKVCache", "SlotsExhaustedError",
    "UnsupportedModelError", "ValueRuntime", "ValueWeights", "load_value_weights",
]
