"""argparse flags generated from pydantic models, so each option is documented once (its Field
description) and validated once (by the model).

    add_model_flags(parser, SampleConfig)            --out, --num-samples, --no-enforce-eager, ...
    add_model_flags(parser, TrainConfig, "train")    --train.lr, --train.lora-r, ...
    overrides_from_args(args)                        {"num_samples": 8} / {"train": {"lr": ...}}

Flags default to "not given" (argparse.SUPPRESS), so only what the user typed overrides the YAML
file; the model's own defaults apply last. Imports only the standard library and pydantic.
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

_PREFIX_SEP = "."


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for `X | None` / Optional[X]."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _none_or(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    inner, optional = _unwrap_optional(annotation)
    origin = typing.get_origin(inner)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = list(typing.get_args(inner))
        return {"choices": choices, "type": type(choices[0])}
    if origin is list:
        (item,) = typing.get_args(inner) or (str,)
        return {"nargs": "+", "type": item, "metavar": item.__name__.upper()}
    if inner in (int, float, str):
        return {"type": _none_or(inner) if optional else inner,
                "metavar": inner.__name__.upper()}
    raise TypeError(f"cannot make a command-line flag for type {annotation!r}")


def add_model_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                    model: type[BaseModel], prefix: str | None = None) -> None:
    """One flag per field of `model`: --field-name (or --prefix.field-name), help from the
    field's description plus its default ("required" when it has none and no YAML gives it)."""
    for name, field in model.model_fields.items():
        flag = name.replace("_", "-")
        if prefix:
            flag = f"{prefix}{_PREFIX_SEP}{flag}"
        dest = f"{prefix}{_PREFIX_SEP}{name}" if prefix else name
        if field.default is PydanticUndefined and field.default_factory is None:
            suffix = " (required unless the config file sets it)"
        else:
            default = field.get_default(call_default_factory=True)
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            suffix = f" (default: {shown})"
        help_text = (field.description or name).replace("%", "%%") + suffix
        parser.add_argument(f"--{flag}", dest=dest, default=argparse.SUPPRESS, help=help_text,
                            **_flag_kwargs(field.annotation))


def overrides_from_args(args: argparse.Namespace, names: set[str] | None = None) -> dict[str, Any]:
    """The flags the user gave, as a (nested, for prefixed flags) dict for model_validate.
    `names` limits it to those attribute names (top level or prefix)."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        top, _, rest = dest.partition(_PREFIX_SEP)
        if names is not None and top not in names:
            continue
        if rest:
            out.setdefault(top, {})[rest] = value
        else:
            out[dest] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, recursing into nested dicts (flags over YAML)."""
    merged = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = merge(merged[k], v)
        else:
            merged[k] = v
    return merged
