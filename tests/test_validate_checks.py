"""One crafted bad mix per check of the mix suite: each trips exactly the listed checks on its batch (the good mix
passes them all, see test_validate_stage.py). Only the batch under test is run, without Data Docs, to stay fast."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.fixtures.validation import MixFixture, chat_row, conversation, mix_schema, text_row, validate_config


def _failing(tmp_path, mix: MixFixture, batch: str, overrides: list[str] | None = None, schema=None) -> set[str]:
    from orca8k.layout import Layout
    from orca8k.validation import run_validation
    from orca8k.validation.mix_suite import build_mix_batches

    cfg = validate_config(tmp_path, overrides)
    layout = Layout.from_config(cfg)
    mix.write(layout.mix, schema=schema)
    batches = build_mix_batches(cfg, layout.mix_train, layout.mix_val, mix.manifest).batches
    chosen = [b for b in batches if b.name == batch]
    assert chosen, f"no batch {batch}: {[b.name for b in batches]}"
    report = run_validation(chosen, run_name="test", data_docs_dir=None)
    return {c.check for c in report.failures()}


def _set(split: str, row_id: str, **values) -> Callable[[MixFixture], None]:
    def mutate(mix: MixFixture) -> None:
        mix.find(split, row_id).update(values)

    return mutate


def _set_message(split: str, row_id: str, index: int, **values) -> Callable[[MixFixture], None]:
    def mutate(mix: MixFixture) -> None:
        mix.find(split, row_id)["messages"][index].update(values)

    return mutate


def _drop(split: str, source: str) -> Callable[[MixFixture], None]:
    def mutate(mix: MixFixture) -> None:
        mix.rows[split] = [r for r in mix.rows[split] if r["source"] != source]
        mix.recount_manifest()

    return mutate


def _copy_content(src: tuple[str, str], dst: tuple[str, str]) -> Callable[[MixFixture], None]:
    def mutate(mix: MixFixture) -> None:
        a, b = mix.find(*src), mix.find(*dst)
        b["messages"], b["text"] = a["messages"], a["text"]

    return mutate


def _manifest(source: str, split: str, key: str, value=None, delete: bool = False) -> Callable[[MixFixture], None]:
    def mutate(mix: MixFixture) -> None:
        entry = mix.manifest["sources"][source][split]
        if delete:
            del entry[key]
        else:
            entry[key] = value

    return mutate


def _doc_in_both_splits(mix: MixFixture) -> None:
    # the val story's chunks claim train story f0 (as chunks 2 and 3, so (doc, chunk) stays unique)
    for i, row in enumerate(r for r in mix.rows["val"] if r["source"] == "fanfics"):
        row.update(doc_id="f0", chunk_index=2 + i)


def _add_row(split: str, *rows: dict) -> Callable[[MixFixture], None]:
    def mutate(mix: MixFixture) -> None:
        mix.rows[split].extend(rows)
        mix.recount_manifest()

    return mutate


C, F, R = "orca-chat", "fanfics", "red_pajama"
CASES = {
    # check under test: (batch, mutation, failing checks expected on that batch, params overrides)
    "min_rows": (f"{R}.val", _drop("val", R), {"min_rows", "duplicate_rate"}, None),  # GX: no unique share of 0 rows
    "id_not_null": (f"{C}.train", _set("train", f"{C}:c3", id=None), {"id_not_null"}, None),
    "id_not_empty": (f"{C}.train", _set("train", f"{C}:c3", id=""), {"id_not_empty"}, None),
    "doc_id_not_null": (f"{F}.train", _set("train", f"{F}:f0:1", doc_id=None), {"doc_id_not_null"}, None),
    "doc_id_not_empty": (f"{F}.train", _set("train", f"{F}:f0:1", doc_id=""), {"doc_id_not_empty"}, None),
    "kind_not_null": (f"{C}.val", _set("val", f"{C}:c8", kind=None), {"kind_not_null"}, None),
    "kind_not_empty": (f"{C}.val", _set("val", f"{C}:c8", kind=""), {"kind_not_empty", "kind_matches_format"}, None),
    "kind_matches_format": (f"{R}.train", _set("train", f"{R}:r0:0", kind="chat"), {"kind_matches_format"}, None),
    "chunk_index_not_null": (f"{F}.val", _set("val", f"{F}:f2:1", chunk_index=None), {"chunk_index_not_null"}, None),
    "chunk_index_zero": (f"{C}.train", _set("train", f"{C}:c0", chunk_index=1), {"chunk_index_zero"}, None),
    "chunk_index_non_negative": (f"{F}.train", _set("train", f"{F}:f1:0", chunk_index=-1),
                                 {"chunk_index_non_negative"}, None),
    "messages_not_null": (f"{C}.train", _set("train", f"{C}:c2", messages=None), {"messages_not_null"}, None),
    "no_text_on_chat_rows": (f"{C}.train", _set("train", f"{C}:c2", text="stray text"), {"no_text_on_chat_rows"},
                             None),
    "roles_alternate": (f"{C}.train", _set_message("train", f"{C}:c1", 1, role="user"), {"roles_alternate"}, None),
    "at_least_one_turn": (f"{C}.val", _set("val", f"{C}:c9", messages=[{"role": "system", "content": "hi"}]),
                          {"at_least_one_turn"}, None),
    "contents_not_null": (f"{C}.train", _set_message("train", f"{C}:c4", 2, content=None), {"contents_not_null"},
                          None),
    "turns_not_empty": (f"{C}.train", _set_message("train", f"{C}:c5", 1, content=""), {"turns_not_empty"}, None),
    "turn_chars_max": (f"{C}.train", _set_message("train", f"{C}:c5", 1, content="x" * 101), {"turn_chars_max"},
                       ["validate.max_turn_chars=100"]),
    "text_not_null": (f"{F}.train", _set("train", f"{F}:f0:0", text=None), {"text_not_null"}, None),
    "no_messages_on_text_rows": (f"{R}.val", _set("val", f"{R}:r20:0", messages=conversation(1)),
                                 {"no_messages_on_text_rows"}, None),
    "text_not_empty": (f"{F}.val", _set("val", f"{F}:f2:0", text=""), {"text_not_empty", "text_chars_within_bounds"},
                       None),
    "text_chars_within_bounds": (f"{F}.train", _set("train", f"{F}:f1:1", text="y" * 65536),
                                 {"text_chars_within_bounds"}, None),
    "duplicate_rate": (f"{C}.train", _copy_content(("train", f"{C}:c0"), ("train", f"{C}:c6")), {"duplicate_rate"},
                       None),
    "source_not_null": ("all", _set("train", f"{R}:r5:0", source=None), {"source_not_null"}, None),
    "source_in_params": ("all", _set("train", f"{R}:r5:0", source="wikipedia"), {"source_in_params"}, None),
    "id_unique": ("all", _set("val", f"{R}:r20:0", id=f"{R}:r0:0"), {"id_unique"}, None),
    "doc_in_one_split": ("all", _doc_in_both_splits, {"doc_in_one_split"}, None),
    "chunk_unique": ("all", _set("train", f"{F}:f0:1", chunk_index=0), {"chunk_unique"}, None),
    "cross_split_duplicates": ("all", _copy_content(("train", f"{R}:r0:0"), ("val", f"{R}:r21:0")),
                               {"cross_split_duplicates"}, None),
    "manifest_lists_split": ("manifest", _manifest(F, "val", "rows", delete=True),
                             {"manifest_lists_split", "manifest_rows_match"}, None),
    "manifest_rows_match": ("manifest", _manifest(C, "train", "rows", 9), {"manifest_rows_match"}, None),
    "manifest_available_rows": ("manifest", _manifest(R, "train", "chunks", delete=True),
                                {"manifest_available_rows"}, None),
    # 4 of 8 rows = 0.5 for a fraction of 0.25: beyond one row of rounding
    "train_fraction": ("manifest", _add_row("train", text_row(R, "r9", 0, "a row too many"),
                                            text_row(R, "r10", 0, "another row too many")), {"train_fraction"}, None),
    "val_size": ("manifest", lambda mix: None, {"val_size"}, [f"data.sources.{C}.max_val_set=1"]),  # 2 rows > cap 1
}


@pytest.mark.parametrize("check", sorted(CASES))
def test_a_crafted_bad_mix_trips_exactly_its_check(tmp_path, mix_fixture, check):
    batch, mutate, expected, overrides = CASES[check]
    assert check in expected
    mutate(mix_fixture)
    assert _failing(tmp_path, mix_fixture, batch, overrides) == expected


def test_every_check_of_the_mix_suite_has_a_bad_fixture():
    """No check without a test that trips it (schema checks are tested below)."""
    from orca8k.config import load_config
    from orca8k.validation.mix_suite import global_suite, manifest_suite, source_suite
    from tests.fixtures.common import REPO

    cfg = load_config(REPO / "params.yaml")
    suites = [global_suite(cfg), manifest_suite(cfg.validate_)]
    suites += [source_suite(n, s, cfg.validate_) for n, s in cfg.data.sources.items()]
    names = {c.name for s in suites for c in s.all_checks()}
    assert names == set(CASES)


def test_schema_checks_trip_on_a_missing_column_and_on_a_wrong_type(tmp_path, mix_fixture):
    import pyarrow as pa

    schema = mix_schema()
    no_chunk_index = schema.remove(schema.get_field_index("chunk_index"))
    assert _failing(tmp_path / "a", mix_fixture, "schema.train", schema=no_chunk_index) == {
        "column_present",
        "column_type",
    }
    int64_chunks = schema.set(schema.get_field_index("chunk_index"), pa.field("chunk_index", pa.int64()))
    assert _failing(tmp_path / "b", mix_fixture, "schema.val", schema=int64_chunks) == {"column_type"}
    large = pa.schema([pa.field(f.name, pa.large_string()) if f.type == pa.string() else f for f in schema])
    assert _failing(tmp_path / "c", mix_fixture, "schema.val", schema=large) == set()  # large_string is a string


@pytest.mark.parametrize(
    ("roles", "ok"),
    [
        (["user", "assistant"], True),
        (["system", "user", "assistant", "user", "assistant"], True),
        (["user", "assistant", "user"], False),  # ends with a user message
        (["assistant", "user"], False),
        (["system", "system", "user", "assistant"], False),
        (["user", "system", "assistant"], False),
        (["user", "assistant", "assistant"], False),
        (["user", "assistant", "tool"], False),
    ],
)
def test_roles_alternate_exactly(tmp_path, mix_fixture, roles, ok):
    row = mix_fixture.find("train", "orca-chat:c1")
    row["messages"] = [{"role": r, "content": f"{r} {i}"} for i, r in enumerate(roles)]
    failing = _failing(tmp_path, mix_fixture, "orca-chat.train")
    assert ("roles_alternate" not in failing) == ok


def test_limits_are_inclusive_and_an_empty_system_prompt_is_allowed(tmp_path, mix_fixture):
    mix_fixture.find("train", "orca-chat:c5")["messages"][1]["content"] = "x" * 100
    mix_fixture.find("train", "orca-chat:c0")["messages"][0]["content"] = ""  # system prompt
    assert _failing(tmp_path, mix_fixture, "orca-chat.train", ["validate.max_turn_chars=100"]) == set()


def test_train_fraction_allows_one_row_of_rounding(tmp_path, mix_fixture):
    mix_fixture.manifest["sources"]["red_pajama"]["train"]["chunks"] = 9  # 2 of 9 = 0.222 for 0.25: floor(2.25)
    assert _failing(tmp_path / "a", mix_fixture, "manifest") == set()
    mix_fixture.manifest["sources"]["red_pajama"]["train"]["chunks"] = 12  # 2 of 12: one row short of 3 is fine
    assert _failing(tmp_path / "b", mix_fixture, "manifest") == set()
    mix_fixture.manifest["sources"]["red_pajama"]["train"]["chunks"] = 16  # 2 of 16: two rows short of 4
    assert _failing(tmp_path / "c", mix_fixture, "manifest") == {"train_fraction"}


def test_a_null_role_is_reported_as_such(tmp_path, mix_fixture):
    from orca8k.layout import Layout
    from orca8k.validation import run_validation
    from orca8k.validation.mix_suite import build_mix_batches

    mix_fixture.find("train", "orca-chat:c3")["messages"][0]["role"] = None
    cfg = validate_config(tmp_path)
    layout = Layout.from_config(cfg)
    mix_fixture.write(layout.mix)
    batches = [b for b in build_mix_batches(cfg, layout.mix_train, layout.mix_val, mix_fixture.manifest).batches
               if b.name == "orca-chat.train"]
    report = run_validation(batches, run_name="test", data_docs_dir=None)
    roles = report.check("orca-chat.train", "roles_alternate")
    assert not roles.success and roles.unexpected_count == 1
    assert roles.examples == [{"id": "orca-chat:c3", "roles": "<null>,assistant"}]


def test_special_token_strings_are_counted_per_source_and_never_fail(tmp_path, mix_fixture):
    from orca8k.layout import Layout
    from orca8k.validation import run_validation
    from orca8k.validation.mix_suite import build_mix_batches

    mix_fixture.find("train", "orca-chat:c2")["messages"][0]["content"] = "forge <|assistant|> a turn <|assistant|></s>"
    mix_fixture.rows["val"].append(chat_row("orca-chat", "c10", conversation(10, system="<|system|> <s>")))
    mix_fixture.find("val", "fanfics:f2:1")["text"] += " the </s> end"
    mix_fixture.manifest["sources"]["orca-chat"]["val"].update(rows=3, chunks=3)
    cfg = validate_config(tmp_path)
    layout = Layout.from_config(cfg)
    mix_fixture.write(layout.mix)
    mix = build_mix_batches(cfg, layout.mix_train, layout.mix_val, mix_fixture.manifest)
    chat, fanfics, red = (mix.special_tokens[s] for s in ("orca-chat", "fanfics", "red_pajama"))
    assert chat["counts"] == {"<|system|>": 1, "<|prompter|>": 0, "<|assistant|>": 2, "<s>": 1, "</s>": 1,
                              "<|prefix_begin|>": 0, "<|prefix_end|>": 0}
    assert (chat["total"], chat["rows_with_special_tokens"], chat["rows"]) == (5, 2, 11)
    assert chat["example_ids"] == ["orca-chat:c2", "orca-chat:c10"]
    assert fanfics["counts"]["</s>"] == 1 and fanfics["total"] == 1 and fanfics["example_ids"] == ["fanfics:f2:1"]
    assert red["total"] == 0 and red["example_ids"] == []
    report = run_validation(mix.batches, run_name="test", data_docs_dir=None)
    assert report.success, report.summary()
