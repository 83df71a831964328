"""The `speckv` command, run as users run it (a real subprocess where it matters)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from speckv.cli import main

SMALL = ["--device-kv-bytes", "32MiB", "--device", "cpu"]


def _speckv(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speckv.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_engine_option():
    proc = _speckv("generate", "--help")
    assert proc.returncode == 0
    for flag in ("--model", "--dtype", "--page-size", "--device-kv-bytes", "--max-num-seqs",
                 "--max-num-batched-tokens", "--engine-seed", "--max-tokens", "--top-p",
                 "--stop", "--ignore-eos", "malformed line"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_generate_streams_to_stdout():
    proc = _speckv("generate", "The capital of France is", "--max-tokens", "4", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(" Paris")
    assert "[length: 5 prompt + 4 generated tokens" in proc.stderr


@pytest.mark.slow
def test_jsonl_batch_reports_bad_lines_and_runs_the_rest(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([
        json.dumps({"id": "a", "prompt": "The capital of France is", "max_tokens": 3}),
        "{not json",
        json.dumps({"id": "b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        json.dumps({"id": "c", "prompt": "x", "temperature": -1}),
        json.dumps({"id": "d", "prompt": "x", "colour": "red"}),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", str(inp), "--output", str(out), *SMALL]) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["id"] == "a" and records[0]["text"] == " Paris.\n" and records[0]["num_generated_tokens"] == 3
    assert "not valid JSON" in records[1]["error"]
    assert records[2]["id"] == "b" and records[2]["num_generated_tokens"] == 2
    assert "temperature must be a finite number >= 0" in records[3]["error"]
    assert "unknown keys ['colour']" in records[4]["error"]


def test_jsonl_strict_stops_before_generating(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "ok"}\n[1, 2]\n')
    assert main(["generate", "--input", str(inp), "--strict", *SMALL]) == 2
    assert "in.jsonl:2: expected a JSON object" in capsys.readouterr().err


def test_bad_options_are_errors_not_tracebacks(capsys):
    assert main(["generate", "hi", "--device-kv-bytes", "lots"]) == 2
    assert "not a byte size" in capsys.readouterr().err
    assert main(["generate", "hi", "--top-p", "2"]) == 2
    assert "top_p must be a number in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "/no/such/model.gguf"]) == 2
    assert "model path does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate"])  # neither a prompt nor --input


def test_missing_input_file(capsys, tmp_path):
    assert main(["generate", "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read --input" in capsys.readouterr().err


@pytest.mark.slow
def test_info_prints_config_and_kv_bytes(capsys):
    assert main(["info", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "134,515,008" in out  # parameters of SmolLM2-135M
    assert "kv bytes per token" in out and "46,080" in out  # 30 layers * 2 * 3 heads * 64 * 4 B


@pytest.mark.slow
def test_bench_throughput_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "throughput", "--batch-sizes", "2", "--prompt-len", "8",
                 "--new-tokens", "3", "--repeats", "1", "--no-hf", "--variant",
                 "attention_backend=torch", "--json", str(out), *SMALL]) == 0
    report = json.loads(out.read_text())
    assert [r["engine"] for r in report["results"]] == ["speckv", "speckv[attention_backend=torch]"]
    for r in report["results"]:
        assert r["batch"] == 2 and r["decode_tok_s"] > 0 and len(r["tokens"]) == 3
    # both attention backends produce the same greedy tokens
    assert report["results"][0]["tokens"] == report["results"][1]["tokens"]


def test_bench_rejects_bad_variant(capsys):
    assert main(["bench", "throughput", "--variant", "page_size", "--no-hf"]) == 2
    assert "--variant wants KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_with_a_pool_prints_tier_stats_and_writes_json(tmp_path):
    stats = tmp_path / "stats.json"
    proc = _speckv("generate", "The capital of France is", "--max-tokens", "20", "--pool", "local",
                   "--codec", "int8", "--pool-bytes", "16MiB", "--device-kv-bytes", "3MiB",
                   "--device", "cpu", "--stats", "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stderr
    assert "tier_encoded_bytes_stored" in proc.stderr and "codec                       " in proc.stderr
    report = json.loads(stats.read_text())
    assert report["codec"] == "int8" and report["pool_backend"] == "local"
    assert report["tier_pages_stored"] == 30  # 25 tokens: one sealed page in each layer
    assert report["tier_encoded_bytes_stored"] == 30 * 6624


@pytest.mark.slow
def test_info_shows_the_pool(capsys):
    assert main(["info", "--pool", "local", "--codec", "kivi2", "--pool-bytes", "1MiB", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "kivi2" in out and "pool slot bytes (one page)  2,496" in out and "pool pages" in out
    assert "selector                    full" in out and "25.0% of the context" in out
    assert "summary bytes (one page)    2,304" in out  # min, max and mean: 3 x 3 heads x 64 x 4 B


def test_bench_capacity_and_fidelity_reject_bad_arguments(capsys):
    assert main(["bench", "capacity", "--configs", "int8@disk"]) == 2
    assert "write CODEC@local or CODEC@memnode[:LINK]" in capsys.readouterr().err
    assert main(["bench", "capacity", "--configs", "int9@local"]) == 2
    assert "unknown codec 'int9'" in capsys.readouterr().err
    assert main(["bench", "fidelity", "--codecs", "int8,int3"]) == 2
    assert "unknown codec 'int3'" in capsys.readouterr().err


def test_bench_kvread_rejects_bad_arguments(capsys):
    assert main(["bench", "kvread", "--shapes", "8by4096"]) == 2
    assert "write BATCHxCONTEXT, e.g. 8x4096" in capsys.readouterr().err
    assert main(["bench", "kvread", "--pool-codec", "int9"]) == 2
    assert "unknown codec 'int9'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_kvread_runs_small(tmp_path):
    out = tmp_path / "kvread.json"
    assert main(["bench", "kvread", "--shapes", "2x64", "--steps", "2", "--selectors",
                 "full,quest:0.5", "--pool-link", "none", "--device-fraction", "0.9",
                 "--json", str(out), "--device", "cpu"]) == 0
    rows = json.loads(out.read_text())["rows"]
    configs = {r["config"] for r in rows}
    assert configs == {"all-resident", "copy", "in_place", "in_place, no software prefetch",
                       "in_place, layer_ahead hints"}
    by = {(r["config"], r["selector"]): r for r in rows}
    assert by["in_place", "full"]["pool_pages_per_step"] > 0  # read from the pool, in place
    hinted = by["in_place, layer_ahead hints", "full"]
    # rows prefetched and then read (under full, layer_ahead hints every page read);
    # nothing is ever in flight
    assert hinted["issued"] > 0 and hinted["hit_rate"] > 0.5 and hinted["late"] == 0, hinted
    assert by["all-resident", "full"]["pool_pages_per_step"] == 0
    assert all(r["tok_s"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_capacity_runs_small(tmp_path):
    out = tmp_path / "cap.json"
    assert main(["bench", "capacity", "--seq-len", "48", "--new-tokens", "8", "--base-seqs", "1",
                 "--factor", "2", "--configs", "int8@local", "--json", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    configs = [r["config"] for r in report["results"]]
    assert configs == ["all-resident", "int8@local", "all-resident"]
    tiered = report["results"][1]
    assert tiered["sequences"] == 2 and tiered["ran_together"] == 2 and tiered["max_concurrent"] >= 2
    assert tiered["decode_tok_s"] > 0


@pytest.mark.slow
def test_bench_fidelity_reference_codec_is_exact(tmp_path):
    out = tmp_path / "fid.json"
    assert main(["bench", "fidelity", "--codecs", "none,int8", "--num-prompts", "1",
                 "--new-tokens", "4", "--text-tokens", "256", "--json", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    none, int8 = report["results"]
    # codec none through the pool is the reference, to the bit
    assert none["kl"] == 0.0 and none["ppl"] == pytest.approx(report["reference_ppl"], rel=1e-9)
    assert none["agreement_forced"] == 1.0 and none["attention_rel_error"] == 0.0
    assert none["bytes_per_page"] == 24576 and int8["bytes_per_page"] == 6624
    assert 0 < int8["kl"] < 0.01 and 0 < int8["attention_rel_error"] < 0.05


def test_bench_selection_rejects_bad_arguments(capsys):
    assert main(["bench", "selection", "--tasks", "passkey,typing"]) == 2
    assert ("unknown task(s) ['typing']; known: passkey, multikey, multivalue, vartrack, ppl, "
            "speed") in capsys.readouterr().err
    assert main(["bench", "selection", "--selectors", "quest,psychic"]) == 2
    assert "unknown selector 'psychic'" in capsys.readouterr().err
    assert main(["bench", "selection", "--budgets", "64,-1"]) == 2
    assert "expected positive numbers" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_selection_passkey_runs_small(tmp_path):
    out = tmp_path / "sel.json"
    assert main(["bench", "selection", "--tasks", "passkey", "--contexts", "512", "--trials", "2",
                 "--budgets", "64", "--selectors", "quest,oracle", "--json", str(out),
                 "--device", "cpu"]) == 0
    rows = {(r["selector"], r["budget"]): r for r in json.loads(out.read_text())["passkey"]}
    assert set(rows) == {("full", None), ("quest", 64), ("oracle", 64)}
    assert all(r["trials"] == 2 and r["context"] == 512 for r in rows.values())
    assert rows[("full", None)]["accuracy"] == 1.0  # the model finds the key at 512 tokens


def test_generate_with_a_selector_reports_selection_stats(tmp_path):
    stats = tmp_path / "stats.json"
    prompt = "The sky is blue and the grass is green. " * 12  # ~120 tokens, 8 pages
    proc = _speckv("generate", prompt, "--max-tokens", "4", "--selector", "sink_recent",
                   "--token-budget", "32", "--min-context-tokens", "0", "--device", "cpu",
                   "--device-kv-bytes", "64MiB", "--stats", "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"selection_fraction_per_layer +1\.00 1\.00 0\.", proc.stderr)  # 2 dense
    report = json.loads(stats.read_text())
    assert report["selection_selector"] == "sink_recent"
    assert report["selection_bytes_read"] < report["selection_bytes_full"] / 2


def test_serve_takes_the_model_positionally_as_vllm_serve_does(capsys):
    assert main(["serve", "/no/such/model.gguf"]) == 2  # it was the model: it fails to load
    assert "/no/such/model.gguf" in capsys.readouterr().err
    assert main(["serve", "a.gguf", "--model", "b.gguf"]) == 2
    assert "two models given: 'a.gguf' and --model 'b.gguf'" in capsys.readouterr().err


def test_bench_prefix_runs_small_and_counts_its_hits(tmp_path):
    out = tmp_path / "prefix.json"
    assert main(["bench", "prefix", "--turns", "3", "--users", "3", "--system-tokens", "128",
                 "--interval", "0.05", "--new-tokens", "4", "--rounds", "1", "--json", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["tokens_identical"] is True
    chat, system = report["chat"], report["system"]
    assert chat["on"]["cached_tokens"][0] == 0 and chat["on"]["cached_tokens"][-1] > 0
    assert chat["off"]["cached_tokens"] == [0, 0, 0]
    assert system["on"]["cached_tokens"] >= 128 and system["off"]["cached_tokens"] == 0
    assert report["capacity"]["on"]["most_running"] >= report["capacity"]["off"]["most_running"] >= 1
    assert main(["bench", "prefix", "--interval", "0"]) == 2  # named, not a traceback


def test_bench_replica_runs_small_through_its_own_valkey(tmp_path):
    out = tmp_path / "replica.json"
    assert main(["bench", "replica", "--users", "3", "--system-tokens", "64", "--rounds", "1",
                 "--json", str(out), "--device", "cpu", "--pool-bytes", "256MiB"]) == 0
    report = json.loads(out.read_text())
    assert report["tokens_identical"] is True
    assert report["replica_cached_tokens_median"] == 64  # every whole page, from Valkey
    assert set(report["transfer"]["gbs_median"]) >= {"valkey_read", "memnode_read"}
    assert all(v > 0 for v in report["transfer"]["gbs_median"].values())
    assert main(["bench", "replica", "--users", "1"]) == 2
