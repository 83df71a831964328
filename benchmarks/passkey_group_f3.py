"""Passkey at 4k: quest (max over the GQA group, as specified) vs two other ways to
aggregate the bound over the group (sum; per-head softmax, then sum), registered here
only. Run: .venv/bin/python benchmarks/passkey_group_f3.py 20"""
import torch, sys
from speckv import LLM
from speckv.selection.base import register_selector, Selector
from speckv.selection.selectors import grouped
from speckv.bench.tasks import passkey_prompt

@register_selector("quest_sum")
class QuestSum(Selector):
    def page_scores(self, inputs):
        s = inputs.summaries(); B, P, Hkv, _, D = s.shape; nq = inputs.q.shape[1]
        q = grouped(inputs.q, Hkv); q = torch.cat([q.clamp(max=0), q.clamp(min=0)], -1)
        rows = s.view(B, P, Hkv, 2 * D)
        b = torch.stack([torch.bmm(rows[:, :, h], q[:, h].transpose(1, 2)) for h in range(Hkv)], 1)
        return b.view(B, Hkv, P, nq, -1).sum(-1).permute(0, 3, 1, 2)

@register_selector("quest_softmax")
class QuestSoft(Selector):  # per query head softmax-normalized bound, summed over the group
    def page_scores(self, inputs):
        s = inputs.summaries(); B, P, Hkv, _, D = s.shape; nq = inputs.q.shape[1]
        q = grouped(inputs.q, Hkv); q = torch.cat([q.clamp(max=0), q.clamp(min=0)], -1)
        rows = s.view(B, P, Hkv, 2 * D)
        b = torch.stack([torch.bmm(rows[:, :, h], q[:, h].transpose(1, 2)) for h in range(Hkv)], 1)
        b = (b / D ** 0.5).softmax(2)
        return b.view(B, Hkv, P, nq, -1).sum(-1).permute(0, 3, 1, 2)

llm = LLM(max_model_len=4096, device_kv_bytes="512MiB")
e = llm.engine
g = torch.Generator().manual_seed(2026)
configs = [("quest", 512), ("quest_sum", 512), ("quest_softmax", 512), ("quest", 256), ("quest_sum", 256), ("quest_softmax", 256)]
acc = {c: 0 for c in configs}
n = int(sys.argv[1])
for t in range(n):
    depth = 0.1 + 0.8 * t / max(1, n - 1)
    key = str(int(torch.randint(10000, 100000, (1,), generator=g)))
    prompt, ans = passkey_prompt(e.tokenizer, 4096, depth, key)
    last, lg = e.score_continuation(prompt, ans, configs)
    for c, l in zip(configs, lg):
        acc[c] += int(int(last.argmax()) == ans[0] and l[:-1].argmax(-1).tolist() == ans[1:])
    print(t, acc, flush=True)
