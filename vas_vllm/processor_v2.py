"""VASProcessorV2: the adapter for vLLM's Model Runner V2 (the CUDA default in vLLM 0.32).

    LLM(model=GEN, logits_processors=[VASProcessorV2], additional_config={"vas": {...}})

MRV2 keys requests by a recycled slot index: add_request(slot, params) is called whenever a
request enters the batch, including re-admission after preemption, so all per-slot state is
reset there (the old occupant's value-model slots are released). Token history lives on the
device in req_states.all_token_ids[slot, :len]; this adapter keeps a host mirror per slot and
copies only the tokens it has not seen yet, in one gather per step (one device-to-host sync,
which the host-driven value-model cache needs anyway). Row i of the logits is batch position i:
speculative decoding, which would give a request several rows, is refused at start-up.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from vas_vllm.core import VASCore, VASRequest
from vas_vllm.knobs import validate_request

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


class VASProcessorV2(LogitsProcessor):
    """Value Augmented Sampling for vLLM's Model Runner V2."""

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        self.req_states = req_states
        self.core = VASCore.from_vllm_config(vllm_config, req_states.device)
        self.requests: dict[int, VASRequest] = {}  # request slot -> VAS state
        self.tokens: dict[int, list[int]] = {}     # request slot -> host copy of its history

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_request(sampling_params.extra_args)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        old = self.requests.pop(req_idx, None)
        if old is not None:
            self.core.release(old)
        self.tokens.pop(req_idx, None)
        req = self.core.request(sampling_params.extra_args, sampling_params.temperature)
        if req is None:
            return False
        self.requests[req_idx] = req
        self.tokens[req_idx] = []
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.requests:
            return logits
        rows = [i for i, slot in enumerate(ctx.idx_mapping_np.tolist()) if slot in self.requests]
        if not rows:
            return logits
        slots = [int(ctx.idx_mapping_np[i]) for i in rows]
        lengths = [int(ctx.seq_lens_upper_bound_np[i]) for i in rows]
        self._fetch_new_tokens(slots, lengths)
        reqs = [self.requests[s] for s in slots]
        histories = [self.tokens[s] for s in slots]
        prompt_lens = [int(self.req_states.prompt_len.np[s]) for s in slots]
        return self.core.apply(logits, rows, reqs, histories, prompt_lens)

    def _fetch_new_tokens(self, slots: list[int], lengths: list[int]) -> None:
        """Extend each slot's host history to `length` tokens from all_token_ids (one gather)."""
        idx_slot: list[int] = []
        idx_pos: list[int] = []
        for slot, n in zip(slots, lengths):
            have = self.tokens[slot]
            if n < len(have):  # cannot happen without a new add_request; be safe, refetch
                have.clear()
            idx_slot.extend([slot] * (n - len(have)))
            idx_pos.extend(range(len(have), n))
        if not idx_slot:
            return
        ids = self.req_states.all_token_ids.gpu
        device = ids.device
        new = ids[torch.tensor(idx_slot, device=device), torch.tensor(idx_pos, device=device)].tolist()
        offset = 0
        for slot, n in zip(slots, lengths):
            have = self.tokens[slot]
            take = n - len(have)
            have.extend(new[offset:offset + take])
            offset += take

    # ---- introspection (documented in README) ---------------------------------------------
    def stats(self) -> dict:
        return {"active_rows": len(self.requests), "slots_in_use": self.core.slots_in_use(),
                **self.core.counter_values()}
