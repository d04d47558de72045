"""Is this value model usable with this generator?

VAS adds beta * Q(s, a) to the generator's logit of token a, where Q comes from running the value
model on the same token ids. That is only meaningful when both share one vocabulary: the same
size (ids index the same logit rows) and the same id<->token map (checked by fingerprint).
Checked once when a value model is loaded, never per step.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from value_models.checkpoint import SUPPORTED_MODEL_TYPES, VALUE_ARCHITECTURE, resolve_model_path
from value_models.metadata import VASMetadata
from value_models.fingerprint import tokenizer_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class IncompatibleValueModelError(ValueError):
    """The value model cannot be used with the given generator (or is not a value model)."""


def load_value_model_metadata(path: str | Path) -> VASMetadata:
    """vas.json of a value model given as a local directory or a hub id."""
    return VASMetadata.load(resolve_model_path(path))


def check_value_model_config(path: str | Path, config: Any, meta: VASMetadata | None = None) -> None:
    """Refuse anything but a Llama-family sequence-classification model whose head has the
    width vas.json promises (1 for a scalar head, one output per bin for a distributional one)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise IncompatibleValueModelError(
            f"value model {path} has model_type {model_type!r}; supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
        )
    archs = getattr(config, "architectures", None) or []
    if archs and VALUE_ARCHITECTURE not in archs:
        raise IncompatibleValueModelError(
            f"value model {path} has architectures {archs}; expected [{VALUE_ARCHITECTURE!r}]"
        )
    expected = meta.num_outputs if meta is not None else 1
    if config.num_labels != expected:
        what = (f"a distributional head over {expected} bins (vas.json)" if expected > 1
                else "one scalar output (vas.json value_head 'scalar')")
        raise IncompatibleValueModelError(
            f"value model {path} has num_labels={config.num_labels}; expected {expected}: {what}"
        )


def check_compatible(
    value_model_path: str | Path,
    generator: str | Path | PreTrainedTokenizerBase,
    *,
    generator_vocab_size: int | None = None,
) -> VASMetadata:
    """Raise IncompatibleValueModelError unless the value model fits the generator.

    `generator` is a model directory / hub id (its config and tokenizer are read) or an
    already-loaded tokenizer; with a tokenizer, pass `generator_vocab_size` (the generator's
    config.vocab_size, i.e. the logits width) to have it checked too. Returns the value model's
    metadata, validated.
    """
    from transformers import AutoConfig, AutoTokenizer

    v_path = resolve_model_path(value_model_path)
    meta = VASMetadata.load(v_path)
    v_config = AutoConfig.from_pretrained(v_path)
    check_value_model_config(value_model_path, v_config, meta)
    if v_config.vocab_size != meta.generator_vocab_size:
        raise IncompatibleValueModelError(
            f"value model {value_model_path} is inconsistent: config.json vocab_size="
            f"{v_config.vocab_size} but vas.json generator_vocab_size={meta.generator_vocab_size}"
        )

    if isinstance(generator, (str, Path)):
        g_path = resolve_model_path(generator)
        g_name = str(generator)
        g_config = AutoConfig.from_pretrained(g_path)
        if generator_vocab_size is None:
            generator_vocab_size = int(g_config.vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(g_path)
    else:
        tokenizer = generator
        g_name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__

    if generator_vocab_size is not None and generator_vocab_size != meta.generator_vocab_size:
        raise IncompatibleValueModelError(
            f"vocabulary size mismatch: value model {value_model_path} was made for "
            f"vocab_size={meta.generator_vocab_size}, generator {g_name} has "
            f"vocab_size={generator_vocab_size}"
        )
    found = tokenizer_fingerprint(tokenizer)
    if found != meta.tokenizer_fingerprint:
        raise IncompatibleValueModelError(
            f"tokenizer mismatch: value model {value_model_path} has tokenizer fingerprint "
            f"{meta.tokenizer_fingerprint}, generator {g_name} has {found} (same ids must mean "
            "the same tokens)"
        )
    return meta
