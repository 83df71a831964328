"""JSONL batch generation: read prompts, run them continuously batched, write results."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterable, TextIO

from tqdm.auto import tqdm

from speckv.engine.llm import LLM
from speckv.engine.outputs import RequestOutput
from speckv.engine.sampling_params import SamplingParams

_SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass(frozen=True, slots=True)
class Job:
    line: int
    id: Any
    prompt: str | None
    messages: list | None
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    error: str


def parse_line(line_no: int, text: str, defaults: SamplingParams) -> Job:
    """Parses one JSONL line; raises ValueError naming what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    unknown = obj.keys() - _SAMPLING_KEYS - {"prompt", "messages", "id"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; allowed: prompt, messages, id, "
                         f"{', '.join(sorted(_SAMPLING_KEYS))}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError('give exactly one of "prompt" or "messages"')
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise ValueError('"prompt" must be a non-empty string')
    if messages is not None and (not isinstance(messages, list) or not messages):
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    overrides = {k: obj[k] for k in obj.keys() & _SAMPLING_KEYS}
    try:
        params = dataclasses.replace(defaults, **overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return Job(line_no, obj.get("id"), prompt, messages, params)


def read_jsonl(lines: Iterable[str], defaults: SamplingParams) -> tuple[list[Job], list[LineError]]:
    jobs, errors = [], []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            jobs.append(parse_line(line_no, text, defaults))
        except ValueError as exc:
            errors.append(LineError(line_no, str(exc)))
    return jobs, errors


def _record(job: Job, out: RequestOutput) -> dict[str, Any]:
    record = {"line": job.line, "id": job.id, "text": out.text, "token_ids": out.token_ids,
              "finish_reason": out.finish_reason, "num_prompt_tokens": out.num_prompt_tokens,
              "num_generated_tokens": out.num_generated_tokens,
              "time_to_first_token": out.time_to_first_token,
              "per_token_latency": out.per_token_latency}
    if len(out.outputs) > 1 or out.outputs[0].logprobs is not None:  # n > 1, or logprobs
        record["choices"] = [
            {"index": c.index, "text": c.text, "token_ids": c.token_ids,
             "finish_reason": c.finish_reason, "cumulative_logprob": c.cumulative_logprob,
             "logprobs": None if c.logprobs is None else
             [{str(t): lp.logprob for t, lp in entry.items()} for entry in c.logprobs]}
            for c in out.outputs]
    return record


def run_jsonl(llm: LLM, jobs: list[Job], errors: list[LineError], output: str | None) -> int:
    """Generates every job; writes one record per input line, in input order.

    Returns the exit status: 0 if every line succeeded, 1 otherwise.
    """
    engine = llm.engine
    records: dict[int, dict[str, Any]] = {e.line: {"line": e.line, "error": e.error} for e in errors}
    pending: dict[str, Job] = {}
    for job in jobs:
        try:
            prompt = job.prompt if job.messages is None else llm.apply_chat_template(job.messages)
            pending[engine.add_request(prompt, job.params)] = job
        except ValueError as exc:
            print(f"speckv: line {job.line}: {exc}", file=sys.stderr)
            records[job.line] = {"line": job.line, "id": job.id, "error": str(exc)}
    with tqdm(total=len(pending), desc="generate", unit="req", file=sys.stderr) as bar:
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    records[pending[out.request_id].line] = _record(pending[out.request_id], out)
                    bar.update(1)
    _write(records, output)
    return 1 if any("error" in r for r in records.values()) else 0


def _write(records: dict[int, dict[str, Any]], output: str | None) -> None:
    fh: TextIO = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for line in sorted(records):
            fh.write(json.dumps(records[line]) + "\n")
    finally:
        if output:
            fh.close()
