"""The shared GX harness (orca8k.validation.harness/report): the empty-batch guard, raised expectations, example
ids, the content-addressed run id, the result JSON and the failure summary. Suites here are tiny and local."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from orca8k.errors import ValidationFailed
from orca8k.validation import Batch, Check, Suite, run_validation


def _suite(min_value: int = 1, min_rows: int | None = 1) -> Suite:
    import great_expectations.expectations as gxe

    return Suite(
        "t.numbers",
        (
            Check("x_min", gxe.ExpectColumnValuesToBeBetween(column="x", min_value=min_value), f"x ≥ {min_value}"),
            Check("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id"), "ids are unique"),
        ),
        min_rows=min_rows,
    )


def _frame(xs: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"row{i}" for i in range(len(xs))], "x": xs})


def test_an_empty_batch_fails_min_rows_where_column_checks_pass_vacuously():
    empty = pd.DataFrame({"id": pd.Series([], dtype=object), "x": pd.Series([], dtype=float)})
    report = run_validation([Batch("empty", _suite(), empty)], run_name="t", data_docs_dir=None)
    assert not report.success
    assert report.check("empty", "min_rows").success is False
    assert report.check("empty", "min_rows").observed_value == 0
    assert report.check("empty", "x_min").success is True  # why the guard exists
    assert [c.check for c in report.checks] == ["min_rows", "x_min", "id_unique"]


def test_min_rows_none_opts_out_of_the_guard():
    report = run_validation([Batch("b", _suite(min_rows=None), _frame([1]))], run_name="t", data_docs_dir=None)
    assert [c.check for c in report.checks] == ["x_min", "id_unique"] and report.success


def test_failing_rows_are_reported_with_ids_values_and_exact_counts():
    df = _frame([5, 0, 3, -1, 0, 0, 0, 0])
    report = run_validation([Batch("b", _suite(), df)], run_name="t", data_docs_dir=None, max_examples=3)
    x = report.check("b", "x_min")
    assert (x.success, x.element_count, x.unexpected_count) == (False, 8, 6)
    assert x.unexpected_percent == pytest.approx(75.0)
    assert x.examples == [{"x": 0, "id": "row1"}, {"x": -1, "id": "row3"}, {"x": 0, "id": "row4"}]
    assert report.check("b", "id_unique").success
    assert [c.check for c in report.failures()] == ["x_min"]


def test_a_missing_column_is_a_failure_with_the_error():
    report = run_validation([Batch("b", _suite(), pd.DataFrame({"id": ["a"]}))], run_name="t", data_docs_dir=None)
    x = report.check("b", "x_min")
    assert not x.success and x.error and "x" in x.error


def test_a_suite_is_shared_by_several_batches():
    suite = _suite()
    report = run_validation(
        [Batch("train", suite, _frame([1, 2])), Batch("val", suite, _frame([0]))], run_name="t", data_docs_dir=None
    )
    assert report.batches == {
        "train": {"suite": "t.numbers", "rows": 2, "success": True},
        "val": {"suite": "t.numbers", "rows": 1, "success": False},
    }


def test_the_run_id_is_content_addressed():
    def run_id(xs, min_value=1, name="b"):
        return run_validation([Batch(name, _suite(min_value), _frame(xs))], run_name="t", data_docs_dir=None).run_id

    first = run_id([1, 2, 3])
    assert first.startswith("t-") and len(first) == len("t-") + 16
    assert run_id([1, 2, 3]) == first
    assert len({first, run_id([1, 2, 4]), run_id([1, 2, 3], min_value=2), run_id([1, 2, 3], name="c")}) == 4


def test_a_deferred_batch_is_produced_in_its_turn_and_hashed_by_its_fingerprint():
    calls: list[str] = []

    def later() -> pd.DataFrame:
        calls.append("produced")
        return _frame([0, 5])

    def run(fingerprint: str, xs: list[int] = (1, 2)):
        calls.clear()
        return run_validation([Batch("now", _suite(), _frame(list(xs))),
                               Batch("later", _suite(), later, fingerprint=fingerprint)], run_name="t", data_docs_dir=None)

    report = run("plan-a")
    assert calls == ["produced"]  # called once
    assert (report.check("now", "x_min").success, report.check("later", "x_min").success) == (True, False)
    assert report.check("later", "x_min").examples == [{"id": "row0", "x": 0}]
    assert report.batches["later"]["rows"] == 2
    # the run id hashes the fingerprint, not the frame (it is needed before the frame exists)
    assert run("plan-a").run_id == report.run_id
    assert len({report.run_id, run("plan-b").run_id, run("plan-a", xs=(1, 3)).run_id}) == 3
    with pytest.raises(ValueError, match="needs a fingerprint"):
        Batch("later", _suite(), later)


def test_result_json_summary_and_failure(tmp_path):
    report = run_validation([Batch("b", _suite(), _frame([1, 0]))], run_name="t", data_docs_dir=None)
    path = report.write_json(tmp_path / "out" / "result.json", extra={"special": {"n": 1}})
    data = json.loads(path.read_text())
    assert (data["success"], data["run_id"]) == (False, report.run_id)
    assert data["statistics"] == {"batches": 1, "evaluated_checks": 3, "successful_checks": 2, "unsuccessful_checks": 1}
    assert [(f["batch"], f["check"], f["examples"]) for f in data["failures"]] == [
        ("b", "x_min", [{"x": 0, "id": "row1"}])
    ]
    assert data["special"] == {"n": 1} and data["data_docs"] is None
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(ValueError, match="collides"):
        report.to_json_dict(extra={"success": True})

    summary = report.summary()
    assert summary.splitlines()[0] == f"validation {report.run_id}: FAILED — 2/3 checks passed on 1 batches"
    assert "b: x_min — x ≥ 1; 1 of 2 rows fail (50.00 %); e.g. {\"x\": 0, \"id\": \"row1\"}" in summary
    with pytest.raises(ValidationFailed, match="the numbers failed validation") as err:
        report.raise_for_failure("the numbers")
    assert "row1" in str(err.value)
    ok = run_validation([Batch("b", _suite(), _frame([1]))], run_name="t", data_docs_dir=None)
    ok.raise_for_failure("the numbers")  # no error


def test_data_docs_are_rebuilt_from_scratch(tmp_path):
    from tests.fixtures.validation import data_docs_statuses

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "stale.html").write_text("old")
    report = run_validation([Batch("b", _suite(), _frame([1, 0]))], run_name="t", data_docs_dir=docs)
    assert not (docs / "stale.html").exists()
    assert report.data_docs_index == docs / "index.html" and report.data_docs_index.is_file()
    page = docs / report.data_docs_pages["b"]
    assert data_docs_statuses(page.read_text()) == {"min_rows": True, "x_min": False, "id_unique": True}
    assert json.loads(json.dumps(report.to_json_dict(relative_to=tmp_path)))["data_docs"] == "docs/index.html"


def test_names_are_checked():
    import great_expectations.expectations as gxe

    check = Check("a", gxe.ExpectColumnValuesToNotBeNull(column="x"), "x")
    with pytest.raises(ValueError, match="duplicate check names"):
        Suite("s", (check, check))
    with pytest.raises(ValueError, match="adds the check 'min_rows'"):
        Suite("s", (Check("min_rows", check.expectation, "x"),))
    with pytest.raises(ValueError, match="no '/'"):
        Batch("a/b", Suite("s", (check,)), _frame([1]))
    with pytest.raises(ValueError, match="duplicate batch names"):
        run_validation([Batch("a", Suite("s", (check,)), _frame([1]))] * 2, run_name="t", data_docs_dir=None)


def test_basic_format_first_and_summary_only_for_a_failing_batch(monkeypatch):
    """A passing batch runs once (BASIC); a failing one again with SUMMARY and its id column. The result JSON equals
    the one of SUMMARY alone, passing and failing batches alike."""
    import great_expectations as gx

    import orca8k.validation.harness as harness

    def run(formats: list | None = None, summary_only: bool = False):
        real_run, real_format = gx.ValidationDefinition.run, harness._result_format

        def spy(self, **kwargs):
            formats.append((self.name, kwargs["result_format"]["result_format"],
                            kwargs["result_format"].get("unexpected_index_column_names")))
            return real_run(self, **kwargs)

        with monkeypatch.context() as m:
            if formats is not None:
                m.setattr(gx.ValidationDefinition, "run", spy)
            if summary_only:
                m.setattr(harness, "_result_format", lambda failed, batch, n: real_format(True, batch, n))
            batches = [Batch("good", _suite(), _frame([1, 2])), Batch("bad", _suite(), _frame([1, 0, -1]))]
            report = run_validation(batches, run_name="t", data_docs_dir=None, max_examples=2)
        return report.to_json_dict()

    formats: list = []
    two_pass = run(formats)
    assert formats == [("good", "BASIC", None), ("bad", "BASIC", None), ("bad", "SUMMARY", ["id"])]
    assert json.dumps(two_pass, sort_keys=True) == json.dumps(run(summary_only=True), sort_keys=True)
    assert [f["examples"] for f in two_pass["failures"]] == [[{"x": 0, "id": "row1"}, {"x": -1, "id": "row2"}]]


def test_data_docs_compile_each_template_once_and_render_the_same_pages(tmp_path, monkeypatch):
    """The site's views share one Jinja bytecode cache per build: each template is compiled once, and the pages
    (custom styles included) are the ones the views render without it."""
    import re

    import jinja2

    import orca8k.validation.harness as harness

    compiled: list[str] = []
    real_compile = jinja2.Environment.compile

    def spy(self, source, name=None, *args, **kwargs):
        if name is not None:  # a template file (GX also compiles strings, which no cache keeps)
            compiled.append(name)
        return real_compile(self, source, name, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "compile", spy)

    def build(folder: str) -> dict[str, str]:
        compiled.clear()
        batches = [Batch("good", _suite(), _frame([1, 2])), Batch("bad", _suite(), _frame([1, 0]))]
        run_validation(batches, run_name="t", data_docs_dir=tmp_path / folder)
        pages = {}
        for page in sorted((tmp_path / folder).rglob("*.html")):
            key = re.sub(r"/\d{8}T\d{6}\.\d+Z/", "/<time>/", page.relative_to(tmp_path / folder).as_posix())
            text = re.sub(r"\d{8}T\d{6}\.\d+Z|\d{4}-\d{2}-\d{2}[T ][\d:.]+(\+00:00|Z)?|_run_time_sort.: [\d.]+|"
                          r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "", page.read_text())
            pages[key] = text
        return pages

    shared = build("shared")
    once = list(compiled)
    assert once and len(once) == len(set(once))  # each template once per build
    assert build("again") == shared and sorted(compiled) == sorted(once)  # emptied per build: compiled again
    monkeypatch.setattr(harness._data_docs_views()["cache"], "dump_bytecode", lambda bucket: None)  # no sharing
    alone = build("alone")
    assert len(compiled) > len(set(compiled)) == len(once)
    assert alone == shared and len(shared) == 4  # the index, the suite, the two batches' results
    assert all("orca8k: inlined" in text for text in shared.values())  # the custom styles on every page
