"""The long-context retrieval tasks (speckv/bench/tasks.py): deterministic per seed,
the prompt and answer exactly the context, every needle once, the answer only in its
needles, the needle asked about at its depth; and the checks that would catch a bad one."""

from __future__ import annotations

import dataclasses

import pytest

from speckv.bench.tasks import TASKS, Sample, make_sample


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_and_hold_each_needle_once(loaded, task):
    tok = loaded.tokenizer
    for context in (1024, 4096):
        for trial in (0, 7, 19):
            s = make_sample(task, tok, context, trial, 20, seed=11)
            assert s == make_sample(task, tok, context, trial, 20, seed=11)
            assert len(s.prompt) + len(s.answer) == context
            text = tok.decode(s.prompt[:len(s.prompt) - s.question_tokens])
            for needle in s.needles:
                assert text.count(needle) == 1, needle
            for value in s.values:  # nowhere but in the needles
                assert text.count(value) == sum(n.count(value) for n in s.needles), value
            scored = [tok.decode(s.answer[a:b]).strip() for a, b in s.spans]
            assert scored and all(v in s.values for v in scored)
            assert tok.decode(s.answer) == s.answer_text
            if context == 4096:  # the needle asked about at its depth (a sentence's slack)
                assert abs(text.index(s.needles[0]) / len(text) - s.depth) < 0.06, (trial, s.depth)
    again = make_sample(task, tok, 1024, 0, 20, seed=12)
    assert again.prompt != make_sample(task, tok, 1024, 0, 20, seed=11).prompt


def test_depths_spread_over_the_trials_and_keys_differ(loaded):
    tok = loaded.tokenizer
    samples = [make_sample("multikey", tok, 2048, t, 5) for t in range(5)]
    assert [round(s.depth, 2) for s in samples] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert len({s.answer_text for s in samples}) == 5
    mk = samples[0]
    assert len(mk.needles) == 4 and len(set(mk.values)) == 4 and mk.spans == ((0, len(mk.answer)),)
    mv = make_sample("multivalue", tok, 2048, 2, 5)
    assert len(mv.spans) == 4 and mv.answer_text == " " + ", ".join(mv.values)
    vt = make_sample("vartrack", tok, 2048, 2, 5)
    assert len(vt.spans) == 5 and vt.answer_text.split() == list(vt.values[1:])


def test_the_check_catches_a_doubled_needle_and_a_value_in_the_filler(loaded):
    tok = loaded.tokenizer
    s = make_sample("multikey", tok, 1024, 3, 20)
    needle = tok.encode(" " + s.needles[1])
    doubled = dataclasses.replace(s, prompt=needle + s.prompt)
    with pytest.raises(ValueError, match="occurs 2 times"):
        doubled.check(tok.decode)
    leaked = dataclasses.replace(s, prompt=tok.encode(f" {s.values[2]} ") + s.prompt)
    with pytest.raises(ValueError, match=f"'{s.values[2]}' occurs outside its needles"):
        leaked.check(tok.decode)


def test_score_counts_whole_spans():
    s = Sample("multivalue", [1], [5, 6, 7, 8, 9], " a, b", ("n",), ("a", "b"), 0.5, 0,
               ((0, 2), (3, 5)))
    assert s.score([True] * 5) == 1.0
    assert s.score([True, True, False, True, False]) == 0.5  # the separator is not scored
    assert s.score([True, False, True, True, True]) == 0.5


def test_bad_tasks_and_contexts_name_the_problem(loaded):
    with pytest.raises(ValueError, match="unknown task 'haystack'; known: passkey, multikey"):
        make_sample("haystack", loaded.tokenizer, 1024, 0, 1)
    with pytest.raises(ValueError, match="context 200 is too short for a multikey prompt"):
        make_sample("multikey", loaded.tokenizer, 200, 0, 1)
