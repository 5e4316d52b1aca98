"""The sampling-report stage end to end on a briefly trained tiny model: OA files (names, schema, no nulls),
effective params, output counts, summary, the HTML page, reproducibility, and `orca8k generate`."""

from __future__ import annotations

import html
import json
import shutil

import pytest

from orca8k.config import load_config
from orca8k.layout import Layout
from orca8k.sampling.loading import load_local_model
from orca8k.sampling.report import sample_reports, summarize, write_report_set
from orca8k.sampling.schema import Configuration, SamplingReport, load_configuration
from tests.fixtures.common import REPO, run_cli
from tests.fixtures.models import make_tiny_llama
from tests.fixtures.sampling import QA
from tests.fixtures.sampling import SYSTEM as FIXTURE_SYSTEM

EPOCH = "1796000000"  # 2026-11-30T00:53:20+00:00
PROMPTS = [q for q, _ in QA[:4]] + ["Is 3 < 5 & 5 > 3? <script>alert(1)</script>"]


def _walk_nulls(node, path="$"):
    if node is None:
        yield path
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_nulls(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_nulls(v, f"{path}[{i}]")


@pytest.fixture()
def run_dir(tmp_path, sampling_model_dir, monkeypatch):
    """A run folder with the fixture model at paths.model, a prompts file and a config using the fixture's system
    prompt; the cwd is the run folder and the report date is fixed."""
    shutil.copytree(sampling_model_dir, tmp_path / "artifacts" / "model")
    conf = json.loads((REPO / "configs/sampling/oa_default.json").read_text())
    conf["default"]["pre_text"] = FIXTURE_SYSTEM
    (tmp_path / "conf.json").write_text(json.dumps(conf))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    return tmp_path


def _config(run_dir, *extra):
    return load_config(REPO / "params.yaml", [
        f"paths.root={run_dir}", "sampling.config_file=conf.json", "sampling.prompts_file=prompts.jsonl",
        "sampling.model_name=tiny/chat model", "sampling.max_new_tokens=12", "sampling.batch_size=3", *extra,
    ])


def test_stage_writes_oa_reports_html_and_summary(run_dir):
    from orca8k.stages.sampling_report import run

    cfg = _config(run_dir)
    layout = Layout.from_config(cfg)
    stale = layout.sampling_reports / "2020-01-01_old_sampling_k50.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    result = run(cfg)

    names = ["nucleus9", "k50", "greedy"]
    files = {n: layout.sampling_reports / f"2026-11-30_tiny_chat_model_sampling_{n}.json" for n in names}
    assert sorted(p.name for p in layout.sampling_reports.iterdir()) == sorted(
        [*(f.name for f in files.values()), "index.html", "summary.json"]
    )  # the stale report is gone
    assert result.outputs == {**files, "summary": layout.sampling_summary, "index": layout.sampling_index}

    reports = {}
    for name, path in files.items():
        data = json.loads(path.read_text())
        assert list(_walk_nulls(data)) == []
        reports[name] = SamplingReport.model_validate(data)  # the OA shape, unknown keys forbidden
        assert data["model_name"] == "tiny/chat model" and data["date"] == "2026-11-30T00:53:20+00:00"
        assert [p["prompt"] for p in data["prompts"]] == PROMPTS
        assert all([r["sampling_config"] for r in p["results"]] == [name] for p in data["prompts"])
        assert data["args"]["seed"] == cfg.seed and data["args"]["max_new_tokens"] == 12

    counts = {n: [len(p.prompts[0].results[0].outputs)] for n, p in reports.items()}
    assert counts == {"nucleus9": [2], "k50": [2], "greedy": [1]}
    params = {n: r.prompts[0].results[0].sampling_params for n, r in reports.items()}
    assert params["nucleus9"]["top_k"] == 50 and params["nucleus9"]["top_p"] == 0.9  # implicit top_k recorded
    assert params["nucleus9"]["temperature"] == 0.8 and params["k50"]["top_p"] == 0.95
    assert "top_k" not in params["greedy"] and params["greedy"]["do_sample"] is False
    for p in params.values():
        assert (p["max_new_tokens"], p["min_new_tokens"], p["repetition_penalty"]) == (12, 4, 1.2)
        assert p["seed"] == cfg.seed and p["dtype"] == "float32" and p["rope_parameters"]["rope_type"] == "default"
        assert p["pre_text"] == FIXTURE_SYSTEM and p["mode"] == "v3" and p["batch_size"] == 3
        assert p["compact_every"] == 8  # params.yaml's: sampled draws depend on it
    assert len(params["k50"]["sample_seeds"]) == 2 and len(params["greedy"]["sample_seeds"]) == 1

    # greedy on the trained model starts with its trained answers (min_new_tokens=4 runs short ones on); the
    # summary counts every output
    greedy = [p.results[0].outputs[0] for p in reports["greedy"].prompts]
    assert all(g.startswith(a) for g, (_, a) in zip(greedy[:4], QA[:4], strict=True))
    summary = json.loads(layout.sampling_summary.read_text())
    assert summary["outputs"] == 5 * (2 + 2 + 1) and summary["files"] == sorted(f.name for f in files.values())
    assert summary["configs"]["greedy"]["outputs"] == 5 and summary["prompts"] == 5
    assert summary["proper_end_rate"] == pytest.approx(
        sum(c["proper_end_rate"] * c["outputs"] for c in summary["configs"].values()) / summary["outputs"], abs=1e-6
    )
    assert summary["configs"]["greedy"]["proper_end_rate"] >= 0.8  # the 4 trained answers end with </s>
    assert result.summary["outputs"] == 25

    page = layout.sampling_index.read_text()
    assert "<script>" not in page and html.escape(PROMPTS[-1]) in page
    for prompt in PROMPTS:
        assert html.escape(prompt) in page
    assert page.count("<th>nucleus9</th>") == page.count("<th>greedy</th>") == len(PROMPTS)
    for f in files.values():
        assert f'href="{f.name}"' in page


def test_same_seed_same_reports(run_dir, tokenizer):
    model = make_tiny_llama(len(tokenizer), context=128)  # random: sampled outputs vary with the seed
    conf = load_configuration(run_dir / "conf.json")
    kw = {"model_name": "m", "max_new_tokens": 6, "batch_size": 2, "date": "2026-11-30T00:53:20+00:00"}
    a = sample_reports(model, tokenizer, conf, PROMPTS[:2], seed=7, **kw)
    b = sample_reports(model, tokenizer, conf, PROMPTS[:2], seed=7, **kw)
    assert {n: r.to_json() for n, r in a.reports.items()} == {n: r.to_json() for n, r in b.reports.items()}

    def outputs(rs, name):
        return [p.results[0].outputs for p in rs.reports[name].prompts]

    # another seed: other samples, the same greedy output; a configuration's outputs do not depend on the others
    others = Configuration(default=conf.default, configurations=[conf.configurations[1], conf.configurations[2]])
    c = sample_reports(model, tokenizer, others, PROMPTS[:2], seed=8, **kw)
    d = sample_reports(model, tokenizer, others, PROMPTS[:2], seed=7, **kw)
    assert outputs(c, "k50") != outputs(a, "k50") and outputs(c, "greedy") == outputs(a, "greedy")
    assert outputs(d, "k50") == outputs(a, "k50")


def test_reports_do_not_depend_on_the_batch_size(run_dir, tokenizer):
    """Every output has its own seed: one prompt at a time gives the same reports as two samples × five prompts in
    batches of 4 or all in one batch; sampled configurations say how they drew."""
    model = make_tiny_llama(len(tokenizer), context=128)
    conf = load_configuration(run_dir / "conf.json")
    kw = {"model_name": "m", "max_new_tokens": 6, "date": "2026-11-30T00:53:20+00:00", "seed": 7}
    runs = {bs: sample_reports(model, tokenizer, conf, PROMPTS, batch_size=bs, **kw) for bs in (1, 4, 16)}

    def outputs(rs):
        return {n: [[r.outputs for r in p.results] for p in rep.prompts] for n, rep in rs.reports.items()}

    assert outputs(runs[1]) == outputs(runs[4]) == outputs(runs[16])
    k50 = outputs(runs[1])["k50"]
    assert all(len(samples[0]) == 2 and samples[0][0] != samples[0][1] for samples in k50)  # two different draws
    params = {n: rep.prompts[0].results[0].sampling_params for n, rep in runs[4].reports.items()}
    assert params["k50"]["sampler"] == params["nucleus9"]["sampler"] == "gumbel_max_per_row"
    assert "sampler" not in params["greedy"]


def test_summary_counts_empty_outputs_and_proper_ends(run_dir, tokenizer, tmp_path):
    model = make_tiny_llama(len(tokenizer), context=128)
    conf = Configuration.model_validate({"configurations": [{"name": "greedy", "generate_args": {"max_new_tokens": 3}}]})
    rs = sample_reports(model, tokenizer, conf, ["a", "b"], model_name="m", date="2026-11-30T00:53:20+00:00")
    gens = [g for per in rs.generations["greedy"] for g in per]
    s = summarize(rs)
    assert s["outputs"] == 2 and s["empty_outputs"] == sum(g.empty for g in gens)
    assert s["proper_end_rate"] == sum(g.ended for g in gens) / 2
    written = write_report_set(rs, tmp_path / "out", summary_path=tmp_path / "out" / "s.json", index_path=tmp_path / "out" / "i.html")
    assert written["greedy"].name == "2026-11-30_m_sampling_greedy.json"


def test_missing_model_is_a_stage_input_error(tmp_path, monkeypatch):
    from orca8k.errors import StageInputMissing
    from orca8k.stages.sampling_report import run

    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "params.yaml", [f"paths.root={tmp_path}"])
    with pytest.raises(StageInputMissing, match=r"artifacts/model: no model here .*run `orca8k train` first"):
        run(cfg)


def test_generate_cli_prints_replies(run_dir):
    model_dir = run_dir / "artifacts" / "model"
    proc = run_cli(
        "generate", "--params", str(REPO / "params.yaml"), "--set", f"paths.root={run_dir}", "--set", "sampling.config_file=conf.json",
        "--model", str(model_dir), "--system", FIXTURE_SYSTEM, "--max-new-tokens", "16",
        QA[0][0], QA[2][0], cwd=run_dir,
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == f"### {model_dir} [greedy] prompt: {QA[0][0]}"
    assert lines[1].startswith(QA[0][1])  # min_new_tokens=4 (the seed's) runs a one-token answer on
    assert lines[3] == f"### {model_dir} [greedy] prompt: {QA[2][0]}" and lines[4] == QA[2][1]


def test_generate_cli_rejects_an_unknown_configuration_before_loading_the_model(run_dir):
    proc = run_cli(
        "generate", "--params", str(REPO / "params.yaml"), "--set", f"paths.root={run_dir}", "--set", "sampling.config_file=conf.json",
        "--model", str(run_dir / "no-such-model"), "--config", "nope", "Hello?", cwd=run_dir, check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--config nope: not in conf.json (have: nucleus9, k50, greedy)" in proc.stderr
    assert "no-such-model" not in proc.stderr  # the model was never looked for


def test_generate_reuses_the_loaded_model(run_dir):
    from orca8k.generate import generate

    cfg = _config(run_dir)
    model, tok = load_local_model(run_dir / "artifacts" / "model", device="cpu")
    qa = [QA[2], QA[3], QA[5]]  # answers longer than min_new_tokens=4
    outs = generate(cfg, model, tok, [q for q, _ in qa], config_name="greedy", max_new_tokens=16)
    assert [o.text for o in outs] == [a for _, a in qa] and all(o.ended for o in outs)
    # without max_new_tokens, sampling.max_new_tokens applies (as in the stage): 5 < the answers' lengths
    short = generate(_config(run_dir, "sampling.max_new_tokens=5"), model, tok, [q for q, _ in qa], config_name="greedy")
    assert [(o.new_tokens, o.ended) for o in short] == [(5, False)] * 3
    with pytest.raises(Exception, match="not in conf.json"):
        generate(cfg, model, tok, ["x"], config_name="beam4")
