"""Predictors: which pages a coming layer (or the next step) will read.

A predictor is told, layer by layer, what each layer read (`after_read`) and, when
it asks for it, each layer's input (`at_layer_input`); it answers with `Hint`s: a
target layer and a [B, P] page mask over the step's rows. The prefetcher fetches
the hinted pages that are in the pool and not resident, and later checks each hint
against what the target layer really read (precision, recall).

    layer_ahead        after layer l reads: layer l+d's pages — all of them where
                       l+d attends densely, else the pages layer l selected
    step_ahead         after layer l reads: the pages layer l+d selected in the
                       previous step (l+d wraps into the next step); they include the
                       page that was open then (always selected), sealed since
    speculative_query  at layer l's input x: layer l+d's query estimated as
                       RoPE(norm_{l+d}(x) W_q^{l+d}) (InfiniGen), scored against layer
                       l+d's page summaries with the row's own selector and budget
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch

from speckv.registry import Registry


@dataclass(frozen=True, slots=True)
class Hint:
    layer: int  # the target layer
    pages: np.ndarray  # [B, P] bool over the step's rows and pages
    next_step: bool = False  # the target is that layer in the next step


@dataclass(slots=True)
class StepView:
    """What predictors see of the running step."""

    step: int
    request_ids: list[str]
    num_pages: np.ndarray  # [B] pages each row's context has this step
    max_pages: int  # P, the mask width
    num_layers: int
    dense: Callable[[int], np.ndarray]  # layer -> [B] bool: rows that read every page there
    predict: Callable[[int, torch.Tensor], np.ndarray] | None = None  # (layer, x) -> [B, P]
    decode_rows: int = 0  # rows [0, decode_rows) decode one token; the rest prefill
    all_pages: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.all_pages = np.arange(self.max_pages)[None, :] < self.num_pages[:, None]

    def target(self, layer: int, depth: int) -> tuple[int, bool]:
        """The layer `depth` after `layer`, and whether it is in the next step."""
        t = layer + depth
        return (t, False) if t < self.num_layers else (t - self.num_layers, True)


class Predictor(ABC):
    """Guesses the pages of coming layers; one instance per engine."""

    name: ClassVar[str]
    uses_layer_input: ClassVar[bool] = False

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def begin_step(self, view: StepView) -> None:
        """A step starts."""

    def after_read(self, view: StepView, layer: int, read: np.ndarray) -> list[Hint]:
        """`layer` has read the pages `read` [B, P]; hints to issue now."""
        return []

    def at_layer_input(self, view: StepView, layer: int, x: torch.Tensor) -> list[Hint]:
        """`layer` is about to run on `x` [T, hidden] (its decode rows first); hints."""
        return []


PREDICTORS: Registry[type[Predictor]] = Registry("predictor")


@PREDICTORS.register("layer_ahead")
class LayerAhead(Predictor):
    """The next layer's pages: all where it is dense, else this layer's selection."""

    def after_read(self, view: StepView, layer: int, read: np.ndarray) -> list[Hint]:
        target, next_step = view.target(layer, self.depth)
        dense_there = view.dense(target)
        if dense_there.all():
            return [Hint(target, view.all_pages, next_step)]
        source_dense = view.dense(layer)
        pages = np.where(dense_there[:, None], view.all_pages, read & ~source_dense[:, None])
        return [Hint(target, pages, next_step)]


@PREDICTORS.register("step_ahead")
class StepAhead(Predictor):
    """What layer l+d read last step, for this step."""

    def __init__(self, depth: int) -> None:
        super().__init__(depth)
        self._last: dict[int, dict[str, np.ndarray]] = {}  # layer -> rid -> page indices

    def after_read(self, view: StepView, layer: int, read: np.ndarray) -> list[Hint]:
        self._last[layer] = {rid: np.flatnonzero(read[row])
                             for row, rid in enumerate(view.request_ids)}
        target, next_step = view.target(layer, self.depth)
        last = self._last.get(target)
        if last is None:
            return []
        pages = np.zeros_like(view.all_pages)
        for row, rid in enumerate(view.request_ids):
            previous = last.get(rid)
            if previous is None:
                continue
            pages[row, previous[previous < view.max_pages]] = True
        return [Hint(target, pages & view.all_pages, next_step)]

    def begin_step(self, view: StepView) -> None:
        live = set(view.request_ids)  # forget finished requests
        for sets in self._last.values():
            for rid in [r for r in sets if r not in live]:
                del sets[rid]


@PREDICTORS.register("speculative_query")
class SpeculativeQuery(Predictor):
    """InfiniGen-style: layer l+d's selection from its query estimated at layer l's input."""

    uses_layer_input = True

    def at_layer_input(self, view: StepView, layer: int, x: torch.Tensor) -> list[Hint]:
        target, next_step = view.target(layer, self.depth)
        if next_step:  # the next step's input is not known yet
            return []
        dense_there = view.dense(target)
        if dense_there.all() or view.predict is None:
            return [Hint(target, view.all_pages)]
        pages = view.predict(target, x)  # [B, P]; prefill rows: every page
        return [Hint(target, np.where(dense_there[:, None], view.all_pages, pages))]


def make_predictors(names: tuple[str, ...], depth: int, num_layers: int) -> list[Predictor]:
    """Instances of the named predictors.

    Raises:
        ValueError: an unknown name (the known are listed), a depth not below the layer
            count.
    """
    for n in names:
        if n not in PREDICTORS:
            raise ValueError(f"unknown predictor {n!r}; known: none, {', '.join(PREDICTORS.names())}")
    if depth >= num_layers:
        raise ValueError(f"prefetch_depth={depth} must be below the model's {num_layers} layers")
    return [PREDICTORS.get(n)(depth) for n in names]
