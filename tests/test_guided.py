"""Structured output on the bundled model (issue 17, item 3): JSON held to a schema, any
JSON object, a regular expression — greedy and sampled — through the engine and the
server's `response_format`."""

from __future__ import annotations

import json

import pytest

from speckv import SamplingParams
from tests.conftest import assert_no_leak

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}


def chat(llm, question: str, params: SamplingParams):
    return llm.chat([{"role": "user", "content": question}], params, use_tqdm=False)[0]


def assert_person(text: str) -> None:
    person = json.loads(text)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 16
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 150


def test_greedy_output_is_held_to_the_schema(llm):
    question = "Describe a person called Ann who is 31."
    free = chat(llm, question, SamplingParams(temperature=0, max_tokens=48))
    held = chat(llm, question, SamplingParams(temperature=0, max_tokens=48, guided_json=PERSON))
    assert held.finish_reason == "stop"
    assert_person(held.text)
    with pytest.raises(ValueError):  # the model alone does not answer in that JSON
        assert_person(free.text)
    assert_no_leak(llm.engine)


def test_sampled_choices_all_obey(llm):
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=8, n=3, guided_json=PERSON)
    out = chat(llm, "Invent a person.", params)
    for choice in out.outputs:
        assert choice.finish_reason == "stop"
        assert_person(choice.text)


def test_any_json_object_and_a_regex(llm):
    obj = chat(llm, "List two colours.", SamplingParams(temperature=0, max_tokens=40, guided_json=True))
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    else:  # max_tokens first: what there is is a prefix of a JSON object
        assert obj.finish_reason == "length" and obj.text.startswith("{")
    answer = chat(llm, "Is the sea salty?", SamplingParams(temperature=0, max_tokens=8,
                                                           guided_regex="(yes|no)"))
    assert answer.text in ("yes", "no") and answer.finish_reason == "stop"


def test_logprobs_stay_the_models_own_under_a_grammar(llm):
    params = SamplingParams(temperature=0, max_tokens=6, guided_regex="(yes|no)", logprobs=1)
    out = chat(llm, "Is fire cold?", params).outputs[0]
    first = out.token_ids[0]
    assert out.logprobs[0][first].logprob < 0  # not renormalised over the allowed tokens


@pytest.mark.parametrize("bad, named", [
    ({"guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
])
def test_a_format_that_cannot_be_used_is_refused_and_the_engine_goes_on(llm, bad, named):
    with pytest.raises(ValueError, match=named):
        llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, **bad), use_tqdm=False)
    assert llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].finished
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("bad, named", [
    ({"guided_json": "yes"}, "guided_json"), ({"guided_regex": ""}, "guided_regex"),
    ({"guided_json": True, "guided_regex": "a"}, "not both"),
])
def test_bad_format_options_are_refused_by_name(bad, named):
    with pytest.raises(ValueError, match=named):
        SamplingParams(**bad)
