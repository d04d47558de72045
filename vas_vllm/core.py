"""The shared core of both vLLM adapters: load value models, keep per-request slots, re-weight.

For the rows of one step that use VAS (row b: history s_b, knobs beta_b, k_b, models M_b with
weights w_bm):
    C_b     = top-k_b tokens of the generator's logits l_b          (one torch.topk for all rows)
    Q_bm    = V_m(s_b ∘ a) for a in C_b                              (one forward per model)
    l_b[a] += sum_m beta_b * w_bm * (Q_bm[a] - mean_{C_b} Q_bm)      for a in C_b
Tokens outside C_b keep their logits (or get -inf with vas_mask_outside_top_k). vLLM applies
temperature afterwards, so the effective strength is beta / T.

The adapters only translate vLLM's batch layout into (row, request, history) triples.

Shape key: B VAS rows in the step, K = max k over them, V vocabulary, R all logits rows.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vas_vllm.config import VASConfig
from vas_vllm.memory import ValueModelMemoryError, plan_memory  # noqa: F401 (callers catch it here)
from vas_vllm.knobs import KnobError, RequestKnobs, parse_knobs
from vas_vllm.runtime import LlamaSpec, SlotsExhaustedError, ValueRuntime
from vas_vllm.runtime.attention import DEFAULT_BUDGET
from vas_vllm.runtime.weights import load_value_weights

logger = logging.getLogger("vllm.vas_vllm")  # a child of vLLM's logger: same handlers and format


# A request absent from this many VAS steps in a row gives its slots back (it finished, or its
# cache is rebuilt exactly if it returns); absent ones are evicted sooner when slots run short.
IDLE_STEPS = 64


@dataclass
class VASRequest:
    """Per-request state: resolved knobs and one cache slot per value model (once allocated)."""

    knobs: RequestKnobs
    slots: dict[str, int] = field(default_factory=dict)
    warned: bool = False
    last_step: int = -1   # the core step that last saw this request in a batch (for eviction)


class History(Sequence[int]):
    """prompt ++ output without copying (vLLM's V1 output list is live and grows in place)."""

    __slots__ = ("prompt", "output")

    def __init__(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        self.prompt, self.output = prompt, output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def __getitem__(self, i):  # type: ignore[override]
        n = len(self.prompt)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            head = list(self.prompt[start:min(stop, n)]) if start < n else []
            return head + list(self.output[max(start - n, 0):max(stop - n, 0)])
        if i < 0:
            i += len(self)
        return self.prompt[i] if i < n else self.output[i - n]


def _resolve_device(name: str, fallback: torch.device) -> torch.device:
    return fallback if name == "auto" else torch.device(name)


def _resolve_dtype(name: str, generator_dtype: torch.dtype | None) -> torch.dtype:
    if name == "auto":
        if generator_dtype in (torch.float32, torch.bfloat16, torch.float16):
            return generator_dtype
        return torch.float32
    return getattr(torch, name)


def _memory(device: torch.device) -> tuple[int | None, int | None]:
    """(free, total) bytes of the device (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    try:
        import psutil

        return psutil.virtual_memory().available, psutil.virtual_memory().total
    except ImportError:
        return None, None


def _check_vllm_version() -> None:
    """Warn on a vLLM outside the tested range: its logits-processor interfaces may differ."""
    import vllm
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from vas_vllm.config import SUPPORTED_VLLM

    version = Version(vllm.__version__)
    if Version(version.base_version) not in SpecifierSet(SUPPORTED_VLLM):
        logger.warning("VAS: vLLM %s is outside the tested range %s; its logits-processor "
                       "interfaces may differ from what VAS expects", vllm.__version__, SUPPORTED_VLLM)


def _kv_cache_still_to_allocate(vllm_config: Any, device: torch.device) -> int:
    """Bytes vLLM's CPU worker allocates for its KV cache after the logits processors are built
    (on GPU the KV cache is sized after them, from what they left free: nothing to reserve)."""
    if device.type != "cpu":
        return 0
    explicit = getattr(vllm_config.cache_config, "kv_cache_memory_bytes", None)
    return int(explicit or 0)


class VASCore:
    """Value models of one engine, and the step that re-weights the logits of VAS rows."""

    def __init__(
        self, cfg: VASConfig, *, device: torch.device, generator_vocab_size: int,
        generator_tokenizer: Any, max_num_seqs: int, max_model_len: int,
        generator_dtype: torch.dtype | None = None, reserved_bytes: int = 0,
    ) -> None:
        from value_models.checkpoint import resolve_model_path
        from value_models.compat import check_compatible

        self.cfg = cfg
        self.logits_device = device
        self.device = _resolve_device(cfg.device, device)
        self.dtype = _resolve_dtype(cfg.dtype, generator_dtype)
        self.max_len = min(cfg.max_len or max_model_len, max_model_len)
        self.runtimes: dict[str, ValueRuntime] = {}
        self.metadata: dict[str, Any] = {}
        paths, specs = {}, {}
        for name, where in cfg.value_models.items():
            paths[name] = resolve_model_path(where)
            self.metadata[name] = check_compatible(
                paths[name], generator_tokenizer, generator_vocab_size=generator_vocab_size)
            specs[name] = LlamaSpec.from_pretrained(paths[name])
        free, total = _memory(self.device)
        plan = plan_memory(
            specs, self.dtype, self.device, max_concurrent=cfg.max_concurrent, max_num_seqs=max_num_seqs,
            max_len=self.max_len, max_top_k=cfg.max_top_k, memory_fraction=cfg.memory_fraction,
            tokens=max(cfg.prefill_tokens, cfg.max_top_k), attn_budget=DEFAULT_BUDGET, free=free,
            total=total, reserved=reserved_bytes)
        self.max_slots = plan.slots
        if self.max_slots < max_num_seqs:
            logger.warning(
                "VAS: %d value-model cache slots (%s) for max_num_seqs=%d: beyond %d VAS requests "
                "in one step, extra rows are sampled without VAS (fallback_no_slot in vas_stats); "
                "set additional_config.vas.max_concurrent, max_len or memory_fraction to change it",
                self.max_slots, "max_concurrent" if cfg.max_concurrent else "sized from memory",
                max_num_seqs, self.max_slots)
        for name, where in cfg.value_models.items():
            spec = specs[name]
            weights = load_value_weights(paths[name], spec, dtype=self.dtype, device=self.device)
            self.runtimes[name] = ValueRuntime(
                spec, weights, max_slots=self.max_slots, max_len=self.max_len,
                max_candidates=cfg.max_top_k, device=self.device, dtype=self.dtype,
                prefill_chunk=cfg.prefill_chunk, prefill_tokens=cfg.prefill_tokens,
            )
            logger.info(
                "VAS: value model %r from %s: %d layers, %.1f MiB with its cache and step working "
                "set (%d slots x %d tokens, %s on %s)", name, where, spec.num_layers,
                plan.need(name) / 2**20, self.max_slots, self.max_len, self.dtype, self.device)
        # vLLM never profiles what a step allocates (it runs in the sampler): on CUDA, hold that
        # much now, while vLLM measures what is left for its KV cache, and give it back to
        # torch's caching allocator at the first step, where the step's tensors reuse it.
        self._step_reserve = (torch.empty(sum(plan.step.values()), dtype=torch.uint8, device=self.device)
                              if self.device.type == "cuda" else None)
        self.counters = {"steps": 0, "rows_scored": 0, "fallback_rows": 0, "resumed": 0, **{
            k: 0 for k in ("fallback_no_slot", "fallback_past_max_len", "evicted", "expired",
                           "invalid_requests", "resumed_cached", "prefill_rows_skipped")}}
        self._step = 0
        # requests that hold cache slots, by id: the adapters release finished requests, but a
        # request can also stop appearing (Model Runner V2 has no remove hook; V1 parks rows
        # that are only unscheduled): those are evicted when slots run short, or expire
        self._holders: dict[int, VASRequest] = {}

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, device: torch.device | str) -> VASCore:
        """Validate additional_config["vas"], check every value model against the generator,
        and load them with their caches pre-allocated. Adapters call this in __init__, after
        vLLM's memory profiling, so vLLM counts it as non-KV memory."""
        from transformers import AutoTokenizer

        from vas_vllm.config import config_from_additional

        cfg = config_from_additional(vllm_config.additional_config)
        _check_vllm_version()
        if vllm_config.speculative_config is not None:
            raise ValueError("VAS does not support speculative decoding: turn one of them off")
        mc = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(
            mc.tokenizer, revision=mc.tokenizer_revision, trust_remote_code=mc.trust_remote_code)
        return cls(
            cfg, device=torch.device(device), generator_vocab_size=mc.get_vocab_size(),
            generator_tokenizer=tokenizer, max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
            max_model_len=mc.max_model_len, generator_dtype=getattr(mc, "dtype", None),
            reserved_bytes=_kv_cache_still_to_allocate(vllm_config, torch.device(device)),
        )

    # ---- requests ------------------------------------------------------------------------
    def request(self, extra_args: Any) -> VASRequest | None:
        """State for a new request, or None if it does not use VAS (or its knobs are invalid:
        validate_params refuses those at admission, so this only logs)."""
        try:
            knobs = parse_knobs(extra_args, self.cfg, self.metadata.__getitem__)
        except KnobError as e:
            logger.error("VAS: ignoring a request's invalid knobs (validate_params did not run?): %s", e)
            return None
        return None if knobs is None else VASRequest(knobs)

    def release(self, req: VASRequest) -> None:
        for name, slot in req.slots.items():
            self.runtimes[name].release(slot)
        req.slots.clear()
        self._holders.pop(id(req), None)

    def log_idle(self) -> None:
        """The documented line a server operator (and the load test) reads after a burst."""
        logger.info("VAS idle: slots_in_use=%s counters=%s", self.slots_in_use(), self.counters)

    def slots_in_use(self) -> dict[str, int]:
        return {name: rt.cache.num_slots - rt.num_free_slots for name, rt in self.runtimes.items()}

    def _admit(self, reqs: Sequence[VASRequest], histories: Sequence[Sequence[int]]) -> list[int]:
        """Indices of the rows that get VAS at this step: their slots are allocated, evicting
        the slots of requests absent from this step if need be."""
        self._step += 1
        batch = {id(r) for r in reqs}
        for r in reqs:
            r.last_step = self._step
        for r in [r for r in self._holders.values()
                  if id(r) not in batch and r.last_step < self._step - IDLE_STEPS]:
            self.release(r)  # absent for IDLE_STEPS steps: finished (or rebuilt if it returns)
            self.counters["expired"] += 1
        return [i for i, (req, hist) in enumerate(zip(reqs, histories)) if self._ready(req, hist, batch)]

    def _allocate(self, name: str, batch: set[int]) -> int | None:
        """A slot of model `name`; when none is free, take the one of the request absent from
        this step's batch for longest (its cache is rebuilt, exactly, if it comes back)."""
        runtime = self.runtimes[name]
        while True:
            try:
                return runtime.allocate()
            except SlotsExhaustedError:
                idle = [r for r in self._holders.values() if id(r) not in batch and name in r.slots]
                if not idle:
                    return None
                self.release(min(idle, key=lambda r: r.last_step))
                self.counters["evicted"] += 1

    def _ready(self, req: VASRequest, history: Sequence[int], batch: set[int]) -> bool:
        """Allocate the request's slots; False (counted, and a warning once per request) if it
        must be sampled without VAS at this step."""
        n = len(history)
        if n == 0 or history[n - 1] < 0:
            reason = "its token history is empty or ends in a -1 placeholder"
        elif n >= self.max_len:
            reason = f"it is {n} tokens long, beyond additional_config.vas.max_len={self.max_len}"
            self.counters["fallback_past_max_len"] += 1
        else:
            for name in req.knobs.models:
                if name not in req.slots:
                    slot = self._allocate(name, batch)
                    if slot is None:
                        break
                    req.slots[name] = slot
                    self._holders[id(req)] = req
            else:
                return True
            self.release(req)
            reason = (f"all {self.runtimes[name].cache.num_slots} cache slots of value model {name!r} "
                      "are held by other rows of this step; raise additional_config.vas.max_concurrent "
                      "or lower the number of concurrent VAS requests")
            self.counters["fallback_no_slot"] += 1
        self.counters["fallback_rows"] += 1
        if not req.warned:
            req.warned = True
            logger.warning("VAS: a request is sampled without VAS at this step because %s", reason)
        return False

    # ---- the step ------------------------------------------------------------------------
    def apply(
        self, logits: torch.Tensor, rows: Sequence[int], reqs: Sequence[VASRequest],
        histories: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Re-weight logits[rows] in place (logits: [R, V] float32)."""
        self._step_reserve = None  # the step's working set, held since start-up, is now its to use
        keep = self._admit(reqs, histories)
        if not keep:
            return logits
        rows = [rows[i] for i in keep]
        reqs = [reqs[i] for i in keep]
        histories = [histories[i] for i in keep]
        self.counters["steps"] += 1
        self.counters["rows_scored"] += len(rows)
        dev = logits.device
        ks = [r.knobs.top_k for r in reqs]
        K = max(ks)
        rows_t = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)     # [B]
        ks_t = torch.tensor(ks, dtype=torch.long).to(dev, non_blocking=True)         # [B]
        top = logits[rows_t].topk(K, dim=-1)
        cand = top.indices                                                           # [B, K]
        # Candidates beyond a row's k, or already masked to -inf by an earlier stage (bad
        # words, allowed ids, grammar), take no part: centring is over the row's live top-k.
        valid = (torch.arange(K, device=dev)[None, :] < ks_t[:, None]) & top.values.isfinite()  # [B, K]
        count = valid.sum(-1, keepdim=True).clamp(min=1)                             # [B, 1]
        delta = torch.zeros(cand.shape, dtype=torch.float32, device=dev)             # [B, K]
        for name, runtime in self.runtimes.items():
            members = [i for i, r in enumerate(reqs) if name in r.knobs.models]
            if not members:
                continue
            m_t = torch.tensor(members, dtype=torch.long).to(dev, non_blocking=True)  # [Bm]
            strength = torch.tensor(
                [reqs[i].knobs.strengths[reqs[i].knobs.models.index(name)] for i in members],
                dtype=torch.float32).to(dev, non_blocking=True)                       # [Bm]
            q = runtime.score(
                [reqs[i].slots[name] for i in members], [histories[i] for i in members],
                cand[m_t].to(self.device)).to(dev)                                    # [Bm, K]
            v = valid[m_t]
            mean = torch.where(v, q, 0.0).sum(-1, keepdim=True) / count[m_t]          # [Bm, 1]
            delta.index_add_(0, m_t, strength[:, None] * (q - mean))
        delta = torch.where(valid, delta, 0.0)
        rows_bk = rows_t[:, None].expand_as(cand)                                    # [B, K]
        logits.index_put_((rows_bk, cand), delta, accumulate=True)
        masked = [i for i, r in enumerate(reqs) if r.knobs.mask_outside_top_k]
        if masked:
            self._mask_outside(logits, rows_t, cand, valid, masked)
        return logits

    @staticmethod
    def _mask_outside(logits, rows_t, cand, valid, masked: list[int]) -> None:
        m_t = torch.tensor(masked, dtype=torch.long).to(logits.device, non_blocking=True)
        r_t, c_t = rows_t[m_t], cand[m_t]                                            # [Bm], [Bm, K]
        kept = torch.where(valid[m_t], logits[r_t[:, None], c_t], float("-inf"))     # [Bm, K]
        logits[r_t] = torch.full_like(logits[r_t], float("-inf")).scatter_(1, c_t, kept)
