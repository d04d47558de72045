"""The shared core of both vLLM adapters: load value models, keep per-request slots, re-weight.

For the rows of one step that use VAS (row b: history s_b, knobs k_b, models M_b):
    C_b     = top-k_b tokens of the generator's logits l_b          (one torch.topk for all rows)
    out_bm  = V_m(s_b ∘ a) for a in C_b                              (one forward per model)
    l_b[a] += delta_b[a] - rest_b                                    for a in C_b
with delta and rest from vas_vllm/reweight.py: the paper's mean rule (rest 0: tokens outside C_b
keep their logits; vLLM applies temperature afterwards, so its effective strength is beta / T),
or an exact tilt (tilts.py). vas_mask_outside_top_k sets every token outside C_b to -inf.

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
from vas_vllm import tilts
from vas_vllm.memory import ValueModelMemoryError, plan_memory  # noqa: F401 (callers catch it here)
from vas_vllm.knobs import KnobError, RequestKnobs, parse_knobs
from vas_vllm.reweight import ModelScores, combine
from vas_vllm.runtime import LlamaSpec, SlotsExhaustedError, ValueRuntime
from vas_vllm.runtime.attention import DEFAULT_BUDGET
from vas_vllm.runtime.weights import load_value_weights

logger = logging.getLogger("vllm.vas_vllm")  # a child of vLLM's logger: same handlers and format


# A request absent from this many VAS steps in a row gives its slots back (it finished, or its
# cache is rebuilt exactly if it returns); absent ones are evicted sooner when slots run short.
IDLE_STEPS = 64


# vLLM samples greedily below this temperature (vllm.sampling_params._SAMPLING_EPS)
GREEDY_EPS = 1e-5


@dataclass
class VASRequest:
    """Per-request state: resolved knobs and one cache slot per value model (once allocated)."""

    knobs: RequestKnobs
    scale: float = 1.0   # T: exact shifts are added as T * log-ratio (1 for greedy requests)
    slots: dict[str, int] = field(default_factory=dict)
    warned: bool = False
    last_step: int = -1   # the core step that last saw this request in a batch (for eviction)
    # per model, Best-of-N log weights [O] from the distribution at the prompt (set at catch-up)
    bon_log_w: dict[str, torch.Tensor] = field(default_factory=dict)


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
                "VAS: value model %r from %s: %d layers, %.1f MiB with its cache (%d slots x %d "
                "tokens, %s on %s); %.1f MiB for all value models with a step's working set",
                name, where, spec.num_layers, plan.need(name) / 2**20, self.max_slots, self.max_len,
                self.dtype, self.device, plan.total / 2**20)
        # vLLM never profiles what a step allocates (it runs in the sampler): on CUDA, hold that
        # much now, while vLLM measures what is left for its KV cache, and give it back to
        # torch's caching allocator at the first step, where the step's tensors reuse it.
        self._step_reserve = (torch.empty(plan.step, dtype=torch.uint8, device=self.device)
                              if self.device.type == "cuda" else None)
        self.bins = {name: (torch.tensor(meta.bins, dtype=torch.float32, device=self.device)
                            if getattr(meta, "distributional", False) else None)
                     for name, meta in self.metadata.items()}
        # residual models (V = r + U): the reward term, on each candidate's text (residual.py)
        self.residual: dict[str, Any] = {}
        for name, meta in self.metadata.items():
            if getattr(meta, "residual", False):
                from vas_vllm.residual import ResidualReward

                self.residual[name] = ResidualReward(name, meta, generator_tokenizer)
                logger.info("VAS: value model %r is residual: V = %s(text) + U", name, meta.reward)
        self.counters = {"steps": 0, "rows_scored": 0, "fallback_rows": 0, "resumed": 0, **{
            k: 0 for k in ("fallback_no_slot", "fallback_past_max_len", "evicted", "expired",
                           "invalid_requests", "resumed_cached", "prefill_rows_skipped")}}
        self._step = 0
        # requests that hold cache slots, by id: the adapters release finished requests, but a
        # request can also stop appearing (Model Runner V2 has no remove hook; V1 parks rows
        # that are only unscheduled): those are evicted when slots run short, or expire
        self._holders: dict[int, VASRequest] = {}
        # rows whose rest-of-vocabulary h was clamped (tilts.exact_shifts); a device counter,
        # read by stats() only, so the step never waits for it
        self._rest_clamps = torch.zeros((), dtype=torch.int64, device=self.device)

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
    def request(self, extra_args: Any, temperature: float = 1.0) -> VASRequest | None:
        """State for a new request, or None if it does not use VAS (or its knobs are invalid:
        validate_params refuses those at admission, so this only logs). `temperature` is the
        request's sampling temperature (exact rules scale their shift by it)."""
        try:
            knobs = parse_knobs(extra_args, self.cfg, self.metadata.__getitem__)
        except KnobError as e:
            logger.error("VAS: ignoring a request's invalid knobs (validate_params did not run?): %s", e)
            return None
        if knobs is None:
            return None
        return VASRequest(knobs, scale=temperature if temperature >= GREEDY_EPS else 1.0)

    def counter_values(self) -> dict[str, int]:
        """The counters, with the device-side rest clamp count read now (a host sync)."""
        return {**self.counters, "rest_clamps": int(self._rest_clamps)}

    def release(self, req: VASRequest) -> None:
        for name, slot in req.slots.items():
            self.runtimes[name].release(slot)
        req.slots.clear()
        self._holders.pop(id(req), None)

    def log_idle(self) -> None:
        """The documented line a server operator (and the load test) reads after a burst."""
        logger.info("VAS idle: slots_in_use=%s counters=%s", self.slots_in_use(), self.counter_values())

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
        histories: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Re-weight logits[rows] in place (logits: [R, V] float32). prompt_lens[i] (needed by
        vas_bon_n with a distributional model) is the prompt's length within histories[i]."""
        self._step_reserve = None  # the step's working set, held since start-up, is now its to use
        keep = self._admit(reqs, histories)
        if prompt_lens is not None:  # exact Best-of-N needs the prompt whole, for its CDF
            keep = [i for i in keep if self._has_prompt(reqs[i], len(histories[i]), prompt_lens[i])]
        if not keep:
            return logits
        rows = [rows[i] for i in keep]
        reqs = [reqs[i] for i in keep]
        histories = [histories[i] for i in keep]
        plens = [prompt_lens[i] for i in keep] if prompt_lens is not None else None
        self.counters["steps"] += 1
        self.counters["rows_scored"] += len(rows)
        dev = logits.device
        ks = [r.knobs.top_k for r in reqs]
        K = max(ks)
        rows_t = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)     # [B]
        ks_t = torch.tensor(ks, dtype=torch.long).to(dev, non_blocking=True)         # [B]
        row_logits = logits[rows_t]                                                  # [B, V]
        top = row_logits.topk(K, dim=-1)
        cand = top.indices                                                           # [B, K]
        # Candidates beyond a row's k, or already masked to -inf by an earlier stage (bad
        # words, allowed ids, grammar), take no part: centring is over the row's live top-k.
        valid = (torch.arange(K, device=dev)[None, :] < ks_t[:, None]) & top.values.isfinite()  # [B, K]
        cand_logpi = scale = None
        if any(r.knobs.any_exact for r in reqs):
            # log pi(a|s) at each row's temperature, in float64: the rest's mass is 1 - theirs
            scale = torch.tensor([r.scale for r in reqs], dtype=torch.float64).to(dev, non_blocking=True)
            lse = torch.logsumexp(row_logits.double() / scale[:, None], dim=-1)      # [B]
            cand_logpi = top.values.double() / scale[:, None] - lse[:, None]         # [B, K]
            scale = scale.float()
        scores = {name: self.score_model(name, reqs, histories, plens, cand)
                  for name in self.runtimes}
        delta, rest, clamps = combine([r.knobs for r in reqs], valid, scores, cand_logpi, scale)
        self._rest_clamps += clamps.to(self._rest_clamps.device)
        rows_bk = rows_t[:, None].expand_as(cand)                                    # [B, K]
        logits.index_put_((rows_bk, cand), torch.where(valid, delta - rest[:, None], 0.0),
                          accumulate=True)
        masked = [i for i, r in enumerate(reqs) if r.knobs.mask_outside_top_k]
        if masked:
            self._mask_outside(logits, rows_t, cand, valid, masked)
        return logits

    def _has_prompt(self, req: VASRequest, n: int, prompt_len: int) -> bool:
        """False while a row under exact Best-of-N has not got its whole prompt yet (a chunked
        prefill on Model Runner V2): its logits are discarded by vLLM then anyway."""
        return req.knobs.mode != "bon" or n >= prompt_len or all(
            m in req.bon_log_w for m, e in zip(req.knobs.models, req.knobs.exact) if e)

    def score_model(self, name: str, reqs: Sequence[VASRequest], histories: Sequence[Sequence[int]],
                    prompt_lens: Sequence[int] | None, cand: torch.Tensor) -> ModelScores:
        """Model `name`'s outputs for the rows that use it (one forward), and what its exact
        rows need: the outputs at each prefix and, for Best-of-N, the prompt's weights. Public:
        remote VAS (vas_vllm/remote) scores its candidates with it too."""
        members = [i for i, r in enumerate(reqs) if name in r.knobs.models]
        if not members:
            return ModelScores(members, cand.new_zeros((0,)))
        runtime = self.runtimes[name]
        slots = [reqs[i].slots[name] for i in members]
        bon = [i for i in members if reqs[i].knobs.mode == "bon" and name not in reqs[i].bon_log_w
               and reqs[i].knobs.exact[reqs[i].knobs.models.index(name)]]
        marks = None
        if bon:
            if prompt_lens is None:
                raise ValueError("vas_bon_n with a distributional model needs the prompt lengths")
            marks = [prompt_lens[i] - 1 if i in bon else None for i in members]
        out = runtime.score(slots, [histories[i] for i in members], cand[members].to(self.device),
                            marks).to(cand.device)                                  # [Bm, K(, O)]
        if name in self.residual:  # V = r + U: the reward of each candidate's text
            if prompt_lens is None:
                raise ValueError(f"residual value model {name!r} needs the prompt lengths")
            out = out + self.residual[name].offsets(
                [histories[i] for i in members], [prompt_lens[i] for i in members],
                cand[members].cpu()).to(out.device)                                # [Bm, K]
        bins = self.bins[name]
        sc = ModelScores(members, out, bins=None if bins is None else bins.to(cand.device))
        if sc.bins is None or not any(reqs[i].knobs.exact[reqs[i].knobs.models.index(name)]
                                      for i in members):
            return sc
        sc.prefix_out = runtime.prefix_outputs(slots).to(cand.device)              # [Bm, O]
        if bon:
            prompt_logp = tilts.bin_log_probs(runtime.marked_outputs([reqs[i].slots[name] for i in bon]))
            n = torch.tensor([float(reqs[i].knobs.bon_n) for i in bon], device=prompt_logp.device)
            for i, w in zip(bon, tilts.bon_log_weights(prompt_logp, n).to(cand.device)):
                reqs[i].bon_log_w[name] = w
        if any(reqs[i].knobs.mode == "bon" for i in members):
            zero = torch.zeros_like(sc.bins)
            sc.bon_log_w = torch.stack([reqs[i].bon_log_w.get(name, zero) for i in members])
        return sc

    @staticmethod
    def _mask_outside(logits, rows_t, cand, valid, masked: list[int]) -> None:
        m_t = torch.tensor(masked, dtype=torch.long).to(logits.device, non_blocking=True)
        r_t, c_t = rows_t[m_t], cand[m_t]                                            # [Bm], [Bm, K]
        kept = torch.where(valid[m_t], logits[r_t[:, None], c_t], float("-inf"))     # [Bm, K]
        logits[r_t] = torch.full_like(logits[r_t], float("-inf")).scatter_(1, c_t, kept)
