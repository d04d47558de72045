"""Value-model checkpoints: make one from a generator, find one on disk or on the hub.

Format (a plain HF folder, so `AutoModelForSequenceClassification.from_pretrained` loads it):
    config.json         LlamaConfig, architectures=["LlamaForSequenceClassification"],
                        num_labels=1, pad_token_id set
    model.safetensors   model.* (embed_tokens, layers.0..L-1, norm) + score.weight [1, D]
    tokenizer files     the generator's tokenizer, unchanged
    vas.json            VASMetadata (vocab size, tokenizer fingerprint, reward, defaults)

V(prefix) is `score(hidden[:, -1])`: the scalar head applied to the last position's hidden
state (the head is applied per position, as in the authors' code).

THE POOLED-OUTPUT TRAP: `LlamaForSequenceClassification.forward` pools at the last token that
is NOT `pad_token_id`. SmolLM2 (like many models) has pad == eos, so the pooled output for
`s + [eos]` is silently V(s). Runtime code and references must not use the pooled logits for
prefixes that can contain the pad id; compute `model.score(model.model(ids).last_hidden_state)`.

torch / transformers / huggingface_hub are imported inside functions: importing this module is
cheap (the vLLM API-server process imports it).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from value_models.metadata import VASMetadata
from value_models.fingerprint import tokenizer_fingerprint

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Architectures the value-model runtime knows how to run.
SUPPORTED_MODEL_TYPES = frozenset({"llama"})
VALUE_ARCHITECTURE = "LlamaForSequenceClassification"
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> torch dtype, with a clear error otherwise."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, found {name!r}")
    return getattr(torch, name)


def resolve_model_path(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """A local model directory as is; otherwise a Hugging Face hub id, downloaded (or taken
    from the hub cache) with `huggingface_hub.snapshot_download`."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise NotADirectoryError(f"{local} is a file; expected a model directory or a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = str(name_or_path)
    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise FileNotFoundError(
            f"{name!r} does not exist locally and is not a Hugging Face hub id ({e})"
        ) from None
    try:
        return Path(snapshot_download(repo_id=name, revision=revision))
    except Exception as e:  # offline, unreachable, gated, missing repo: all look alike to a user
        raise FileNotFoundError(
            f"{name!r} does not exist locally and could not be fetched from the Hugging Face "
            f"hub ({type(e).__name__}: {e}). Pass a local model directory, or check the "
            "network / HF_HUB_OFFLINE / credentials."
        ) from e


def _pad_token_id(tokenizer: PreTrainedTokenizerBase, config: Any) -> int:
    # Sequence classification needs a pad id to pool (and to batch). Prefer the tokenizer's
    # pad, else eos. See the pooled-output trap in the module docstring when pad == eos.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, config.pad_token_id,
                      config.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    raise ValueError("the generator's tokenizer and config define neither a pad nor an eos token")


def _value_config(gen_config: Any, num_layers: int, pad_token_id: int, num_labels: int = 1) -> Any:
    """The generator's config cut to `num_layers` decoder layers, with a `num_labels` head."""
    config = copy.deepcopy(gen_config)
    n_gen = gen_config.num_hidden_layers
    config.num_hidden_layers = num_layers
    # Per-layer lists (e.g. `layer_types` in newer transformers) must shrink with the depth.
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n_gen and key.startswith("layer"):
            setattr(config, key, value[:num_layers])
    config.num_labels = num_labels
    config.pad_token_id = pad_token_id
    config.architectures = [VALUE_ARCHITECTURE]
    config.tie_word_embeddings = False  # no lm_head here; nothing to tie
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def make_value_model(
    generator: str | Path,
    out_dir: str | Path,
    *,
    num_layers: int | None = None,
    dtype: str = "float32",
    default_beta: float = 1.0,
    default_top_k: int = 20,
    reward: str | None = None,
    generator_name: str | None = None,
    overwrite: bool = False,
    bins: list[float] | None = None,
    base: str | Path | None = None,
) -> Path:
    """Initialise a value model for a Llama generator: from the generator's own first
    `num_layers` layers, or from `base`, a separate Llama-family LM that shares the generator's
    tokenizer (the paper: TinyLlama-1.1B for Llama-2-7B), keeping its first `num_layers` layers
    (default: all of them).

    Copies the embeddings, decoder layers 0..num_layers-1 and the final norm; the `score`
    head starts at zero (so V == 0 everywhere and VAS starts as a no-op), as the authors
    recommend. Saves safetensors + config + the generator's tokenizer + vas.json.
    `generator_name` is what vas.json records as the generator (default: `generator` as given).
    `bins` (ascending reward values) makes a distributional head [len(bins), D] instead of the
    scalar [1, D]; its zero init predicts the uniform distribution over the bins.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers import LlamaForSequenceClassification

    out = Path(out_dir).expanduser()
    if (out / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a model; pass overwrite=True to replace it")
    gen_path = resolve_model_path(generator)
    gen_config = AutoConfig.from_pretrained(gen_path)
    src_path = resolve_model_path(base) if base is not None else gen_path
    src_name = str(base if base is not None else generator)
    src_config = AutoConfig.from_pretrained(src_path) if base is not None else gen_config
    for name, cfg in ((str(generator), gen_config), (src_name, src_config)):
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{name} has model_type {cfg.model_type!r}; value models are made from "
                f"{sorted(SUPPORTED_MODEL_TYPES)} models only"
            )
    n_src = src_config.num_hidden_layers
    if num_layers is None and base is not None:
        num_layers = n_src
    if not isinstance(num_layers, int) or not 1 <= num_layers <= n_src:
        raise ValueError(
            f"num_layers must be an int in 1..{n_src} ({src_name} has {n_src} layers), found "
            f"{num_layers!r}"
        )
    target_dtype = torch_dtype(dtype)

    tokenizer = AutoTokenizer.from_pretrained(gen_path)
    if base is not None:
        _check_same_vocabulary(src_name, src_config, AutoTokenizer.from_pretrained(src_path),
                               str(generator), gen_config, tokenizer)
    # fp32 load: copy the exact weights, round once at the end.
    src = LlamaForCausalLM.from_pretrained(src_path, dtype=torch.float32)
    config = _value_config(src.config, num_layers, _pad_token_id(tokenizer, gen_config),
                           num_labels=len(bins) if bins is not None else 1)
    value = LlamaForSequenceClassification(config)

    src_sd = src.state_dict()
    new_sd: dict[str, torch.Tensor] = {}
    for key, tensor in value.state_dict().items():
        if key.startswith("model."):
            if key not in src_sd:
                raise KeyError(f"{src_name}'s state dict lacks {key} needed by the value model")
            new_sd[key] = src_sd[key]
        else:  # score.weight [1, D]: zero-init head
            new_sd[key] = torch.zeros_like(tensor)
    value.load_state_dict(new_sd, strict=True)
    value = value.to(target_dtype)
    del src, src_sd

    out.mkdir(parents=True, exist_ok=True)
    value.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    init: dict[str, Any] = {"num_layers": num_layers, "head": "zeros"}
    if base is not None:
        init["base"] = str(base)
    VASMetadata(
        generator_vocab_size=int(gen_config.vocab_size),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        generator=generator_name or str(generator),
        reward=reward,
        training={"init": init},
        default_beta=default_beta,
        default_top_k=default_top_k,
        value_head="distributional" if bins is not None else "scalar",
        bins=[float(b) for b in bins] if bins is not None else None,
    ).save(out)
    logger.info("value model (%d/%d layers of %s, %s) saved to %s",
                num_layers, n_src, src_name, dtype, out)
    return out


def _check_same_vocabulary(base: str, base_config: Any, base_tok: PreTrainedTokenizerBase,
                           generator: str, gen_config: Any, gen_tok: PreTrainedTokenizerBase) -> None:
    """A base model for a value model must read the generator's token ids as the same tokens."""
    if int(base_config.vocab_size) != int(gen_config.vocab_size):
        raise ValueError(f"base {base} has vocab_size {base_config.vocab_size}, generator "
                         f"{generator} has {gen_config.vocab_size}: a value model must share the "
                         "generator's vocabulary")
    found, expected = tokenizer_fingerprint(base_tok), tokenizer_fingerprint(gen_tok)
    if found != expected:
        raise ValueError(f"base {base}'s tokenizer (fingerprint {found}) differs from generator "
                         f"{generator}'s ({expected}): the same ids must mean the same tokens")


def randomize_score_head(value_dir: str | Path, *, std: float, seed: int = 0) -> None:
    """Replace a saved value model's `score` head [O, D] with seeded N(0, std^2) weights.

    For tests and benchmarks: a fresh value model's zero head makes every V equal, so nothing
    that compares values would notice an error.
    """
    import torch
    from safetensors.torch import load_file, save_file

    weights = Path(value_dir) / "model.safetensors"
    state = load_file(weights)
    head = state["score.weight"]                                              # [1, D]
    new = torch.randn(head.shape, generator=torch.Generator().manual_seed(seed)) * std
    state["score.weight"] = new.to(head.dtype)
    save_file(state, weights, metadata={"format": "pt"})
