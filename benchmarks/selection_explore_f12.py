"""F12 exploration: candidate page rankings on the passkey task, before any is built.

Each candidate reads the true keys (needs_keys) and computes from them what a stored
summary would hold, so rankings are compared without building their storage:
  q_*      quest's box over 16 tokens        b8_* / b4_*   boxes over 8 / 4 tokens
  cent_*   q . page mean key (a landmark)    bc_*          half box bound, half centroid
  tok_*    the true max q.k of a page        sparq8_*      8 channels chosen by |q|
  c8_* / c4_*  the best of a page's 8- / 4-token slice centroids
  cs1_* / cs2_*  q . c + 1 or 2 x the keys' spread along q (sqrt(sum q_i^2 var_i))
and each folds the query heads of a GQA group by `max` or by `union` (rank by rank,
speckv.selection.base.union_by_rank's rule).

    .venv/bin/python benchmarks/selection_explore_f12.py CONTEXTS TRIALS BUDGETS NAMES [TASK]
    e.g. 8192 10 64,128 q_max,cent_union,bc_max multikey
"""
import sys, time
import torch
from speckv.selection.base import Selector, SELECTORS
from speckv.kv.attention import grouped

def parts(inputs):
    keys = inputs.keys()
    B, L, Hkv, D = keys.shape
    P, ps = inputs.num_pages, inputs.page_size
    q = grouped(inputs.q, Hkv).to(keys.dtype)  # [B,Hkv,QG,D]
    Q = inputs.q.shape[1]; G = q.shape[2] // Q
    k = keys.view(B, P, ps, Hkv, D)
    own = (inputs.positions // ps)  # [B,Q]
    return keys, k, q, B, P, ps, Hkv, D, Q, G, own

def box_bound(k, q, s):
    B, P, ps, Hkv, D = k.shape
    kk = k.view(B, P, ps // s, s, Hkv, D)
    lo, hi = kk.amin(3), kk.amax(3)  # [B,P,S,Hkv,D]
    b = torch.einsum('bhgd,bpshd->bhgps', q.clamp(min=0), hi) + torch.einsum('bhgd,bpshd->bhgps', q.clamp(max=0), lo)
    return b.amax(-1)  # [B,Hkv,QG,P]

def finish(score, B, Hkv, Q, G, P, how, own):
    score = score.reshape(B, Hkv, Q, G, P)
    page = torch.arange(P)
    invisible = (page >= own[:, :, None])  # [B,Q,P]
    score = score.masked_fill(invisible[:, None, :, None, :], float('-inf'))
    if how == 'max':
        out = score.amax(3)
    elif how == 'union':
        rank = score.argsort(-1, descending=True).argsort(-1).float()  # 0 best
        best = score.amax(3)
        out = -rank.amin(3) + 1e-3 * torch.sigmoid(best)  # ties: by the best score
    elif how == 'soft':  # softmax per head, sum
        out = (score * (inputs_scale[0])).softmax(-1).sum(3)
    return out.permute(0, 2, 1, 3)  # [B,Q,Hkv,P]

inputs_scale = [0.125]

def make(name, fn, how):
    class S(Selector):
        needs_keys = True
        def page_scores(self, inputs):
            keys, k, q, B, P, ps, Hkv, D, Q, G, own = parts(inputs)
            inputs_scale[0] = D ** -0.5
            return finish(fn(k, q), B, Hkv, Q, G, P, how, own)
    S.__name__ = name
    SELECTORS.add(name, S)
    return S

def true_max(k, q):  # per-token max logit (oracle-like by max)
    B, P, ps, Hkv, D = k.shape
    return torch.einsum('bhgd,bpthd->bhgpt', q, k).amax(-1)

def centroid(k, q):
    return torch.einsum('bhgd,bphd->bhgp', q, k.mean(2))

def sparq(r):
    def f(k, q):
        B, P, ps, Hkv, D = k.shape
        # static-ish: channels by |q| summed over group per KV head
        idx = q.abs().sum(2).topk(r, -1).indices  # [B,Hkv,r]
        kk = k.gather(-1, idx[:, None, None].expand(B, P, ps, Hkv, r))
        qq = q.gather(-1, idx[:, :, None].expand(B, Hkv, q.shape[2], r))
        return torch.einsum('bhgd,bpthd->bhgpt', qq, kk).amax(-1)
    return f

def sub_centroid(s):  # centroids of s-token slices of a page, the best slice
    def f(k, q):
        B, P, ps, Hkv, D = k.shape
        c = k.view(B, P, ps // s, s, Hkv, D).mean(3)  # [B,P,S,Hkv,D]
        return torch.einsum('bhgd,bpshd->bhgps', q, c).amax(-1)
    return f

def centroid_spread(a):  # q.c + a * sqrt(sum q_i^2 var_i): mean plus a spread along q
    def f(k, q):
        c, v = k.mean(2), k.var(2, unbiased=False)
        return (torch.einsum('bhgd,bphd->bhgp', q, c)
                + a * torch.einsum('bhgd,bphd->bhgp', q * q, v).clamp(min=0).sqrt())
    return f

def bound_plus_centroid(s, a):
    def f(k, q):
        return a * box_bound(k, q, s) + (1 - a) * centroid(k, q)
    return f

def main():
    contexts = sys.argv[1]; trials = int(sys.argv[2]); budgets = sys.argv[3]; names = sys.argv[4].split(',')
    task = sys.argv[5] if len(sys.argv) > 5 else 'passkey'
    fns = {
        'q_max': (lambda k, q: box_bound(k, q, 16), 'max'),
        'q_union': (lambda k, q: box_bound(k, q, 16), 'union'),
        'q_soft': (lambda k, q: box_bound(k, q, 16), 'soft'),
        'b8_max': (lambda k, q: box_bound(k, q, 8), 'max'),
        'b8_union': (lambda k, q: box_bound(k, q, 8), 'union'),
        'b4_max': (lambda k, q: box_bound(k, q, 4), 'max'),
        'b4_union': (lambda k, q: box_bound(k, q, 4), 'union'),
        'cent_max': (centroid, 'max'),
        'cent_union': (centroid, 'union'),
        'bc_max': (bound_plus_centroid(16, 0.5), 'max'),
        'bc_union': (bound_plus_centroid(16, 0.5), 'union'),
        'b8c_union': (bound_plus_centroid(8, 0.5), 'union'),
        'tok_max': (true_max, 'max'),
        'tok_union': (true_max, 'union'),
        'sparq8_union': (sparq(8), 'union'),
        'sparq16_union': (sparq(16), 'union'),
        'c8_union': (sub_centroid(8), 'union'),
        'c4_union': (sub_centroid(4), 'union'),
        'cs1_union': (centroid_spread(1.0), 'union'),
        'cs2_union': (centroid_spread(2.0), 'union'),
        'sparq8_max': (sparq(8), 'max'),
    }
    for n in names:
        if n in fns:
            make(n, *fns[n])
    from speckv import LLM
    from speckv.bench import selection as bs
    import argparse
    ns = argparse.Namespace(contexts=contexts, trials=trials, seed=2026)
    configs = [('full', 'full', None)] + [(n, n, int(b)) for n in names for b in budgets.split(',')]
    llm = LLM(max_model_len=max(int(c) for c in contexts.split(',')))
    from tqdm import tqdm
    t0 = time.time()
    with tqdm(total=len(contexts.split(','))*trials, file=sys.stderr) as bar:
        rows = bs.run_retrieval(llm.engine, ns, task, configs, bar)
    print(bs.format_report({task: rows}))
    print('elapsed', time.time() - t0)

if __name__ == '__main__':
    main()
