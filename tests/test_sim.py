"""`speckv.sim`: the step model on hand-computed cases, the shipped hardware profiles,
and `speckv simulate` on a trace written by a real engine run."""

from __future__ import annotations

import json

import pytest

from speckv import SamplingParams
from speckv.cli import main
from speckv.pool.link import PROFILES as LINKS
from speckv.sim import hardware, shapes
from speckv.sim.roofline import Mechanisms, Step, step_time
from speckv.sim.simulate import read_trace

# one layer, tiny: every term can be done by hand
SHAPE = shapes.ModelShape("tiny", layers=1, hidden=4, heads=1, kv_heads=1, head_dim=4,
                          intermediate=8, vocab=10)
HW = hardware.Hardware("unit", "gpu", memory_gb=1.0, memory_bandwidth_gbs=1.0,
                       peak_tflops={"bfloat16": 1.0}, step_overhead_us=3.0, sources=("test",))


def test_the_shape_arithmetic():
    # q, k, v: 4 x (1 + 2) x 4 = 48; o: 16; gate, up, down: 3 x 4 x 8 = 96; head: 10 x 4
    assert SHAPE.matmul_params == 48 + 16 + 96 + 40
    assert SHAPE.kv_bytes_per_token(2) == 2 * 1 * 1 * 4 * 2
    llama = shapes.load("llama-2-7b")
    assert 6.5e9 < llama.matmul_params < 6.8e9  # 6.74 B parameters, embeddings aside


def test_one_layer_one_step_memory_bound():
    mech = Mechanisms(weight_bytes=1000)
    b = step_time(SHAPE, HW, mech, Step(tokens=2, kv_tokens=100, decode_sequences=2))
    assert b.weights == pytest.approx(1000 / 1e9, rel=1e-12)
    assert b.kv == pytest.approx(100 * 16 / 1e9, rel=1e-12)
    # 2 x 200 x 2 matmul flops + 4 x 1 x 1 x 4 x 100 attention flops, at 1 TFLOP/s
    assert b.compute == pytest.approx((800 + 1600) / 1e12, rel=1e-12)
    assert b.core == pytest.approx(2.6e-6, rel=1e-12)
    assert b.exposed == 0 and b.overhead == pytest.approx(3e-6)
    assert b.total == pytest.approx(5.6e-6, rel=1e-12)


def test_one_step_compute_bound():
    mech = Mechanisms(weight_bytes=0)
    b = step_time(SHAPE, HW, mech, Step(tokens=10_000, prefill_pairs=10_000 * 10_001 // 2))
    flops = 2 * 200 * 10_000 + 16 * (10_000 * 10_001 // 2)
    assert b.compute == pytest.approx(flops / 1e12, rel=1e-12)
    assert b.core == b.compute > b.weights + b.kv


def test_pooled_pages_over_a_link_with_a_prefetcher():
    link = LINKS["cxl2-x16"]  # 64 GB/s, 250 ns
    mech = Mechanisms(weight_bytes=1000, pooled_fraction=0.5, codec_ratio=0.5, link=link,
                      prefetch_recall=0.8, prefetch_precision=0.5)
    b = step_time(SHAPE, HW, mech, Step(tokens=2, kv_tokens=100, decode_sequences=2))
    needed = 100 * 0.5 * 16 * 0.5  # 400 bytes of the codec's
    ahead, demand = needed * 0.8 / 0.5, needed * 0.2  # 640 moved early (half wasted), 80 late
    ahead_s = ahead / 64e9
    demand_s = demand / 64e9 + 1 * 250e-9  # one layer's stall pays the round trip
    assert b.link_bytes == pytest.approx(ahead + demand)
    assert b.hidden == pytest.approx(ahead_s, rel=1e-12)  # all of it under the 2.6 us core
    assert b.exposed == pytest.approx(demand_s, rel=1e-12)
    assert b.total == pytest.approx(2.6e-6 + demand_s + 3e-6, rel=1e-12)
    slow_codec = Mechanisms(**{**{k: getattr(mech, k) for k in mech.__dataclass_fields__},
                               "codec_decode_gbs": 0.0001})  # 100 KB/s: the decoder binds
    b = step_time(SHAPE, HW, slow_codec, Step(tokens=2, kv_tokens=100, decode_sequences=2))
    assert b.transfer == pytest.approx((ahead + demand) / 1e5, rel=1e-12)
    assert b.hidden == pytest.approx(2.6e-6, rel=1e-12)  # as much as the core can hide


def test_selection_reads_fewer_pages_and_their_summaries():
    mech = Mechanisms(weight_bytes=0, selection_fraction=0.25, summary_bytes_per_page=64)
    b = step_time(SHAPE, HW, mech, Step(tokens=1, kv_tokens=160, decode_sequences=1))
    assert b.kv == pytest.approx((160 * 0.25 * 16 + 160 / 16 * 64) / 1e9, rel=1e-12)


@pytest.mark.parametrize("name", sorted(hardware.shipped()))
def test_every_shipped_profile_is_valid_and_cites_its_sources(name):
    hw = hardware.load(name)
    assert hw.sources and all(len(s) > 20 for s in hw.sources)
    assert hw.memory_bandwidth_gbs > 0 and hw.memory_gb > 0
    if hw.kind == "gpu":
        assert hw.flops("bfloat16") > hw.flops("float32") > 1e12  # TFLOP/s, not FLOP/s
        assert 100 < hw.memory_bandwidth_gbs < 10_000  # GB/s, not bytes/s


@pytest.mark.parametrize("change, named", [
    ({"sources": []}, "sources"), ({"memory_bandwidth_gbs": -1}, "memory_bandwidth_gbs"),
    ({"kind": "tpu"}, "kind"), ({"bandwidth": 5}, "unknown field"),
    ({"peak_tflops": {}}, "peak_tflops"), ({"peak_tflops": {"int8": 5}}, "peak_tflops"),
    ({"memory_gb": "80"}, "memory_gb"), ({"step_overhead_us": float("nan")}, "step_overhead_us"),
])
def test_a_bad_profile_is_refused_naming_the_field(change, named):
    data = json.loads((hardware.shipped()["a100-80gb"]).read_text())
    data.update(change)
    with pytest.raises(ValueError, match=named):
        hardware.validate(data)
    data = json.loads((hardware.shipped()["a100-80gb"]).read_text())
    del data["memory_gb"]
    with pytest.raises(ValueError, match="memory_gb is required"):
        hardware.validate(data)


def test_simulate_runs_on_a_trace_written_by_a_real_engine_run(make_llm, tmp_path, capsys):
    trace = tmp_path / "run.jsonl"
    llm = make_llm(trace=str(trace))
    prompt = llm.tokenizer.encode("The tide came in over the flats, " * 4)
    llm.generate([prompt, prompt[:20]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                 use_tqdm=False)
    llm.close()
    meta, steps = read_trace(str(trace))
    assert meta["shape"]["layers"] == 30 and meta["weight_bytes"] > 0
    assert sum(s["tokens"] for s in steps) == len(prompt) + 20 + 2 * 5  # the first token of
    #                                     each comes with its prefill, 5 more are decodes
    decode_kv = sum(s["kv_tokens"] for s in steps)  # each decode reads its context and itself
    assert decode_kv == sum(n + i for n in (len(prompt), 20) for i in range(1, 6))
    out = tmp_path / "sim.json"
    assert main(["simulate", "--trace", str(trace), "--profile", "h100-80gb-sxm", "--profile",
                 "l40s", "--json", str(out), "--plot", str(tmp_path / "sim.png")]) == 0
    result = json.loads(out.read_text())
    h100, l40s = (p["projected"]["total"] for p in result["profiles"])
    assert 0 < h100 < l40s  # more bandwidth, less time
    assert result["profiles"][0]["step_error_median"] >= 0
    assert (tmp_path / "sim.png").stat().st_size > 0
    assert "H100-80GB-SXM" in capsys.readouterr().out


def test_simulate_a_named_workload_and_bad_inputs(capsys):
    assert main(["simulate", "--model", "Llama-3-8B", "--batch", "8", "--context", "1024",
                 "--generate", "4", "--profile", "a100-80gb"]) == 0
    assert "A100-80GB" in capsys.readouterr().out
    assert main(["simulate", "--profile", "a100-80gb"]) == 2  # neither trace nor model
    assert main(["simulate", "--model", "Llama-3-8B", "--profile", "tpu-v9"]) == 2
    assert "h100-80gb-sxm" in capsys.readouterr().err  # the known ones are listed
    assert main(["simulate", "--model", "Llama-3-8B", "--pooled-fraction", "0.5"]) == 2  # no link


def test_calibration_recovers_known_overheads(tmp_path):
    """A synthetic trace whose steps took the roofline's time plus known overheads: the
    fit finds them (and finds none where there are none)."""
    from speckv.sim.simulate import calibrate

    mech = Mechanisms(weight_bytes=5e6, kv_element_bytes=4, compute_dtype="bfloat16")
    truth = dict(step_overhead_us=900.0, sequence_overhead_us=150.0, token_overhead_us=2.0,
                 kv_token_overhead_us=0.0)
    fitted_hw = hardware.Hardware(**{**HW.as_dict(), **truth, "sources": ("test",)})
    steps = [Step(tokens=b, kv_tokens=b * (100 + i), decode_sequences=b)
             for b in (1, 2, 4, 8, 16, 32) for i in range(5)]
    steps += [Step(tokens=t, prefill_pairs=t * (t + 1) // 2) for t in (64, 256, 1024)]
    meta = {"shape": SHAPE.as_dict(), "weight_bytes": mech.weight_bytes, "kv_element_bytes": 4,
            "dtype": "bfloat16", "page_size": 16}
    lines = [json.dumps({"meta": meta})] + [json.dumps({
        "step": i, "seconds": step_time(SHAPE, fitted_hw, mech, s).total, "tokens": s.tokens,
        "decode": s.decode_sequences, "kv_tokens": s.kv_tokens, "prefill_pairs": s.prefill_pairs})
        for i, s in enumerate(steps)]
    path = tmp_path / "synthetic.jsonl"
    path.write_text("\n".join(lines) + "\n")
    got = calibrate(str(path), HW)
    for name, value in truth.items():
        assert getattr(got, name) == pytest.approx(value, abs=1e-6), name
    assert "calibrated" in got.name and str(path) in got.sources[-1]
