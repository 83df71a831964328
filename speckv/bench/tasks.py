"""Long-context retrieval tasks, RULER-style, generated here (nothing is downloaded).

Each task makes, for a context length, a trial number and a seed, one `Sample`: a
prompt (needles and question included) and the answer greedy decoding should
continue it with, `context` tokens together. The same (task, context, trial, seed)
gives the same sample on every machine (`random.Random` seeded with a string).

    passkey     F3's task, kept as it was measured: a 5-digit key in a repeated
                filler sentence ("The grass is green. ..."), at depths 10%..90%.
    multikey    RULER's niah_multikey_1: four needles "One of the special magic
                numbers for <key> is: <7 digits>." with distinct keys and numbers;
                the question asks for one of them, whose needle sits at depth
                10%..90% (the others at random depths).
    multivalue  RULER's niah_multivalue: four needles with the same key and four
                numbers, the first at half the trial's depth, the others after it;
                the answer is every number, in the order they appear, each scored by
                itself (`Sample.score`).
    vartrack    RULER's variable tracking: "VAR A = 12345." at half the trial's
                depth, then four hops "VAR B = VAR A." ... spread evenly after it;
                the answer names every variable that holds the value, in the order
                of the chain, each scored by itself.

The filler of the last three is the project's public-domain text
(speckv/bench/data), sentence by sentence from a seeded offset (wrapping around);
needles go between sentences. A needle's text occurs in the context (the prompt
before its question) exactly once, and no answer value occurs outside the needles
(`Sample.check`, asserted when a sample is made).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from speckv.bench.common import bench_text

TASKS = ("passkey", "multikey", "multivalue", "vartrack")

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of "
                 "irrelevant text. Find it and memorize it. I will quiz you about it.\n")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure "
              "to memorize them. I will quiz you about the numbers afterwards.\n")
PASSKEY_QUESTION = " What is the pass key? The pass key is"
VT_INTRO = ("Memorize and track the chain of variable assignments hidden in the following "
            "text.\n")

_ADJECTIVES = ("ancient", "bitter", "calm", "daring", "eager", "faint", "gentle", "hollow",
               "icy", "jolly", "keen", "lively", "mellow", "nimble", "odd", "proud", "quiet",
               "rapid", "silent", "tender", "urban", "vivid", "wild", "young", "zealous")
_NOUNS = ("anchor", "badger", "candle", "dolphin", "ember", "falcon", "garden", "harbor",
          "island", "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pebble",
          "quarry", "river", "saddle", "thistle", "valley", "willow", "yarrow", "zephyr")


@dataclass(frozen=True)
class Sample:
    """One trial: `prompt` and `answer` token ids (`context` tokens together), and the
    text to check them by."""

    task: str
    prompt: list[int]
    answer: list[int]
    answer_text: str
    needles: tuple[str, ...]  # each occurs in the context exactly once
    values: tuple[str, ...]  # occur in the context only inside the needles
    depth: float  # of the first needle, in [0, 1] (the one asked about, or the first of several)
    question_tokens: int  # the prompt's last tokens: the question (it may name a value)
    #: [start, end) ranges of `answer` scored one by one (each value of a multi-value
    #: answer; the separators between them are not scored)
    spans: tuple[tuple[int, int], ...]

    def score(self, correct: list[bool]) -> float:
        """The trial's score from whether greedy decoding, teacher-forced on the answer,
        produces each answer token: the fraction of spans produced whole (RULER counts
        the values recalled; teacher forcing fixes their order to the context's)."""
        return sum(all(correct[a:b]) for a, b in self.spans) / len(self.spans)

    def check(self, decode: Callable[[list[int]], str]) -> None:
        """Raises ValueError unless, in the context before the question, every needle
        occurs once and no value occurs outside them."""
        text = decode(self.prompt[:len(self.prompt) - self.question_tokens])
        for needle in self.needles:
            if text.count(needle) != 1:
                raise ValueError(f"{self.task}: needle {needle!r} occurs {text.count(needle)} times")
        rest = text
        for needle in self.needles:
            rest = rest.replace(needle, " ")
        for value in self.values:
            if value in rest:
                raise ValueError(f"{self.task}: {value!r} occurs outside its needles")


def make_sample(task: str, tokenizer, context: int, trial: int, trials: int,
                seed: int = 2026) -> Sample:
    """The `trial`-th of `trials` samples of `task` at `context` tokens.

    Raises:
        ValueError: an unknown task (the known are listed), or a context too short for
            the task's needles and question.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    depth = 0.1 + 0.8 * trial / max(1, trials - 1)
    rng = random.Random(f"{task}/{context}/{trial}/{seed}")
    for attempt in range(20):  # a drawn name that the filler happens to hold: draw again
        sample = _MAKERS[task](tokenizer, context, depth, rng)
        try:
            sample.check(tokenizer.decode)
            return sample
        except ValueError:
            if attempt == 19:
                raise
    raise AssertionError("unreachable")


def passkey_prompt(tokenizer, context: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) totalling `context` tokens, the key at `depth` of the
    filler: F3's passkey task."""
    enc = tokenizer.encode
    intro, filler = enc(PASSKEY_INTRO), enc(PASSKEY_FILLER)
    needle = enc(f" {_passkey_needle(key)} ")
    question = enc(PASSKEY_QUESTION)
    answer = enc(f" {key}")
    room = context - len(intro) - len(needle) - len(question) - len(answer)
    if room < len(filler):
        raise ValueError(f"context {context} is too short for a passkey prompt")
    hay = (filler * (room // len(filler) + 1))[:room]
    cut = int(depth * room)
    return intro + hay[:cut] + needle + hay[cut:] + question, answer


def _passkey(tokenizer, context: int, depth: float, rng: random.Random) -> Sample:
    key = str(rng.randrange(10000, 100000))
    prompt, answer = passkey_prompt(tokenizer, context, depth, key)
    return Sample("passkey", prompt, answer, f" {key}", (_passkey_needle(key),), (key,), depth,
                  len(tokenizer.encode(PASSKEY_QUESTION)), ((0, len(answer)),))


def _passkey_needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _multikey(tokenizer, context: int, depth: float, rng: random.Random) -> Sample:
    keys = _distinct(rng, 4, lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}")
    values = _distinct(rng, 4, lambda: str(rng.randrange(1_000_000, 10_000_000)))
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    depths = [depth] + [rng.random() for _ in keys[1:]]
    question = (f" What is the special magic number for {keys[0]} mentioned in the provided "
                f"text? The special magic number for {keys[0]} mentioned in the provided text is:")
    return _assemble("multikey", tokenizer, context, NIAH_INTRO, list(zip(depths, needles)),
                     question, [values[0]], ",", values, depth, rng)


def _multivalue(tokenizer, context: int, depth: float, rng: random.Random) -> Sample:
    key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    values = _distinct(rng, 4, lambda: str(rng.randrange(1_000_000, 10_000_000)))
    first = depth * 0.5  # the first value there, the others after it: in order of depth
    depths = [first] + sorted(first + (1 - first) * rng.random() for _ in values[1:])
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    question = (f" What are all the special magic numbers for {key} mentioned in the provided "
                f"text? The special magic numbers for {key} mentioned in the provided text are:")
    return _assemble("multivalue", tokenizer, context, NIAH_INTRO, list(zip(depths, needles)),
                     question, values, ",", values, first, rng)


def _vartrack(tokenizer, context: int, depth: float, rng: random.Random) -> Sample:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = _distinct(rng, 5, lambda: "".join(rng.choice(letters) for _ in range(5)))
    value = str(rng.randrange(10000, 100000))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    # the chain in order, its first link at `depth`, the rest spread after it
    first = depth * 0.5
    depths = [first + (1 - first) * i / len(needles) for i in range(len(needles))]
    question = (f" Question: Find all variables that are assigned the value {value} in the text "
                f"above. Answer: According to the chain of variable assignments in the text "
                f"above, {len(names)} variables are assigned the value {value}, they are:")
    return _assemble("vartrack", tokenizer, context, VT_INTRO, list(zip(depths, needles)),
                     question, names, "", (value, *names), first, rng)


_MAKERS = {"passkey": _passkey, "multikey": _multikey, "multivalue": _multivalue,
           "vartrack": _vartrack}


def _distinct(rng: random.Random, count: int, draw: Callable[[], str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = draw()
        if value not in out and not any(value in o or o in value for o in out):
            out.append(value)
    return out


@lru_cache(maxsize=4)
def _sentences(tokenizer) -> tuple[tuple[int, ...], ...]:
    """The public-domain text as token ids per sentence (each with its leading space)."""
    text = re.sub(r"\s+", " ", bench_text()).strip()
    parts = re.split(r"(?<=[.!?;:])\s+", text)
    return tuple(tuple(tokenizer.encode(" " + p)) for p in parts if p)


def _assemble(task: str, tokenizer, context: int, intro: str, needles: list[tuple[float, str]],
              question: str, answers: list[str], separator: str, values, depth: float,
              rng: random.Random) -> Sample:
    """The prompt: intro, filler with the needles at their depths, question; the answer
    " a1<separator> a2...", each value a scored span."""
    enc = tokenizer.encode
    head, ask = enc(intro), enc(question)
    answer: list[int] = []
    spans = []
    for i, a in enumerate(answers):
        if i and separator:
            answer += enc(separator)
        ids = enc(" " + a)
        spans.append((len(answer), len(answer) + len(ids)))
        answer += ids
    needle_ids = [(d, enc(" " + n)) for d, n in needles]
    room = context - len(head) - len(ask) - len(answer) - sum(len(ids) for _, ids in needle_ids)
    sentences = _sentences(tokenizer)
    if room < 4 * max(len(s) for s in sentences):
        raise ValueError(f"context {context} is too short for a {task} prompt")
    hay: list[tuple[int, ...]] = []
    filled, at = 0, rng.randrange(len(sentences))
    while filled < room:
        s = sentences[at % len(sentences)]
        hay.append(s[:room - filled])
        filled += len(hay[-1])
        at += 1
    ends, total = [], 0  # token offset after each sentence
    for s in hay:
        total += len(s)
        ends.append(total)
    slots: dict[int, list[list[int]]] = {}
    for d, ids in needle_ids:  # before the sentence boundary nearest the depth
        slot = min(range(len(ends) - 1), key=lambda i: abs(ends[i] - d * room))
        slots.setdefault(slot, []).append(ids)
    prompt = list(head)
    for i, s in enumerate(hay):
        prompt += s
        for ids in slots.get(i, []):
            prompt += ids
    prompt += ask
    needles_text = tuple(n for _, n in needles)
    return Sample(task, prompt, answer, separator.join(" " + a for a in answers), needles_text,
                  tuple(values), depth, len(ask), tuple(spans))
