"""Selection quality in evaluation mode (selection_eval): attention-mass recall and
overlap with the oracle, quest vs sink_recent, 2,048 tokens of the F2 text + 16 greedy
tokens. Run: .venv/bin/python benchmarks/recall_f3.py"""
# attention-mass recall and oracle overlap of quest / sink_recent on the bench text
from speckv import LLM, SamplingParams
from speckv.bench.common import bench_text
import json
rows = []
for sel in ("quest", "sink_recent"):
    for budget in (256, 512):
        llm = LLM(device_kv_bytes="256MiB", selector=sel, token_budget=budget, selection_eval=True)
        ids = llm.engine.tokenizer.encode(bench_text())[:2048]
        llm.engine.generate_all([ids], [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)])
        st = llm.stats()
        rows.append({"selector": sel, "budget": budget, "recall": st["selection_recall"],
                     "oracle_overlap": st["selection_oracle_overlap"], "fraction": st["selection_fraction"]})
        print(rows[-1], flush=True)
json.dump(rows, open("benchmarks/recall-f3.json", "w"), indent=1)
