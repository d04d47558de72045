"""VASProcessorV2: the adapter for vLLM's Model Runner V2 (the CUDA default in vLLM 0.32/0.33).

    vllm serve GEN --logits-processors vas_vllm:VASProcessor ...   (builds this class on MRV2)

MRV2 keys requests by a recycled slot index: add_request(slot, params) is called whenever a
request enters the batch, including re-admission after preemption, so all per-slot state is
reset there (the old occupant's value-model slots are released). MRV2 has no remove hook: a
request that finished (or was preempted, or is not scheduled this step) is only visible as a
slot index absent from `ctx.idx_mapping_np`. Its value-model slots stay with it until slots run
short, when the core evicts the ones absent from the step longest, or until it has been absent
for core.IDLE_STEPS steps; if it comes back, its cache is rebuilt exactly by catch-up.

Token history lives on the device in req_states.all_token_ids[slot, :len]; this adapter keeps a
host mirror per slot and copies only the tokens it has not seen yet, in one gather per step (one
device-to-host sync, which the host-driven value-model cache needs anyway). Rows still in a
(chunked) prefill, whose samples vLLM discards, are neither scored nor synced. Row i of the
logits is batch position i: speculative decoding, which would give a request several rows, is
refused at start-up.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from vas_vllm.admission import validate_params
from vas_vllm.core import VASCore, VASRequest
from vas_vllm.knobs import wants_vas

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
        self.last_rows = 0                         # VAS rows re-weighted at the latest step

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_params(sampling_params)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        old = self.requests.pop(req_idx, None)
        if old is not None:
            self.core.release(old)
        self.tokens.pop(req_idx, None)
        req = self.core.request(sampling_params.extra_args, sampling_params.temperature)
        if req is None:
            if wants_vas(sampling_params.extra_args):
                self.core.counters["invalid_requests"] += 1  # logged by the core
            return False
        self.requests[req_idx] = req
        self.tokens[req_idx] = []
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.requests:
            return logits
        rows, slots, lengths = [], [], []
        prefill_len = self.req_states.prefill_len.np
        for i, slot in enumerate(ctx.idx_mapping_np.tolist()):
            if slot not in self.requests:
                continue
            n = int(ctx.seq_lens_upper_bound_np[i])
            if n < int(prefill_len[slot]):  # a partial prefill: vLLM discards this sample
                self.core.counters["prefill_rows_skipped"] += 1
                continue
            rows.append(i)
            slots.append(slot)
            lengths.append(n)
        self.last_rows = len(rows)
        if not rows:
            return logits
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
        """active_rows: VAS rows of the latest step; requests: VAS requests known to this
        processor (MRV2 never says when one finishes: finished ones stay until their request
        slot is reused); slots_in_use: value-model slots held."""
        return {"active_rows": self.last_rows, "requests": len(self.requests),
                "slots_in_use": self.core.slots_in_use(), **self.core.counter_values()}
