"""Runs one peer engine on one workload and prints its numbers as one JSON line.

Executed by a peer's own Python (the venvs `benchmarks/install_peers.sh` makes), so it
imports nothing from speckv: the workload comes on stdin as JSON
({"engine", "model", "batch", "prompts", "new_tokens", "repeats", "threads"}), the
result goes to stdout as JSON. Timings are those of `speckv bench throughput`:

  prefill tok/s = B * prompt_len / t(1 new token)
  decode  tok/s = B * (new_tokens - 1) / (t(new_tokens) - t(1 new token))

llama-cpp-python serves one request at a time: a batch of B is its B requests one
after another, so its aggregate rate is what B users sharing it would get.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time


def _measure(gen, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    gen(min(new_tokens, 4))  # warm-up
    prefill, total, tokens = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        gen(1)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        tokens.append(gen(new_tokens))
        total.append(time.perf_counter() - start)
    t_prefill, t_total = statistics.median(prefill), statistics.median(total)
    return {"prefill_tok_s": batch * prompt_len / t_prefill,
            "decode_tok_s": batch * (new_tokens - 1) / max(t_total - t_prefill, 1e-9),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": tokens[-1][0][:16]}


def run_llamacpp(job: dict) -> dict:
    from llama_cpp import Llama

    prompts = job["prompts"]
    llm = Llama(model_path=job["model"], n_ctx=len(prompts[0]) + job["new_tokens"] + 8,
                n_threads=job["threads"], n_threads_batch=job["threads"], n_batch=512,
                verbose=False)

    def gen(n: int):
        out = []
        for prompt in prompts:  # one at a time: llama-cpp-python's own serving model
            llm.reset()
            ids = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                ids.append(int(token))  # generate() ignores EOS: it yields until stopped
                if len(ids) == n:
                    break
            out.append(ids)
        return out

    return _measure(gen, len(prompts), len(prompts[0]), job["new_tokens"], job["repeats"])


def run_vllm(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    prompts = job["prompts"]
    llm = LLM(model=job["model"], dtype=job.get("dtype", "bfloat16"),
              max_num_seqs=len(prompts), max_model_len=len(prompts[0]) + job["new_tokens"] + 8,
              enforce_eager=job.get("enforce_eager", False), seed=0,
              # on CPU this is the fraction of the NUMA node's memory it reserves (KV
              # cache and all); its default 0.92 fails whenever anything else runs
              gpu_memory_utilization=job.get("memory_fraction", 0.3),
              # every repeat sends the same prompts: a prefix cache would skip prefill
              enable_prefix_caching=False)
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def gen(n: int):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        outs = llm.generate(inputs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return _measure(gen, len(prompts), len(prompts[0]), job["new_tokens"], job["repeats"])


def run_vllm_prefix(job: dict) -> dict:
    """Each sequence of prompts in order, one request at a time, prefix caching as the job
    says (the cache reset before each sequence): the seconds to each prompt's first token."""
    from vllm import LLM, SamplingParams

    sequences = job["sequences"]
    longest = max(len(p) for prompts in sequences.values() for p in prompts)
    llm = LLM(model=job["model"], dtype=job.get("dtype", "bfloat16"), max_num_seqs=4,
              max_model_len=longest + 16, seed=0, enforce_eager=job.get("enforce_eager", False),
              gpu_memory_utilization=job.get("memory_fraction", 0.3),
              enable_prefix_caching=job["caching"])
    first = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([{"prompt_token_ids": [100 + i for i in range(64)]}], first, use_tqdm=False)
    result = {}
    for name, prompts in sequences.items():
        llm.reset_prefix_cache()
        times = []
        for prompt in prompts:
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], first, use_tqdm=False)
            times.append(time.perf_counter() - start)
        result[name] = times
    return result


def main() -> None:
    job = json.loads(sys.stdin.read())
    runners = {"llamacpp": run_llamacpp, "vllm": run_vllm, "vllm_prefix": run_vllm_prefix}
    runner = runners[job["engine"]]
    result = runner(job)
    print("PEER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
