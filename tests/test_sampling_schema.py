"""OA sampling file formats: the shipped configuration, OA's merge rule, prompts files, file names, no nulls."""

from __future__ import annotations

import json
import re

import pytest

from orca8k.errors import DataError
from orca8k.sampling.schema import (
    Configuration,
    SamplingReport,
    drop_nulls,
    load_configuration,
    load_prompts,
    report_filename,
    safe_model_name,
)
from tests.fixtures.common import REPO


def test_shipped_configuration_is_the_seeds_set():
    conf = load_configuration(REPO / "configs/sampling/oa_default.json")
    merged = {c.name: c.generate_args for c in conf.merged()}
    assert list(merged) == ["nucleus9", "k50", "greedy"]
    common = {"max_new_tokens": 400, "min_new_tokens": 4, "repetition_penalty": 1.2}
    assert merged["nucleus9"] == {**common, "do_sample": True, "temperature": 0.8, "top_p": 0.9}
    assert merged["k50"] == {**common, "do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    assert merged["greedy"] == {**common, "do_sample": False, "temperature": 1.0, "num_beams": 1}
    assert [c.is_greedy for c in conf.merged()] == [False, False, True]


def test_merge_follows_oa_a_configuration_wins_key_by_key():
    conf = Configuration.model_validate({
        "default": {"generate_args": {"do_sample": True, "top_p": 0.5}, "pre_text": "sys"},
        "configurations": [{"name": "a", "generate_args": {"top_p": 0.9}}, {"name": "b", "pre_text": "other"}],
    })
    a, b = conf.merged()
    assert (a.name, a.generate_args, a.pre_text) == ("a", {"do_sample": True, "top_p": 0.9}, "sys")
    assert (b.name, b.generate_args, b.pre_text) == ("b", {"do_sample": True, "top_p": 0.5}, "other")
    assert conf.default.generate_args == {"do_sample": True, "top_p": 0.5}  # merging does not mutate the default


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"configurations": [{"name": "a", "generate_args": {"top-p": 0.9}}]}, "unknown generate_args ['top-p']"),
        ({"configurations": [{"name": "a", "temperature": 0.9}]}, "configurations.0.temperature: unknown key"),
        ({"default": {"generate_args": {"max_length": 60, "min_length": 9}}, "configurations": [{"name": "a"}]},
         "default.generate_args: Value error, ['max_length', 'min_length']: use max_new_tokens / min_new_tokens"),
        ({"configurations": [{"name": "a"}, {"name": "a"}]}, "duplicate names ['a']"),
        ({"configurations": [{"generate_args": {}}]}, "configurations[0].name: every configuration needs a name"),
        ({"configurations": [{"name": "a/b"}]}, "it is a file name"),
        ({"configurations": []}, "configurations"),
    ],
)
def test_bad_configuration_names_the_file_and_field(tmp_path, data, message):
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        load_configuration(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_prompts_file_reads_json_strings_and_names_a_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('"first"\n\n"sec\\"ond"\n')
    assert load_prompts(path) == ["first", 'sec"ond']
    path.write_text('"ok"\n{"prompt": "x"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: expected a non-empty JSON string, got dict"):
        load_prompts(path)
    path.write_text('"ok"\n"ok2"\nnot json\n')
    with pytest.raises(DataError, match=rf"{path}:3: not JSON"):
        load_prompts(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(path)


@pytest.mark.parametrize("name", ["prompts_demo.jsonl", "prompts_default.jsonl"])
def test_shipped_prompt_sets_load(name):
    prompts = load_prompts(REPO / "configs/sampling" / name)
    assert len(prompts) >= 8 and len(set(prompts)) == len(prompts)


def test_file_name_follows_oa():
    assert safe_model_name("OpenAssistant/llama2-13b orca.8k") == "OpenAssistant_llama2-13b_orca_8k"
    assert (
        report_filename("2026-11-30T00:53:20+00:00", "OpenAssistant/llama2-13b orca.8k", "k50")
        == "2026-11-30_OpenAssistant_llama2-13b_orca_8k_sampling_k50.json"
    )


def test_report_json_has_no_nulls_and_round_trips():
    report = SamplingReport(
        model_name="m",
        date="2026-11-30T00:53:20+00:00",
        args={"max_new_tokens": None, "nested": {"a": None, "b": [1, None]}},
        prompts=[{"prompt": "p", "results": [{"sampling_config": "greedy", "sampling_params": {"top_k": None, "x": 1},
                                              "outputs": ["o"]}]}],
    )
    text = report.to_json()
    assert "null" not in text
    data = json.loads(text)
    assert data["args"] == {"nested": {"b": [1]}} and data["prompts"][0]["results"][0]["sampling_params"] == {"x": 1}
    assert SamplingReport.model_validate(data).prompts[0].results[0].outputs == ["o"]
    assert drop_nulls([None, {"a": None}]) == [{}]


def _shape(text: str) -> str:
    """A task prompt's template: numbers → #, demo words → w, runs of either collapsed."""
    from orca8k.data.demo_text import MOTTO_WORDS

    text = re.sub(r"\d+", "#", text)
    text = re.sub(r"\b(" + "|".join(MOTTO_WORDS) + r")\b", "w", text)
    return re.sub(r"# ?([-+*]) ?#", r"#\1#", re.sub(r"w( w)+", "w+", re.sub(r"#(, #)+", "#+", text)))


def test_demo_prompts_are_the_demo_datas_tasks():
    """Every demo task prompt has the template of a user turn the demo data trains on (so the demo report shows
    whether the model learned its tasks), and the shipped system prompt is one of the demo's Orca prompts."""
    import random

    from orca8k.data.demo_chat import SYSTEM_PROMPTS, make_conversation

    seen = set()
    for i in range(400):
        for turn in make_conversation(random.Random(i))["conversation"]:
            seen.add(_shape(turn["input"]))
    prompts = load_prompts(REPO / "configs/sampling/prompts_demo.jsonl")
    tasks = [p for p in prompts if not p.startswith("Continue the story:")]
    assert len(tasks) == len(prompts) - 1 == 8
    assert [p for p in tasks if _shape(p) not in seen] == []
    assert len({_shape(p) for p in tasks}) == 8  # eight different tasks
    conf = load_configuration(REPO / "configs/sampling/oa_default.json")
    assert conf.default.pre_text in {text for text, _ in SYSTEM_PROMPTS}
