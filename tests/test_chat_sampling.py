"""Chat-formatted sampling (`vas-vllm sample --chat`) renders prompts exactly as a served
`/v1/chat/completions` request does: for the same conversation, the token history the VAS plugin
holds in the server equals the training sample's ids.

The sample is drawn by `generate_dataset` (an engine process of its own); the server is a real
`vllm serve` with a VASProcessor that records the history it scores at every step
(recording_processor.py). The value model's head is zero, so VAS leaves the logits unchanged
and a served request seeded like sample 0 draws the same tokens: the plugin's last history is
then the sample's prompt + response[:-1], i.e. exactly the value model's training input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from server_process import free_ports, launch, stop_all  # noqa: E402

from value_models.training.sampling import generate_dataset, load_samples, prompt_seed  # noqa: E402
from value_models.training.train_config import SampleConfig  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HERE = Path(__file__).resolve().parent
CONVERSATIONS = [
    [{"role": "user", "content": "Write one line about the sea."}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Bonjour !"},
     {"role": "user", "content": "How are you?"}],
]
MAX_TOKENS = 8


def test_served_chat_history_equals_the_training_sample(tiny_pair_vllm, tmp_path: Path) -> None:
    gen, value = tiny_pair_vllm
    record = tmp_path / "histories.jsonl"
    (port,) = free_ports(1)
    server = launch(
        "chat", gen, ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
                      "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(1 << 23), "--seed", "0",
                      "--distributed-executor-backend", "uni",
                      "--logits-processors", "recording_processor:RecordingVASProcessor",
                      "--additional-config", json.dumps({"vas": {"value_models": {"v": str(value)}}})],
        tmp_path / "server.log", port=port,
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VAS_RECORD_FILE": str(record),
             "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])})
    try:
        prompts = tmp_path / "chat.jsonl"
        prompts.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
        cfg = SampleConfig(out=str(tmp_path / "data"), prompts=str(prompts), generator=str(gen),
                           chat=True, num_samples=1, max_new_tokens=MAX_TOKENS, chunk_prompts=1,
                           dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 26, seed=5)
        meta, samples = load_samples(generate_dataset(cfg))  # while the server starts
        assert meta["sampling"]["chat"] is True
        server.wait_healthy()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        for i, (conv, sample) in enumerate(zip(CONVERSATIONS, samples)):
            assert sample["messages"] == conv and sample["prompt_id"] == i
            assert "<|im_start|>assistant" in sample["prompt"]  # the template, generation prompt
            r = client.chat.completions.create(
                model=str(gen), messages=conv, max_tokens=MAX_TOKENS, temperature=1.0, top_p=1.0,
                seed=prompt_seed(cfg.seed, i), extra_body={"top_k": -1, "vllm_xargs": {"vas_beta": 1.0}})
            rows = [json.loads(ln) for ln in record.read_text().splitlines()]
            record.unlink()
            assert len({row["row"] for row in rows}) == 1, "expected one VAS request"
            first, last = rows[0], rows[-1]
            assert first["prompt"] == sample["prompt_token_ids"], (conv, first["prompt"])
            assert first["output"] == []
            assert r.choices[0].message.content == sample["response"]
            assert last["prompt"] + last["output"] == (
                sample["prompt_token_ids"] + sample["response_token_ids"][:-1])
        client.close()
    finally:
        stop_all()
