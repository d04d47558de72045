"""`vas-vllm`: command-line tools around value models.

    vas-vllm make-value-model GENERATOR OUT --layers N   first N layers of GENERATOR, zero head
    vas-vllm make-value-model GENERATOR OUT --base BASE  BASE (same tokenizer), zero head
    vas-vllm check GENERATOR VALUE_MODEL                 does VALUE_MODEL fit GENERATOR?
    vas-vllm embedded [--dtype D] [--cache DIR]          build the embedded SmolLM2, print its path

Training a value model (each step resumes where an interrupted run stopped):
    vas-vllm sample --prompts P --out DATA [...]         M responses per prompt from the generator
    vas-vllm sample-summary DATA [--out JSON]            what DATA holds and what its runs cost
    vas-vllm score --data DATA --reward SPEC             score every sample (cached in DATA)
    vas-vllm train --data DATA --out MODEL [...]         TD(lambda) -> value-model folder
    vas-vllm train-all --config recipe.yaml [...]        the three steps from one YAML file

Steering a model behind an OpenAI-compatible API (remote VAS):
    vas-vllm remote --base-url URL --model NAME --value-model NAME=PATH --prompts P --out OUT

Value-guided search at block boundaries (vas_vllm/search/):
    vas-vllm search --base-url URL --model NAME --value-model NAME=PATH --reward R --prompts P --out OUT
    vas-vllm search-server --upstream URL --model NAME --value-model NAME=PATH --reward R --port 8001

Every step takes --config FILE.yaml (its fields at top level, or under sample:/score:/train:);
flags override the file. `vas-vllm COMMAND --help` lists every option.
GENERATOR and VALUE_MODEL are local folders or Hugging Face hub ids.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import BaseModel, ValidationError

from value_models.checkpoint import DTYPES  # light: no torch at import
from value_models.training.train_config import (
    PipelineConfig,
    SampleConfig,
    ScoreConfig,
    TrainConfig,
    load_yaml,
    step_section,
)
from vas_vllm.cli_args import add_model_flags, merge, overrides_from_args
from vas_vllm.remote.command import add_remote_command  # argparse only at import
from vas_vllm.search.command import add_search_commands  # argparse only at import


def _make_value_model(args: argparse.Namespace) -> int:
    from value_models import make_value_model

    if args.layers is None and args.base is None:
        print("vas-vllm make-value-model: --layers is required without --base", file=sys.stderr)
        return 2
    out = make_value_model(args.generator, args.out, num_layers=args.layers, dtype=args.dtype,
                           default_beta=args.beta, default_top_k=args.top_k, overwrite=args.overwrite,
                           base=args.base)
    print(out)
    return 0


def _check(args: argparse.Namespace) -> int:
    from value_models import IncompatibleValueModelError, check_compatible
    from value_models.metadata import MetadataError

    try:
        meta = check_compatible(args.value_model, args.generator)
    except (IncompatibleValueModelError, MetadataError, FileNotFoundError) as e:
        print(f"vas-vllm check: {e}", file=sys.stderr)
        return 2
    print(f"ok: {args.value_model} fits {args.generator} (vocab {meta.generator_vocab_size}, "
          f"reward {meta.reward or 'none yet'}, default beta {meta.default_beta}, top-k {meta.default_top_k})")
    return 0


def _embedded(args: argparse.Namespace) -> int:
    from value_models.embedded import build_smollm2

    print(build_smollm2(args.dtype, Path(args.cache) if args.cache else None))
    return 0


class _ConfigError(Exception):
    pass


def _step_config(args: argparse.Namespace, step: str, cls: type[BaseModel]) -> BaseModel:
    """cls from the YAML file (its `step` section, if it has sections) overridden by flags."""
    raw = step_section(load_yaml(args.config), step) if args.config else {}
    try:
        return cls.model_validate(merge(raw, overrides_from_args(args, set(cls.model_fields))))
    except ValidationError as e:
        raise _ConfigError(f"vas-vllm {args.command}: invalid configuration:\n{e}") from e


def _sample(args: argparse.Namespace) -> int:
    from value_models.training.sampling import generate_dataset

    print(generate_dataset(_step_config(args, "sample", SampleConfig)))
    return 0


def _sample_summary(args: argparse.Namespace) -> int:
    import json

    from value_models.training.sampling import dataset_summary

    try:
        text = json.dumps(dataset_summary(args.data), indent=2) + "\n"
    except FileNotFoundError as e:
        raise _ConfigError(f"vas-vllm sample-summary: {e}") from e
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


def _score(args: argparse.Namespace) -> int:
    from value_models.training.rewards import score_dataset

    cfg = _step_config(args, "score", ScoreConfig)
    print(score_dataset(cfg.data, cfg.reward, batch_size=cfg.batch_size))
    return 0


def _train(args: argparse.Namespace) -> int:
    from value_models.training.trainer import train_value_model

    print(train_value_model(_step_config(args, "train", TrainConfig)))
    return 0


def _train_all(args: argparse.Namespace) -> int:
    from value_models.training.rewards import score_dataset
    from value_models.training.sampling import generate_dataset
    from value_models.training.trainer import train_value_model

    raw = load_yaml(args.config) if args.config else {}
    try:
        cfg = PipelineConfig.model_validate(
            merge(raw, overrides_from_args(args, set(PipelineConfig.model_fields))))
    except ValidationError as e:
        raise _ConfigError(f"vas-vllm train-all: invalid configuration:\n{e}") from e
    generate_dataset(cfg.sample)
    score_dataset(cfg.score.data, cfg.score.reward, batch_size=cfg.score.batch_size)
    print(train_value_model(cfg.train))
    return 0


_STEPS = {
    "sample": (SampleConfig, _sample),
    "score": (ScoreConfig, _score),
    "train": (TrainConfig, _train),
}


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    config_help = ("YAML file with this step's options (at top level or under a section named "
                   "after the step); flags override it")
    for name, (cls, run) in _STEPS.items():
        doc = (cls.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.split(": ", 1)[-1], description=doc)
        p.add_argument("--config", default=None, help=config_help)
        add_model_flags(p, cls)
        p.set_defaults(run=run)
    p = sub.add_parser("sample-summary", help="what a sampled dataset holds and what sampling it cost",
                       description="Complete prompts, samples and response tokens of a dataset folder "
                       "written by `vas-vllm sample`, and its recorded runs (runs.jsonl) summed: "
                       "wall-clock, start-up, tokens/s, machines. Prints JSON.")
    p.add_argument("data", help="dataset folder (vas-vllm sample --out)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.set_defaults(run=_sample_summary)
    doc = (PipelineConfig.__doc__ or "").strip()
    p = sub.add_parser("train-all", help="sample, score and train from one YAML recipe",
                       description=doc)
    p.add_argument("--config", default=None, help="YAML recipe with sections sample:, score:, "
                   "train:; flags --STEP.OPTION override it")
    for step, (cls, _) in _STEPS.items():
        add_model_flags(p.add_argument_group(f"{step} options"), cls, prefix=step)
    p.set_defaults(run=_train_all)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vas-vllm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-value-model", help="initialise a value model from a generator's first layers")
    p.add_argument("generator", help="generator: a local HF folder or a hub id (Llama family)")
    p.add_argument("out", help="folder to write the value model to")
    p.add_argument("--layers", type=int, default=None, help="decoder layers to copy: of the "
                   "generator (required without --base), or of --base (default: all)")
    p.add_argument("--base", default=None, help="a separate Llama-family LM sharing the generator's "
                   "tokenizer to start from (e.g. TinyLlama-1.1B for Llama-2-7B)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights dtype (default float32)")
    p.add_argument("--beta", type=float, default=1.0, help="default VAS strength recorded in vas.json (default 1.0)")
    p.add_argument("--top-k", type=int, default=20, help="default candidates recorded in vas.json (default 20)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    p.set_defaults(run=_make_value_model)

    p = sub.add_parser("check", help="check that a value model fits a generator (vocabulary, tokenizer)")
    p.add_argument("generator", help="generator: a local HF folder or a hub id")
    p.add_argument("value_model", help="value model: a local HF folder or a hub id")
    p.set_defaults(run=_check)

    p = sub.add_parser("embedded", help="build the embedded SmolLM2-135M-Instruct folder and print its path")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="weights dtype (default bfloat16)")
    p.add_argument("--cache", default=None, help="cache folder (default: $VAS_VLLM_CACHE or ~/.cache/vas-vllm)")
    p.set_defaults(run=_embedded)

    _add_training_commands(sub)
    add_remote_command(sub)
    add_search_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except _ConfigError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
