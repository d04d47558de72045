"""Shared fixtures: a per-session cache, tiny generator/value pairs, the embedded SmolLM2.

Everything is built locally (no downloads). Layout of the caches:
- `vas_cache` (autouse, session): a fresh temp folder exported as $VAS_VLLM_CACHE, so nothing a
  test builds through `cache_dir()` leaks between runs.
- `user_cache`: the cache the user has outside the tests ($VAS_VLLM_CACHE or ~/.cache/vas-vllm,
  read before the override). Slow artefacts that are the same for every run (the SmolLM2
  tokenizer and model) are built there once and reused by later runs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from value_models.embedded import build_smollm2, build_tiny_pair, cache_dir, smollm2_tokenizer_dir

_USER_CACHE = cache_dir()  # evaluated at import, before vas_cache overrides the variable
DIST_BINS = [-1.0, -0.6, -0.3, -0.1, 0.0, 0.2, 0.5, 1.0]  # the "dist" test value model's reward bins
_REPO = Path(__file__).resolve().parents[1]
# Folders of committed data that no test may write into (results, shipped model artefacts).
_GUARDED = ("benchmarks", "value_models/artifacts")


def pytest_configure(config: pytest.Config) -> None:
    # VAS_TEST_THREADS=n: torch's intra-op threads for the whole run, to exercise other kernel
    # blockings and summation orders (the float tolerances are derived, so any n must pass;
    # OMP_NUM_THREADS alone is capped at the core count by torch)
    threads = os.environ.get("VAS_TEST_THREADS")
    if threads is None and os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest-xdist (`make test`: 2 workers on 2 cores) every process gets one OpenMP
        # thread, the engines and servers a test starts included (they inherit the variable):
        # with one thread per core each, OpenMP threads spin-wait on the cores the other
        # process holds (measured: two demo processes 95 s with 2 threads each, 69 s with 1)
        threads = "1"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    config.addinivalue_line(
        "markers", "slow: builds or runs a real model (~30-60 s on 2 cores); deselect with "
        "-m 'not slow'"
    )


@pytest.fixture(scope="session", autouse=True)
def vas_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache folder for this session, exported as $VAS_VLLM_CACHE."""
    path = tmp_path_factory.mktemp("vas-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("VAS_VLLM_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def user_cache() -> Path:
    return _USER_CACHE


@pytest.fixture(scope="session")
def smollm2_tokenizer(user_cache: Path) -> Path:
    """Saved HF folder of the SmolLM2 tokenizer (vocab 49152; pad == eos == 2)."""
    return smollm2_tokenizer_dir(user_cache)


@pytest.fixture(scope="session")
def tiny_pair(vas_cache: Path, smollm2_tokenizer: Path) -> tuple[Path, Path]:
    """(generator_dir, value_dir): a 2-layer random Llama (hidden 64, 4 heads / 2 KV heads,
    SmolLM2 tokenizer) and a value model from its first layer with a ZERO score head."""
    return build_tiny_pair(vas_cache / "tiny-pair", tokenizer_dir=smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_pair_random_head(vas_cache: Path, smollm2_tokenizer: Path) -> tuple[Path, Path]:
    """Like `tiny_pair` but the value head is random (std 1.0) and the generator's weights have
    std 0.5, so logits and Q values vary across tokens (useful to test re-weighting)."""
    return build_tiny_pair(
        vas_cache / "tiny-pair-random-head", tokenizer_dir=smollm2_tokenizer, seed=1,
        init_std=0.5, value_head_std=1.0,
    )


@pytest.fixture(scope="session")
def smollm2_dir(user_cache: Path) -> Path:
    """The real SmolLM2-135M-Instruct as an HF bf16 folder (built once per machine, ~30 s)."""
    return build_smollm2("bfloat16", user_cache)


@pytest.fixture(scope="session")
def tiny_pair_vllm(vas_cache: Path, smollm2_tokenizer: Path) -> tuple[Path, Path]:
    """Like `tiny_pair` but with head_dim 32 (2 heads / 1 KV head): vLLM's CPU attention rejects
    the head_dim 16 of `tiny_pair`. Weights std 0.5 so sampled text depends on the prompt."""
    return build_tiny_pair(
        vas_cache / "tiny-pair-vllm", tokenizer_dir=smollm2_tokenizer, seed=2, heads=2,
        kv_heads=1, init_std=0.5,
    )


@pytest.fixture(scope="session")
def vas_models(vas_cache: Path, smollm2_tokenizer: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny random generator vLLM's CPU attention accepts (head_dim 32) and value models for
    it with random heads: "a" (its first layer), "b" (2 layers), "bon" ("a" marked bon_log_cdf),
    "dist" (its first layer with a distributional head over DIST_BINS)."""
    import shutil

    from value_models.checkpoint import make_value_model, randomize_score_head
    from value_models.metadata import VASMetadata

    gen, a = build_tiny_pair(
        vas_cache / "vllm-pair", seed=3, hidden=128, intermediate=256, heads=4, kv_heads=2,
        init_std=0.5, value_head_std=1.0, tokenizer_dir=smollm2_tokenizer)
    b = vas_cache / "vllm-value-b"
    if not b.exists():
        make_value_model(gen, b, num_layers=2)
        randomize_score_head(b, std=1.0, seed=11)
    bon = vas_cache / "vllm-value-bon"
    if not bon.exists():
        shutil.copytree(a, bon)
        meta = VASMetadata.load(bon)
        meta.reward_transform = "bon_log_cdf"
        meta.save(bon)
    dist = vas_cache / "vllm-value-dist"
    if not dist.exists():
        make_value_model(gen, dist, num_layers=1, bins=DIST_BINS)
        randomize_score_head(dist, std=1.0, seed=12)
    return gen, {"a": a, "b": b, "bon": bon, "dist": dist}


def _repo_changes() -> set[str] | None:
    """`git status` lines under the guarded folders, or None outside a git checkout."""
    if shutil.which("git") is None or not (_REPO / ".git").exists():
        return None
    run = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *_GUARDED],
                         cwd=_REPO, capture_output=True, text=True)
    return set(run.stdout.splitlines()) if run.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def repo_stays_clean() -> Iterator[None]:
    """A test run must not rewrite committed results or artefacts (tests write to temporary
    folders; benchmarks write only when asked): fail the session if one appeared or changed."""
    before = _repo_changes()
    yield
    after = _repo_changes()
    if before is not None and after is not None and after - before:
        pytest.fail(f"the test run changed files under {_GUARDED}: {sorted(after - before)}")
