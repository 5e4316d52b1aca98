"""`orca8k fetch-data`: materialise the hub sources of a params file into its `paths.data`, at pinned revisions.

For each source with a `hub:` entry:

1. resolve `hub.revision` (a branch, tag or sha) to a commit sha — first for every source, so a missing network,
   a wrong id or a gated dataset fails at once, before anything is downloaded;
2. full fetch: find the split's data files through `datasets` (the same resolution `load_dataset` uses) and
   download each at that sha into `paths.data/<source path>/`, byte for byte;
   `--limit N` (a smoke slice): stream the first N rows through `datasets` (nothing downloaded in full) and write
   them, in the source's own schema, to `paths.data/<source path>/part-00000.jsonl`;
3. write `layout.data_snapshot` (`snapshot.json`): per source the hub id, the requested and resolved revision,
   the data files, the limit, and every written file's size and sha256 (no timestamps: the same snapshot gives
   the same bytes, so `dvc add` gives the same hash);
4. print the `dvc add` / `dvc push` step that versions the snapshot.

A gated dataset reads `HF_TOKEN` from the environment (never printed or written). With `HF_HUB_OFFLINE=1` (or
`HF_DATASETS_OFFLINE=1`) or without network, it fails at once naming the source and the offline switch.
A `hub.repo_id` that is a local folder (a mirror, or a test stand-in) is copied the same way, without network.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.data.readers import DATA_SUFFIXES, file_sha256, list_data_files
from orca8k.data.sources import hf_token, iter_hub_rows, offline_switch, source_path
from orca8k.errors import DataError, OfflineError
from orca8k.layout import Layout

if TYPE_CHECKING:
    from orca8k.config import Config, HubSource

SNAPSHOT_VERSION = 1
_NETWORK_ERRORS = ("TransportError", "ConnectError", "ConnectionError", "TimeoutException", "Timeout",
                   "OfflineModeIsEnabled", "LocalEntryNotFoundError")


def fetch_data(cfg: Config, limit: int | None = None) -> dict[str, Any]:
    """Download every hub source of `cfg` into `paths.data` and write the snapshot (see module docstring).

    Args:
        cfg: the params (a recipe: its `paths.data`, e.g. `data-hub/`, not the demo's `data/`).
        limit: rows per source (a smoke slice), or None for the full files.

    Returns:
        The snapshot written to `layout.data_snapshot`.

    Raises:
        DataError: no source has a `hub:` entry; a dataset, revision or file does not exist; a gated dataset
            without access (set HF_TOKEN); `limit` < 1.
        OfflineError: the offline switch is on, or the hub cannot be reached; names the source and the switch.
    """
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit}: expected a positive number of rows")
    layout = Layout.from_config(cfg)
    hubs = {name: src for name, src in cfg.data.sources.items() if src.hub is not None}
    if not hubs:
        raise DataError(
            "no source in these params has a `hub:` entry (the demo's data comes from `orca8k demo-data`); "
            "use --params recipes/llama2-13b-orca-8k.yaml"
        )
    skipped = sorted(set(cfg.data.sources) - set(hubs))
    revisions = {name: resolve_revision(name, src.hub) for name, src in hubs.items()}
    layout.data.mkdir(parents=True, exist_ok=True)
    sources: dict[str, Any] = {}
    for name, src in hubs.items():
        target = source_path(src, layout.data)
        staging = target.with_name(f".{target.name}.fetching")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        hub, sha = src.hub, revisions[name]
        print(f"[fetch-data] {name}: {hub.repo_id}@{hub.revision} → {sha}" + (f" (first {limit} rows)" if limit else ""), flush=True)
        rows = None
        if limit is not None:
            rows = _write_slice(hub, sha, limit, staging / "part-00000.jsonl")
        else:
            for rel in resolve_files(name, hub, sha):
                _download(name, hub, sha, rel, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        files = [
            {"file": p.relative_to(layout.data).as_posix(), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in list_data_files(target)
        ]
        if not files:
            raise DataError(f"source '{name}': {hub.repo_id}@{sha} gave no .json/.jsonl/.parquet files (hub.data_files={hub.data_files})")
        sources[name] = {
            "repo_id": hub.repo_id, "revision_requested": hub.revision, "revision": sha, "data_files": hub.data_files,
            "split": hub.split, "limit": limit, "rows": rows, "path": src.path, "files": files,
        }
        size = sum(f["bytes"] for f in files)
        print(f"[fetch-data] {name}: {len(files)} file(s), {size / 1e6:.1f} MB → {target}", flush=True)
    snapshot = {"format_version": SNAPSHOT_VERSION, "sources": sources, "local_only_sources": skipped}
    layout.data_snapshot.write_text(json.dumps(snapshot, indent=2) + "\n", encoding="utf-8")
    print(f"[fetch-data] wrote {layout.data_snapshot}")
    print(next_steps(layout.data, revisions, cfg))
    return snapshot


def next_steps(data: Path, revisions: dict[str, str], cfg: Config) -> str:
    """The message that tells the user how to version the snapshot (DVC) and pin the revisions."""
    try:
        rel = data.relative_to(Path.cwd())
    except ValueError:
        rel = data
    pins = "\n".join(
        f"    data.sources.{n}.hub.revision: {sha}" for n, sha in revisions.items()
        if sha != "local" and cfg.data.sources[n].hub.revision != sha
    )
    text = (
        "\nNext: version this snapshot with DVC and push it to your remote, so every run uses the same bytes:\n"
        f"  dvc add {rel}\n"
        f"  git add {rel}.dvc .gitignore && git commit -m 'data: hub snapshot'\n"
        "  dvc push\n"
    )
    if pins:
        text += "Pin the resolved revisions in your params file (the snapshot records them too):\n" + pins + "\n"
    return text


def _network_failure(err: BaseException) -> bool:
    return isinstance(err, (OSError, TimeoutError)) or any(c.__name__ in _NETWORK_ERRORS for c in type(err).__mro__)


def resolve_revision(name: str, hub: HubSource) -> str:
    """The commit sha of `hub.revision` (a local folder: `local`).

    Raises:
        OfflineError: the offline switch is on or the hub is unreachable (names the source and the switch).
        DataError: unknown dataset or revision; gated dataset without access.
    """
    if Path(hub.repo_id).expanduser().is_dir():
        return "local"
    switch = offline_switch()
    if switch is not None:
        raise OfflineError(
            f"source '{name}': cannot fetch {hub.repo_id}: {switch}=1 is set (offline mode). Unset {switch} on a "
            f"machine with network, or copy a snapshot into paths.data and run `orca8k mix` offline."
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().dataset_info(hub.repo_id, revision=hub.revision, timeout=15, token=hf_token())
    except GatedRepoError:
        raise DataError(f"source '{name}': {hub.repo_id} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise DataError(f"source '{name}': {hub.repo_id} has no revision {hub.revision!r} (data.sources.{name}.hub.revision)") from None
    except RepositoryNotFoundError:
        raise DataError(f"source '{name}': no dataset {hub.repo_id!r} on the hub (or it is private: set HF_TOKEN)") from None
    except Exception as err:
        if _network_failure(err):
            raise OfflineError(
                f"source '{name}': cannot reach the Hugging Face Hub for {hub.repo_id} ({type(err).__name__}: {err}). "
                f"This command needs network; on an offline machine set HF_HUB_OFFLINE=1 (the offline switch) and "
                f"copy a snapshot into paths.data instead."
            ) from None
        raise
    return str(info.sha)


def resolve_files(name: str, hub: HubSource, sha: str) -> list[str]:
    """Repo-relative paths of the data files of `hub.split` at `sha`, as `datasets` resolves them (`hub.data_files`
    patterns, or the dataset's default configuration).

    Raises:
        DataError: nothing matches.
    """
    root = Path(hub.repo_id).expanduser()
    if root.is_dir():
        files = [p.relative_to(root).as_posix() for p in list_data_files(root)]
        if hub.data_files:
            files = [f for f in files if any(fnmatch.fnmatch(f, pat) for pat in hub.data_files)]
    else:
        import datasets

        builder = datasets.load_dataset_builder(hub.repo_id, revision=sha, data_files=hub.data_files, token=hf_token())
        resolved = (builder.config.data_files or {}).get(hub.split, [])
        prefix = f"hf://datasets/{hub.repo_id}@{sha}/"
        files = [str(f)[len(prefix):] if str(f).startswith(prefix) else str(f).split("/", 4)[-1] for f in resolved]
    files = [f for f in files if Path(f).suffix in DATA_SUFFIXES]
    if not files:
        raise DataError(f"source '{name}': no data files for split {hub.split!r} in {hub.repo_id}@{sha} (hub.data_files={hub.data_files})")
    return sorted(files)


def _download(name: str, hub: HubSource, sha: str, rel: str, dest: Path) -> None:
    root = Path(hub.repo_id).expanduser()
    out = dest / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    if root.is_dir():
        shutil.copyfile(root / rel, out)
        return
    from huggingface_hub import hf_hub_download

    try:
        cached = hf_hub_download(hub.repo_id, rel, repo_type="dataset", revision=sha, token=hf_token())
    except Exception as err:
        if _network_failure(err):
            raise OfflineError(f"source '{name}': download of {rel} failed ({type(err).__name__}); check the network") from None
        raise
    shutil.copyfile(cached, out)


def _write_slice(hub: HubSource, sha: str, limit: int, out: Path) -> int:
    """The first `limit` rows, streamed through `datasets`, as JSON lines in the source's schema."""
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for row in iter_hub_rows(hub, revision=None if sha == "local" else sha, limit=limit):
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n
