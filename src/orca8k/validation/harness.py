"""The shared Great Expectations (1.x) harness: suites of named checks run on pandas batches, one result JSON,
one Data Docs site, one failure summary. The mix suite (`orca8k.validation.mix_suite`) and the token-level suite of
`tokenize` both run through `run_validation`.

How to use it (a token-level suite, say)::

    import great_expectations.expectations as gxe
    from orca8k.validation import Batch, Check, Suite, run_validation

    suite = Suite(
        name="tokens.chat",                         # dots become folders in Data Docs
        checks=(
            Check("supervised_tokens_min", gxe.ExpectColumnValuesToBeBetween(column="supervised_tokens", min_value=1),
                  "every chat example has at least one supervised token"),
            Check("length_max", gxe.ExpectColumnValuesToBeBetween(column="length", max_value=512),
                  "no example exceeds tokenize.max_length = 512 tokens"),
        ),
        min_rows=1,                                  # the harness adds the check `min_rows` (an empty batch fails)
    )
    report = run_validation(
        [Batch("orca-chat.val", suite, stats_df, id_column="id")],   # stats_df: one scalar row per example
        run_name="tokens",
        data_docs_dir=layout.token_validation / "data_docs",       # emptied, then rebuilt
    )
    report.write_json(layout.token_validation / "result.json", extra={...})
    print(report.summary())
    report.raise_for_failure("tokenize")           # ValidationFailed (CLI exit 1) naming checks, batches, ids

Design:
- Prefer built-in expectations on *derived* scalar columns (`n_turns`, `roles`, `text_chars`, ...) computed in pandas
  before validation, over custom expectations: the unexpected values and the ids of failing rows then show in the
  result and in Data Docs. Dataframe columns must be scalars (no lists): the run id hashes them.
- Every check has a stable `name` (rendered in Data Docs as `name: description` and used as the key in the result
  JSON), so a test or a human can find it.
- Vacuous passes: GX passes most column expectations on an empty frame. Every suite gets a `min_rows` check
  (`expect_table_row_count_to_be_between`) unless the suite opts out with `min_rows=None` (for frames built from the
  params, which cannot be empty). A column missing from the frame makes its expectation raise, which counts as a
  failure here.
- Context: an ephemeral GX context (in-memory stores, no `gx/` folder, no analytics, no progress bars) with one Data
  Docs site on a filesystem store (`TupleFilesystemStoreBackend`) at `data_docs_dir`. Each batch has its own
  DataFrame, and a GX `Checkpoint` passes the same `batch_parameters` to all its validation definitions, so each
  batch runs through its own `ValidationDefinition` under one shared `RunIdentifier`, and the site is built once at
  the end (the same pages a Checkpoint's `UpdateDataDocsAction` writes).
- Result format: each batch runs with GX's `BASIC` format, and runs again with `SUMMARY` (failing rows' ids and
  value counts) only when a check failed (`_result_format`): the same results and pages, without computing lists of
  failing rows where there are none.
- The run id is content-addressed: a hash of the suites' expectation configs, the validated frames and the GX
  version. The same data and checks give the same run id and a byte-identical result JSON (so DVC does not rerun
  downstream stages after a no-op re-validation); the wall-clock time lives only in Data Docs.
- A batch may be *deferred*: its `dataframe` a callable, called when the batch's turn comes, so the batches before
  it are validated while another thread still produces it (`tokenize` packs while its examples are checked). The
  run id, needed before the first batch runs, then hashes the batch's `fingerprint` instead of its frame: a key of
  everything the frame is derived from.

Reference: Great Expectations 1.x API (`ValidationDefinition`, `ExpectationSuite`, Data Docs site builder).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.validation.report import CheckResult, ValidationReport, jsonable

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

SITE_NAME = "orca8k"
MIN_ROWS_CHECK = "min_rows"
# plugins folder holding custom_data_docs/styles/data_docs_custom_styles.css: GX inlines it into every page (status
# words beside the icons, which come from a CDN and do not show offline)
PLUGINS_DIR = Path(__file__).resolve().parent / "gx_plugins"


@dataclass(frozen=True)
class Check:
    """One named expectation.

    Args:
        name: stable id, unique within its suite (`roles_alternate`); the key in the result JSON and the first word
            of the Data Docs line.
        expectation: a GX 1.x expectation (`great_expectations.expectations.Expect...`); copied, never mutated.
        description: what is checked, in words, with the bound (`longest message ≤ validate.max_turn_chars = 20000
            chars`). Rendered in Data Docs instead of GX's generated sentence, so put the parameters in it.
    """

    name: str
    expectation: Expectation
    description: str


@dataclass(frozen=True)
class Suite:
    """A named list of checks, shared by every batch validated against it.

    Args:
        name: GX suite name, e.g. `mix.orca-chat`; dots become folders in Data Docs.
        checks: the checks; names must be unique.
        min_rows: the harness prepends the check `min_rows` (`expect_table_row_count_to_be_between(min_rows)`) so an
            empty batch fails instead of passing vacuously; None opts out (a frame that cannot be empty).

    Raises:
        ValueError: duplicate check names, or a check named `min_rows` while the harness adds one.
    """

    name: str
    checks: tuple[Check, ...]
    min_rows: int | None = 1

    def __post_init__(self) -> None:
        names = [c.name for c in self.checks]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {self.name}: duplicate check names {sorted(n for n in names if names.count(n) > 1)}")
        if self.min_rows is not None and MIN_ROWS_CHECK in names:
            raise ValueError(f"suite {self.name}: the harness adds the check {MIN_ROWS_CHECK!r} itself")

    def all_checks(self) -> list[Check]:
        """The checks as run: the `min_rows` guard first (unless opted out), then the suite's own."""
        checks = list(self.checks)
        if self.min_rows is not None:
            import great_expectations.expectations as gxe

            guard = Check(
                MIN_ROWS_CHECK,
                gxe.ExpectTableRowCountToBeBetween(min_value=self.min_rows),
                f"at least {self.min_rows} row(s): an empty batch fails instead of passing vacuously",
            )
            checks.insert(0, guard)
        return checks


@dataclass(frozen=True)
class Batch:
    """One DataFrame validated against one suite.

    Args:
        name: GX data asset name, e.g. `orca-chat.train` (no `/` or `\\`); names Data Docs pages and the summary.
        suite: the suite to run.
        dataframe: scalar columns only (derived columns; no lists); or, for a deferred batch, a callable returning
            it, called once, when the batch's turn comes.
        id_column: column whose values identify failing rows in examples (None: report values only).
        fingerprint: a deferred batch's content key for the run id (required then; ignored otherwise).

    Raises:
        ValueError: a `/` or `\\` in the name, or a deferred batch without a fingerprint.
    """

    name: str
    suite: Suite
    dataframe: pd.DataFrame | Callable[[], pd.DataFrame]
    id_column: str | None = "id"
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if "/" in self.name or "\\" in self.name:
            raise ValueError(f"batch name {self.name!r}: no '/' or '\\' (Data Docs file keys)")
        if self.deferred and not self.fingerprint:
            raise ValueError(f"batch {self.name!r}: a deferred dataframe needs a fingerprint (the run id hashes it)")

    @property
    def deferred(self) -> bool:
        return callable(self.dataframe)


@dataclass
class _Run:
    context: Any
    run_identifier: Any
    pages: dict[str, str] = field(default_factory=dict)


_VIEWS: dict[str, Any] = {}  # `_data_docs_views()`, made on first use


def __getattr__(name: str) -> Any:
    """`PageView`, `IndexPageView`: the site's views, named in its config for GX's `instantiate_class_from_config`
    (made on first use: GX is imported lazily)."""
    if name in ("PageView", "IndexPageView"):
        return _data_docs_views()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _data_docs_views() -> dict[str, Any]:
    """GX's Data Docs page views (`DefaultJinjaPageView`, `DefaultJinjaIndexPageView`) sharing one Jinja bytecode
    cache (`"cache"`), which `run_validation` empties before each build.

    GX gives each view of a site (the expectations, validations and profiling sections, the index) its own Jinja
    environment, so every template was compiled once per view: 54 compiles per token-suite build. With the shared
    cache each is compiled once per build and loaded from its code after (the token suite's build: 0.22 → 0.16 s);
    emptied per build, it costs the same in a fresh process as in a long-lived one.
    """
    if _VIEWS:
        return _VIEWS
    import jinja2
    from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView

    class TemplateCache(jinja2.BytecodeCache):
        def __init__(self) -> None:
            self.code: dict[str, bytes] = {}

        def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            if bucket.key in self.code:
                bucket.bytecode_from_string(self.code[bucket.key])  # Jinja checks the template source's checksum

        def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            self.code[bucket.key] = bucket.bytecode_to_string()

        def clear(self) -> None:
            self.code.clear()

    cache = TemplateCache()

    class SharedTemplates:
        # named parameters: GX's `instantiate_class_from_config` passes only those the signature names
        def __init__(self, custom_styles_directory: str | None = None, custom_views_directory: str | None = None
                     ) -> None:
            super().__init__(custom_styles_directory, custom_views_directory)  # type: ignore[call-arg]
            self.env.bytecode_cache = cache  # type: ignore[attr-defined]

    class PageView(SharedTemplates, DefaultJinjaPageView):
        pass

    class IndexPageView(SharedTemplates, DefaultJinjaIndexPageView):
        pass

    _VIEWS.update(PageView=PageView, IndexPageView=IndexPageView, cache=cache)
    return _VIEWS


def _gx_context(data_docs_dir: Path | None) -> Any:
    """An ephemeral GX context: in-memory stores, no analytics or progress bars, one filesystem Data Docs site."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites: dict[str, Any] = {}
    if data_docs_dir is not None:
        sites[SITE_NAME] = {
            "class_name": "SiteBuilder",
            # GX's default sections and views, the views sharing compiled templates (`_data_docs_views`)
            "site_section_builders": {section: {"view": {"module_name": __name__, "class_name": "PageView"}}
                                      for section in ("expectations", "validations", "profiling")},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                                   "view": {"module_name": __name__, "class_name": "IndexPageView"}},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(data_docs_dir)},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        plugins_directory=str(PLUGINS_DIR),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _gx_expectation(check: Check) -> Expectation:
    exp = copy.deepcopy(check.expectation)
    exp.meta = {**(exp.meta or {}), "check": check.name}
    exp.description = f"{check.name}: {check.description}"
    return exp


def frame_fingerprint(df: pd.DataFrame) -> str:
    """sha256 of a DataFrame's columns, dtypes and values (row order matters), for the content-addressed run id."""
    import pandas as pd

    h = hashlib.sha256(json.dumps([[str(c), str(t)] for c, t in df.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()


def content_run_id(run_name: str, batches: Sequence[Batch], extra: Any = None) -> str:
    """`<run_name>-<16 hex>`: a hash of each batch's name, suite (expectation configs), data (a deferred batch:
    its fingerprint) and the GX version."""
    import great_expectations as gx

    h = hashlib.sha256(f"gx={gx.__version__}".encode())
    for b in batches:
        exps = [_gx_expectation(c).configuration.to_json_dict() for c in b.suite.all_checks()]
        for e in exps:
            e.pop("id", None)
        h.update(json.dumps([b.name, b.suite.name, b.id_column, exps], sort_keys=True, default=str).encode())
        h.update((f"deferred:{b.fingerprint}" if b.deferred else frame_fingerprint(b.dataframe)).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return f"{run_name}-{h.hexdigest()[:16]}"


def _result_format(failed: bool, batch: Batch, max_examples: int) -> dict[str, Any]:
    """GX's result format for a batch's run: `BASIC` first; `SUMMARY` (with the id column's values of the failing
    rows, `unexpected_index_column_names`) when that run failed, so the batch runs again with it.

    A passing check's `BASIC` and `SUMMARY` results hold the same values (observed value, element and unexpected
    counts; no failing rows to list): the result JSON is byte-identical and the Data Docs pages the same as with
    `SUMMARY` alone (checked on the token suite), while the metrics only `SUMMARY` needs (the unexpected index list,
    the value counts) took a quarter of the token suite's check time (0.55 → 0.41 s on `benchmarks/bench_tokenize.py`'s
    10 M tokens). A failing batch pays for both runs.
    """
    result_format: dict[str, Any] = {"result_format": "SUMMARY" if failed else "BASIC",
                                     "partial_unexpected_count": max_examples}
    if failed and batch.id_column:
        result_format["unexpected_index_column_names"] = [batch.id_column]
    return result_format


def _exception_message(exception_info: Any) -> str | None:
    """GX reports a raised expectation either as {raised_exception, exception_message} or keyed by metric id."""
    if not exception_info:
        return None
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    messages = [str(i.get("exception_message")) for i in infos if isinstance(i, dict) and i.get("raised_exception")]
    return "; ".join(messages) or None


def _examples(result: dict[str, Any], id_column: str | None, max_examples: int) -> list[dict[str, Any]]:
    """Failing rows as [{id_column: id, column: value, ...}] (or [{"value": v}] when no id column)."""
    indexed = result.get("partial_unexpected_index_list")
    if indexed and id_column:
        return [jsonable(dict(row)) for row in indexed[:max_examples]]
    values = result.get("partial_unexpected_list") or []
    return [{"value": jsonable(v)} for v in values[:max_examples]]


def _check_result(batch: Batch, check: Check, res: Any, max_examples: int) -> CheckResult:
    cfg = res.expectation_config
    result = dict(res.result or {})
    error = _exception_message(res.exception_info)
    return CheckResult(
        batch=batch.name,
        suite=batch.suite.name,
        check=check.name,
        description=check.description,
        expectation_type=cfg.type,
        kwargs=jsonable({k: v for k, v in cfg.kwargs.items() if k != "batch_id"}),
        success=bool(res.success) and error is None,
        observed_value=jsonable(result.get("observed_value")),
        element_count=result.get("element_count"),
        unexpected_count=result.get("unexpected_count"),
        unexpected_percent=jsonable(result.get("unexpected_percent")),
        examples=_examples(result, batch.id_column, max_examples),
        error=error,
    )


def run_validation(
    batches: Sequence[Batch],
    *,
    run_name: str,
    data_docs_dir: Path | None,
    max_examples: int = 5,
    datasource_name: str = "orca8k",
) -> ValidationReport:
    """Validate each batch against its suite in one GX run, and build the Data Docs site.

    Args:
        batches: the batches, validated in order; names unique. Suites may be shared by several batches (train
            and val, say). A deferred batch's frame is produced when its turn comes (put such batches last).
        run_name: prefix of the run id (`mix`, `tokens`).
        data_docs_dir: folder of the Data Docs site; emptied first (stale pages from an older run would otherwise
            stay). None skips Data Docs (tests of suites alone).
        max_examples: failing rows kept per check (ids and values).
        datasource_name: the GX pandas data source (the first part of each page's batch id).

    Returns:
        The `ValidationReport` (success, content-addressed run id, one `CheckResult` per check and batch, Data
        Docs pages). Nothing is raised for failing checks: call `report.raise_for_failure(...)`.

    Raises:
        ValueError: duplicate batch names.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    names = [b.name for b in batches]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate batch names: {sorted(n for n in names if names.count(n) > 1)}")
    start = time.perf_counter()
    run_id = content_run_id(run_name, batches)
    if data_docs_dir is not None:
        data_docs_dir = Path(data_docs_dir)
        shutil.rmtree(data_docs_dir, ignore_errors=True)
        data_docs_dir.mkdir(parents=True)
    run = _Run(_gx_context(data_docs_dir), RunIdentifier(run_name=run_id, run_time=dt.datetime.now(dt.timezone.utc)))
    ctx = run.context
    source = ctx.data_sources.add_pandas(datasource_name)

    suites: dict[str, Any] = {}
    checks: list[CheckResult] = []
    batch_info: dict[str, dict[str, Any]] = {}
    for batch in batches:
        frame = batch.dataframe() if batch.deferred else batch.dataframe
        suite_checks = batch.suite.all_checks()
        if batch.suite.name not in suites:
            suites[batch.suite.name] = ctx.suites.add(
                gx.ExpectationSuite(name=batch.suite.name, expectations=[_gx_expectation(c) for c in suite_checks])
            )
        batch_definition = source.add_dataframe_asset(batch.name).add_batch_definition_whole_dataframe(batch.name)
        definition = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=batch.name, data=batch_definition, suite=suites[batch.suite.name])
        )
        gx_result = definition.run(batch_parameters={"dataframe": frame}, result_format=_result_format(False, batch,
                                   max_examples), run_id=run.run_identifier)
        if not gx_result.success:  # the failing rows' ids and value counts: only where a check failed
            gx_result = definition.run(batch_parameters={"dataframe": frame}, result_format=_result_format(
                True, batch, max_examples), run_id=run.run_identifier)
        by_name = {c.name: c for c in suite_checks}
        results = {r.expectation_config.meta["check"]: r for r in gx_result.results}
        batch_checks = [_check_result(batch, by_name[n], results[n], max_examples) for n in by_name]  # suite order
        checks.extend(batch_checks)
        batch_info[batch.name] = {
            "suite": batch.suite.name,
            "rows": int(len(frame)),
            "success": all(c.success for c in batch_checks),
        }
        if data_docs_dir is not None:
            key = ValidationResultIdentifier(
                expectation_suite_identifier=ExpectationSuiteIdentifier(name=batch.suite.name),
                run_id=run.run_identifier,
                batch_identifier=gx_result.batch_id,
            )
            # Data Docs title a page with meta.batch_kwargs.data_asset_name, which a dataframe batch lacks: add it,
            # so the train and val pages of one suite say which batch they show
            gx_result.meta["batch_kwargs"] = {"data_asset_name": batch.name}
            ctx.validation_results_store.set(key, gx_result)
            urls = ctx.get_docs_sites_urls(resource_identifier=key, site_name=SITE_NAME, only_if_exists=False)
            if urls and urls[0].get("site_url"):
                run.pages[batch.name] = urls[0]["site_url"]

    timings = {"checks_seconds": time.perf_counter() - start}
    index = None
    if data_docs_dir is not None:
        start = time.perf_counter()
        _data_docs_views()["cache"].clear()  # templates compiled once per build
        ctx.build_data_docs(site_names=[SITE_NAME])
        timings["data_docs_seconds"] = time.perf_counter() - start
        index = data_docs_dir / "index.html"
    return ValidationReport(
        run_id=run_id,
        success=all(c.success for c in checks),
        batches=batch_info,
        checks=checks,
        data_docs_index=index,
        data_docs_pages={n: _relative_page(u, data_docs_dir) for n, u in run.pages.items()} if data_docs_dir else {},
        gx_version=gx.__version__,
        timings=timings,
    )


def _relative_page(url: str, root: Path) -> str:
    """`file:///…/data_docs/validations/x.html` → `validations/x.html` (relative to the site root)."""
    from urllib.parse import unquote, urlparse

    path = Path(unquote(urlparse(url).path))
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
