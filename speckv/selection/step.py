"""Page selection inside the engine: per-request choices, per-step plans, counters.

`PageSelection` lives as long as the engine (its config, one instance of each
selector, the counters). For every step it makes a `StepSelection` from each
sequence's choice (the engine's selector and budget, or the request's own), which
the step's attention asks, layer by layer, for the pages each query reads:

    layer < dense_layers, or every sequence `full`  ->  None: dense attention
    otherwise                                       ->  [B, Q, Hkv, P] page mask

Rows whose selector is `full` in a mixed batch get every page (a budget of all
pages), so one vectorized path serves the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection

import torch

from speckv.config import SelectionConfig, parse_token_budget
from speckv.selection.base import (SELECTORS, SelectionInputs, Selector, choose_pages,
                                   page_budget)
from speckv.selection.selectors import page_attention_mass


@dataclass(frozen=True, slots=True)
class Choice:
    """One sequence's selection: a selector name and its token budget."""

    selector: str
    token_budget: int | float


@dataclass(slots=True)
class SelectionCounters:
    """Per layer, cumulative, counted from the masks attention used."""

    num_layers: int
    pages_selected: torch.Tensor = field(init=False)  # [L] (query, KV head, page) triples read
    pages_visible: torch.Tensor = field(init=False)  # [L] what full attention would read
    recall_sum: torch.Tensor = field(init=False)  # [L] attention mass kept (evaluation)
    oracle_overlap_sum: torch.Tensor = field(init=False)  # [L] |S & O| / |O| (evaluation)
    evaluated: torch.Tensor = field(init=False)  # [L] (query, query head) pairs evaluated

    def __post_init__(self) -> None:
        for name in ("pages_selected", "pages_visible", "recall_sum", "oracle_overlap_sum",
                     "evaluated"):
            setattr(self, name, torch.zeros(self.num_layers, dtype=torch.float64))


class PageSelection:
    """The engine's page selection: resolves choices and plans steps."""

    def __init__(self, config: SelectionConfig, num_layers: int, page_size: int,
                 num_kv_heads: int, page_bytes: int, window: int = 0) -> None:
        """`window`: the model's sliding window where contexts can outgrow it (0: none);
        the window is then the selection, and no other is taken."""
        if config.dense_layers > num_layers:
            raise ValueError(f"dense_layers={config.dense_layers} is more than the model's "
                             f"{num_layers} layers")
        if window and config.selection_eval:
            raise ValueError(f"selection_eval over a sliding-window model (window of {window} "
                             "tokens, shorter than the context) is not implemented")
        self.window = window
        self.config = config
        self.num_layers = num_layers
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_page_bytes = page_bytes // num_kv_heads  # K and V of one page, one KV head
        self.default = Choice(config.selector, config.token_budget)
        self.selectors: dict[str, Selector] = {n: SELECTORS.get(n)() for n in SELECTORS.names()}
        self.counters = SelectionCounters(num_layers)
        self._check_selector(config.selector)

    def choice(self, selector: str | None, token_budget: int | float | str | None,
               max_context: int | None = None) -> Choice:
        """A request's choice, its overrides validated.

        Raises:
            ValueError: unknown selector (the known are listed), a zero budget, or a
                token budget above `max_context` (the request's longest context).
        """
        name = self.default.selector if selector is None else selector
        self._check_selector(name)
        budget = self.default.token_budget if token_budget is None else \
            parse_token_budget(token_budget)
        if token_budget is not None and isinstance(budget, int) and max_context is not None \
                and budget > max_context:
            raise ValueError(f"token_budget={budget} is above the request's context of "
                             f"{max_context} tokens (prompt + max_tokens)")
        return Choice(name, budget)

    def _check_selector(self, name: str) -> None:
        """Raises ValueError for a selector this engine cannot run (unknown names listed)."""
        selector = SELECTORS.get(name)
        if self.window and not selector.dense:
            raise ValueError(f"selector {name!r} over a sliding-window model (window of "
                             f"{self.window} tokens, shorter than the context) is not "
                             "implemented: the window is the model's own selection; use "
                             "selector 'full' (or max_model_len <= the window)")
        need = selector.min_slices
        if need > self.config.summary_slices:
            raise ValueError(f"selector {name!r} ranks pages by their slices' mean keys: it "
                             f"needs summary_slices >= {need} (the engine keeps "
                             f"{self.config.summary_slices}; start it with --summary-slices 4)")

    def plan(self, choices: list[Choice], evaluate: bool | None = None) -> "StepSelection | None":
        """The step's selection, or None when every sequence attends every page."""
        evaluate = self.config.selection_eval if evaluate is None else evaluate
        if all(self.selectors[c.selector].dense for c in choices) and not evaluate:
            return None
        return StepSelection(self, choices, evaluate)

    def stats(self) -> dict[str, float | int | list[float]]:
        c = self.counters
        selected, visible = c.pages_selected.sum().item(), c.pages_visible.sum().item()
        out: dict[str, float | int | list[float]] = {
            "selection_selector": self.config.selector,
            "selection_pages_selected": int(selected),
            "selection_pages_visible": int(visible),
            "selection_fraction": selected / visible if visible else 1.0,
            "selection_bytes_read": int(selected * self.head_page_bytes),
            "selection_bytes_full": int(visible * self.head_page_bytes),
            "selection_fraction_per_layer":
                (c.pages_selected / c.pages_visible.clamp(min=1)).tolist(),
        }
        if c.evaluated.sum() > 0:
            n = c.evaluated.clamp(min=1)
            out["selection_recall"] = (c.recall_sum.sum() / c.evaluated.sum()).item()
            out["selection_oracle_overlap"] = (c.oracle_overlap_sum.sum() / c.evaluated.sum()).item()
            out["selection_recall_per_layer"] = (c.recall_sum / n).tolist()
        return out


class StepSelection:
    """The selection of one step: which rows use which selector and budget."""

    def __init__(self, owner: PageSelection, choices: list[Choice], evaluate: bool) -> None:
        self.owner = owner
        self.evaluate = evaluate
        self.groups: dict[Choice, torch.Tensor] = {}
        for row, c in enumerate(choices):
            self.groups.setdefault(c, []).append(row)
        self.groups = {c: torch.tensor(rows) for c, rows in self.groups.items()}
        self.needs_keys = evaluate or any(owner.selectors[c.selector].needs_keys
                                          for c in self.groups)

    def sparse(self, layer: int) -> bool:
        return layer >= self.owner.config.dense_layers

    @property
    def keep_sink(self) -> bool:
        return self.owner.config.keep_sink

    def fused_budget(self, positions: torch.Tensor,
                     kernels: Collection[str]) -> tuple[str, torch.Tensor] | None:
        """The selector and the [B] pages each decode query at `positions` [B] may read,
        when every row uses one selector that declares a fused kernel (`Selector.fused`)
        and `kernels` (the selector names with one) has it, and nothing is evaluated;
        else None (the step scores and chooses through `select`)."""
        if self.evaluate or len(self.groups) != 1:
            return None
        (choice,) = self.groups
        if not self.owner.selectors[choice.selector].fused or choice.selector not in kernels:
            return None
        return choice.selector, page_budget(choice.token_budget, positions,
                                            self.owner.page_size,
                                            self.owner.config.min_context_tokens)

    def count(self, layer: int, masks: torch.Tensor, positions: torch.Tensor) -> None:
        """Counts the pages that a fused kernel selected: masks [B, Q, Hkv, P] for the
        queries at `positions` [B, Q] (all valid)."""
        self._count(layer, masks, positions, torch.ones_like(positions, dtype=torch.bool),
                    None, None, None, None)

    def count_dense(self, layer: int, positions: torch.Tensor) -> None:
        """Counts a dense layer's queries (at `positions`): they read every visible page."""
        o = self.owner
        visible = (positions // o.page_size + 1).sum().item() * o.num_kv_heads
        o.counters.pages_selected[layer] += visible
        o.counters.pages_visible[layer] += visible

    def select(self, layer: int, rows: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor, summaries: Callable[[torch.Tensor], torch.Tensor],
               keys: Callable[[torch.Tensor], torch.Tensor], num_pages: int,
               centroids: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The pages each query of `rows` reads in `layer`.

        Args:
            rows: [B] the rows (step order) these queries belong to.
            q: [B, Q, H, D]; positions, valid: [B, Q] (valid False for padding queries).
            summaries, keys, centroids: row index [b] -> those rows' summaries / dense
                keys / page centroids.

        Returns:
            [B, Q, Hkv, P] bool page mask.
        """
        masks = self._masks(rows, q, positions, summaries, keys, num_pages, centroids)
        self._count(layer, masks, positions, valid, q, summaries, keys, rows)
        return masks

    def predict(self, rows: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
                summaries: Callable[[torch.Tensor], torch.Tensor], num_pages: int,
                centroids: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """What `select` would choose for the queries `q` (e.g. estimated ones), uncounted.
        Selectors that read true keys (the oracle) predict every page."""
        if any(self.owner.selectors[c.selector].needs_keys for c in self.groups):
            return torch.ones(*q.shape[:2], self.owner.num_kv_heads, num_pages, dtype=torch.bool,
                              device=q.device)
        return self._masks(rows, q, positions, summaries, None, num_pages, centroids)

    def _masks(self, rows: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
               summaries: Callable[[torch.Tensor], torch.Tensor],
               keys: Callable[[torch.Tensor], torch.Tensor] | None, num_pages: int,
               centroids: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        o = self.owner
        masks = None
        for choice, members in self.groups.items():
            local = torch.nonzero(torch.isin(rows, members)).flatten()
            if local.numel() == 0:
                continue
            every = local.numel() == rows.numel()
            sub = (lambda t: t) if every else (lambda t: t.index_select(0, local.to(t.device)))
            inputs = SelectionInputs(sub(q), sub(positions), num_pages, o.page_size,
                                     o.num_kv_heads, lambda: summaries(local),
                                     lambda: keys(local))
            if centroids is not None:
                inputs.centroids = lambda: centroids(local)
            mask = self._choose(choice, inputs)
            if every:  # one choice for the whole batch: the usual case
                return mask
            if masks is None:
                masks = torch.zeros(*q.shape[:2], o.num_kv_heads, num_pages, dtype=torch.bool,
                                    device=q.device)
            masks[local.to(q.device)] = mask
        return masks

    def dense_rows(self, num_rows: int) -> torch.Tensor:
        """[B] bool: rows whose selector reads every page (in sparse layers too)."""
        dense = torch.zeros(num_rows, dtype=torch.bool)
        for choice, members in self.groups.items():
            if self.owner.selectors[choice.selector].dense:
                dense[members] = True
        return dense

    def _choose(self, choice: Choice, inputs: SelectionInputs) -> torch.Tensor:
        o = self.owner
        selector = o.selectors[choice.selector]
        if selector.dense:
            pages = torch.full_like(inputs.positions, inputs.num_pages)
            scores = torch.zeros(*inputs.positions.shape, o.num_kv_heads, inputs.num_pages,
                                 device=inputs.q.device)
        else:
            pages = page_budget(choice.token_budget, inputs.positions, o.page_size,
                                o.config.min_context_tokens)
            scores = selector.page_scores(inputs)
        return choose_pages(scores, inputs.positions, pages, o.page_size, o.config.keep_sink)

    def _count(self, layer, masks, positions, valid, q, summaries, keys, rows) -> None:
        c = self.owner.counters
        visible = (positions // self.owner.page_size + 1) * valid  # [B, Q]
        c.pages_selected[layer] += (masks & valid[:, :, None, None]).sum().item()
        c.pages_visible[layer] += visible.sum().item() * self.owner.num_kv_heads
        if self.evaluate:
            self._evaluate(layer, masks, positions, valid, q, summaries, keys)

    def _evaluate(self, layer, masks, positions, valid, q, summaries, keys) -> None:
        """Attention-mass recall of the selection, and its overlap with the oracle's."""
        o, c = self.owner, self.owner.counters
        everyone = torch.arange(q.shape[0])
        inputs = SelectionInputs(q, positions, masks.shape[-1], o.page_size, o.num_kv_heads,
                                 lambda: summaries(everyone), lambda: keys(everyone))
        mass = page_attention_mass(inputs)  # [B, Hkv, Q, G, P]
        sel = masks.permute(0, 2, 1, 3)[:, :, :, None, :]  # [B, Hkv, Q, 1, P]
        recall = (mass * sel).sum(-1)  # [B, Hkv, Q, G]
        ok = valid[:, None, :, None].expand_as(recall)
        c.recall_sum[layer] += recall[ok].sum().item()
        c.evaluated[layer] += ok.sum().item()
        oracle = choose_pages(mass.sum(3).transpose(1, 2), positions,
                              masks.sum(-1).amax(-1), o.page_size, o.config.keep_sink)
        both = (oracle & masks).sum(-1).double() / oracle.sum(-1).clamp(min=1)  # [B, Q, Hkv]
        overlap = both.permute(0, 2, 1)[:, :, :, None].expand_as(recall)
        c.oracle_overlap_sum[layer] += overlap[ok].sum().item()
