"""`vas-vllm`: command-line tools around value models.

    vas-vllm make-value-model GENERATOR OUT --layers N   first N layers of GENERATOR, zero head
    vas-vllm check GENERATOR VALUE_MODEL                 does VALUE_MODEL fit GENERATOR?
    vas-vllm embedded [--dtype D] [--cache DIR]          build the embedded SmolLM2, print its path

GENERATOR and VALUE_MODEL are local folders or Hugging Face hub ids. Later issues add
`sample`, `score` and `train` here.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from value_models.checkpoint import DTYPES  # light: no torch at import


def _make_value_model(args: argparse.Namespace) -> int:
    from value_models import make_value_model

    out = make_value_model(args.generator, args.out, num_layers=args.layers, dtype=args.dtype,
                           default_beta=args.beta, default_top_k=args.top_k, overwrite=args.overwrite)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vas-vllm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-value-model", help="initialise a value model from a generator's first layers")
    p.add_argument("generator", help="generator: a local HF folder or a hub id (Llama family)")
    p.add_argument("out", help="folder to write the value model to")
    p.add_argument("--layers", type=int, required=True, help="decoder layers to copy from the generator")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
