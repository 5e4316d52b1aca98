"""The `validate` stage end to end: the good mix passes and writes its result JSON and Data Docs; a bad mix makes
`orca8k validate` exit 1 after writing them; Data Docs list every check with the status of the result JSON (HTML
parsed, and in headless Chromium when it is installed); dvc.yaml's stage lists exactly its inputs, code and params."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures.common import REPO, run_cli
from tests.fixtures.validation import chat_row, data_docs_statuses, good_mix, validate_config

SRC = REPO / "src"


def _pages(docs: Path) -> dict[str, Path]:
    """`{batch: validation page}` (GX names a page `<datasource>-<batch>.html`; the datasource is `orca8k`)."""
    pages = {}
    for page in (docs / "validations").rglob("*.html"):
        assert page.name.startswith("orca8k-"), page
        pages[page.name[len("orca8k-") : -len(".html")]] = page
    return pages


def _assert_docs_match(result: dict, docs: Path) -> None:
    """Every batch of the result JSON has a page listing each of its checks with the same status."""
    pages = _pages(docs)
    assert set(pages) == set(result["batches"])
    index = (docs / "index.html").read_text()
    for batch in result["batches"]:
        expected = {c["check"]: c["success"] for c in result["checks"] if c["batch"] == batch}
        assert data_docs_statuses(pages[batch].read_text()) == expected, batch
        assert batch in index


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    from orca8k.stages.validate import run

    root = tmp_path_factory.mktemp("good")
    cfg = validate_config(root)
    mix = good_mix()
    mix.write(root / "artifacts" / "mix")
    return cfg, run(cfg)


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """`orca8k validate` (a subprocess, as DVC runs it) on a mix with three faults."""
    root = tmp_path_factory.mktemp("bad")
    mix = good_mix()
    mix.find("train", "orca-chat:c1")["messages"][1]["role"] = "user"  # user, user
    mix.rows["val"] = [r for r in mix.rows["val"] if r["source"] != "red_pajama"]  # an empty source/split
    mix.rows["val"].append(chat_row("orca-chat", "c0", mix.find("train", "orca-chat:c0")["messages"]))  # leak
    mix.recount_manifest()
    mix.manifest["sources"]["orca-chat"]["val"]["chunks"] = 3
    mix.manifest["sources"]["red_pajama"]["val"]["chunks"] = 0
    mix.write(root / "artifacts" / "mix")
    proc = run_cli("validate", "--set", f"paths.root={root}", cwd=REPO, check=False)
    return root, proc


def test_the_good_mix_passes_and_writes_its_outputs(good_run):
    from orca8k.layout import Layout

    cfg, result = good_run
    layout = Layout.from_config(cfg)
    assert result.outputs == {"validation_result": layout.validation_result, "data_docs": layout.data_docs / "index.html"}
    data = json.loads(layout.validation_result.read_text())
    assert data["success"] is True and data["failures"] == []
    assert data["run_id"] == result.summary["run_id"] and data["run_id"].startswith("mix-")
    assert data["statistics"]["evaluated_checks"] == len(data["checks"]) == result.summary["checks"]
    assert all(c["success"] for c in data["checks"])
    assert data["rows"] == {"orca-chat": {"train": 8, "val": 2}, "fanfics": {"train": 4, "val": 2},
                            "red_pajama": {"train": 2, "val": 2}}
    assert set(data["special_tokens"]) == set(cfg.data.sources)
    assert set(data["inputs"]) == {"train.parquet", "val.parquet", "manifest.json"}
    assert data["params"]["data.sources.red_pajama.fraction"] == 0.25
    assert data["params"]["validate"]["max_duplicate_fraction"] == cfg.validate_.max_duplicate_fraction
    assert data["data_docs"] == "data_docs/index.html"
    # every check of the issue runs on every source and split
    for source in cfg.data.sources:
        for split in ("train", "val"):
            assert {"min_rows", "id_not_null", "doc_id_not_empty", "duplicate_rate"} <= {
                c["check"] for c in data["checks"] if c["batch"] == f"{source}.{split}"
            }


def test_good_data_docs_list_every_check_as_passed(good_run):
    from orca8k.layout import Layout

    cfg, _ = good_run
    layout = Layout.from_config(cfg)
    _assert_docs_match(json.loads(layout.validation_result.read_text()), layout.data_docs)


def test_a_bad_mix_exits_1_after_writing_the_result_and_names_what_failed(bad_run):
    root, proc = bad_run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ValidationFailed" in proc.stderr
    for text in ("orca-chat.train: roles_alternate", "user,user", "orca-chat:c1", "red_pajama.val: min_rows",
                 "all: doc_in_one_split", "Data Docs:"):
        assert text in proc.stderr, text
    data = json.loads((root / "reports" / "validation" / "result.json").read_text())
    assert data["success"] is False
    failing = {(f["batch"], f["check"]) for f in data["failures"]}
    assert {("orca-chat.train", "roles_alternate"), ("red_pajama.val", "min_rows"), ("all", "doc_in_one_split"),
            ("all", "id_unique"), ("all", "chunk_unique")} <= failing
    roles = next(f for f in data["failures"] if f["check"] == "roles_alternate")
    assert roles["examples"] == [{"roles": "user,user,user,assistant", "id": "orca-chat:c1"}]
    leak = next(f for f in data["failures"] if f["check"] == "doc_in_one_split")
    assert {e["id"] for e in leak["examples"]} == {"orca-chat:c0"} and leak["unexpected_count"] == 2


def test_bad_data_docs_list_every_check_with_its_status(bad_run):
    root, _ = bad_run
    docs = root / "reports" / "validation" / "data_docs"
    result = json.loads((root / "reports" / "validation" / "result.json").read_text())
    _assert_docs_match(result, docs)
    statuses = data_docs_statuses(_pages(docs)["orca-chat.train"].read_text())
    assert statuses["roles_alternate"] is False and statuses["min_rows"] is True


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_data_docs_render_in_headless_chromium(bad_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (CI installs Debian's chromium); the HTML is parsed in the tests above")
    root, _ = bad_run
    docs = root / "reports" / "validation" / "data_docs"
    result = json.loads((root / "reports" / "validation" / "result.json").read_text())
    page = _pages(docs)["orca-chat.train"]
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = {c["check"]: c["success"] for c in result["checks"] if c["batch"] == "orca-chat.train"}
    assert data_docs_statuses(proc.stdout) == expected


def test_the_mix_stage_output_of_real_data_passes(realdata, tmp_path):
    """The real mix stage on ../shared/realdata (the three real schemas) gives a mix that passes every check."""
    from orca8k.config import load_config
    from orca8k.stages.mix import run as mix
    from orca8k.stages.validate import run as validate

    cfg = load_config(REPO / "params.yaml", {"paths.root": str(tmp_path), "paths.data": str(realdata)})
    mix(cfg)
    result = validate(cfg)
    data = json.loads(result.outputs["validation_result"].read_text())
    assert data["success"] is True, data["failures"]
    assert data["rows"]["orca-chat"] == {"train": 180, "val": 45}
    assert all(data["rows"][s]["train"] > 0 and data["rows"][s]["val"] > 0 for s in cfg.data.sources)


def test_missing_mix_names_the_file(tmp_path):
    from orca8k.errors import StageInputMissing
    from orca8k.stages.validate import run

    with pytest.raises(StageInputMissing, match="train.parquet: not found; run `orca8k mix` first"):
        run(validate_config(tmp_path))


# ----------------------------------------------------------------------------------------------------- dvc.yaml
def test_dvc_stage_lists_exactly_its_inputs_code_and_params():
    """test_dvc_contract checks that deps cover the code; here: nothing more (so no unrelated edit reruns it)."""
    from orca8k.config import load_config
    from orca8k.stages.validate import params_read
    from tests.test_dvc_contract import INFRA, closure

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["validate"]
    assert stage["params"] == params_read(load_config(REPO / "params.yaml"))
    code = {d for d in stage["deps"] if d.startswith("src/")}
    needed = {f for f in closure(SRC / "orca8k" / "stages" / "validate.py") if f.relative_to(SRC).as_posix() not in INFRA}
    needed |= set((SRC / "orca8k" / "validation").rglob("*.css"))  # inlined into Data Docs
    assert code == {f.relative_to(REPO).as_posix() for f in needed}
    assert [d for d in stage["deps"] if not d.startswith("src/")] == [
        "${paths.mix}/train.parquet", "${paths.mix}/val.parquet", "${paths.mix}/manifest.json"
    ]
    assert stage["outs"] == ["${paths.validation}"]
