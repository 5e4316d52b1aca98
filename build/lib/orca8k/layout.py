"""Where each stage reads and writes: the one place that names the files inside the `paths:` folders.

`dvc.yaml` spells the same files with `${paths.*}` templating; `tests/test_dvc_contract.py` renders dvc.yaml
against params.yaml and checks every dep/out below is declared there, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orca8k.config import Config

# `orca8k demo-data`: the file written into a source's folder, by source format (the real datasets' file names
# where they have one).
DEMO_FILE_NAMES = {"orca_chat": "orca-chat-gpt4.jsonl", "fanfics": "train.jsonl", "red_pajama": "sample.jsonl"}

# The source checkout this package was imported from (src/orca8k/layout.py → the folder above src/).
_CHECKOUT = Path(__file__).resolve().parents[2]


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest ancestor of `start` (default: the working directory) holding `dvc.yaml` or `.git`.

    Falls back to `start` itself when no ancestor has either (a bare folder). The MLflow store and the Prefect run
    directories resolve against it, so they do not move with the working directory.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() or (folder / ".git").exists():
            return folder
    return here


def repo_file(path: str | Path) -> Path:
    """A repo-relative file named in params (`sampling.config_file`, `sampling.prompts_file`), as an absolute path.

    Tried in order: as given if absolute; under `repo_root()` of the working directory; under the checkout this
    package runs from (so a stage run with `paths.root` elsewhere, e.g. from a temp folder, still finds the shipped
    configs). Returns the first existing candidate, else the repo-root one (the caller's error names it).
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    candidates = [repo_root() / p, _CHECKOUT / p]
    return next((c for c in candidates if c.exists()), candidates[0])


@dataclass(frozen=True)
class Layout:
    """Absolute paths of every input and output, derived from `cfg.paths`."""

    root: Path
    data: Path
    mix: Path
    validation: Path
    base: Path
    tokenized: Path
    model: Path
    checkpoints: Path
    metrics: Path
    reports: Path

    @classmethod
    def from_config(cls, cfg: Config) -> Layout:
        p = cfg.paths
        return cls(**{name: p.resolve(name) for name in type(p).model_fields})

    # data (fetch-data) and mix
    @property
    def data_snapshot(self) -> Path:
        """Written by `orca8k fetch-data`: per source, the hub id, the resolved commit sha, files and hashes."""
        return self.data / "snapshot.json"

    @property
    def mix_train(self) -> Path:
        return self.mix / "train.parquet"

    @property
    def mix_val(self) -> Path:
        return self.mix / "val.parquet"

    @property
    def mix_manifest(self) -> Path:
        return self.mix / "manifest.json"

    @property
    def mix_quarantine(self) -> Path:
        return self.mix / "quarantine.jsonl"

    @property
    def mix_metrics(self) -> Path:
        return self.metrics / "mix.json"

    # validate
    @property
    def validation_result(self) -> Path:
        return self.validation / "result.json"

    @property
    def data_docs(self) -> Path:
        return self.validation / "data_docs"

    # base
    @property
    def base_info(self) -> Path:
        """What `orca8k base` built or resolved (demo: beside the weights; hub/local base: the pointer itself)."""
        return self.base / "base_info.json"

    # tokenize
    @property
    def tokenized_train(self) -> Path:
        return self.tokenized / "train"

    @property
    def tokenized_val(self) -> Path:
        return self.tokenized / "val"

    @property
    def tokenizer(self) -> Path:
        """The fine-tuning tokenizer (base tokenizer + OA special tokens + chat template)."""
        return self.tokenized / "tokenizer"

    @property
    def token_validation(self) -> Path:
        return self.tokenized / "validation"

    @property
    def token_validation_result(self) -> Path:
        """The token-level suite's result JSON (`success`, `run_id`, checks, rates)."""
        return self.token_validation / "result.json"

    @property
    def token_data_docs(self) -> Path:
        return self.token_validation / "data_docs"

    @property
    def tokenize_dropped(self) -> Path:
        """Examples dropped by `tokenize` (no supervised token left), one JSON object per line, with the reason."""
        return self.tokenized / "dropped.jsonl"

    @property
    def tokenize_work(self) -> Path:
        """Scratch space of `tokenize` (datasets cache files), removed when the stage ends."""
        return self.tokenized / ".work"

    @property
    def tokenize_metrics(self) -> Path:
        return self.metrics / "tokenize.json"

    # train
    @property
    def train_run(self) -> Path:
        """JSON with the MLflow run id that `train` created; later stages re-attach to it."""
        return self.metrics / "mlflow_run.json"

    @property
    def checkpoint_run(self) -> Path:
        """The same run id beside the checkpoints (persisted), so a resumed `train` re-attaches to its run."""
        return self.checkpoints / "mlflow_run.json"

    @property
    def launch_params(self) -> Path:
        """The resolved params a multi-process `orca8k train` hands to the ranks it launches (torchrun/deepspeed)."""
        return self.checkpoints / "launch_params.yaml"

    @property
    def train_metrics(self) -> Path:
        return self.metrics / "train.json"

    # evaluate
    @property
    def eval_metrics(self) -> Path:
        return self.metrics / "eval.json"

    @property
    def ppl_vs_context(self) -> Path:
        """Plot table: one row per (model, context_length)."""
        return self.metrics / "ppl_vs_context.json"

    @property
    def passkey(self) -> Path:
        """Plot table: one row per (context_length, depth)."""
        return self.metrics / "passkey.json"

    @property
    def eval_reports(self) -> Path:
        return self.reports / "eval"

    @property
    def ppl_vs_context_png(self) -> Path:
        return self.eval_reports / "ppl_vs_context.png"

    @property
    def passkey_png(self) -> Path:
        return self.eval_reports / "passkey.png"

    @property
    def passkey_trials(self) -> Path:
        """Every passkey trial (key, generated text, log-probability), for reading the failures."""
        return self.eval_reports / "passkey_trials.json"

    # sampling-report
    @property
    def sampling_reports(self) -> Path:
        """OA `SamplingReport` JSON files, one per decoding configuration, named by OA's rule
        (`orca8k.sampling.schema.report_filename`: the date and model name are in the name)."""
        return self.reports / "sampling"

    @property
    def sampling_summary(self) -> Path:
        """`{"outputs", "empty_outputs", "proper_end_rate", "files", ...}`: the registry gate reads it."""
        return self.sampling_reports / "summary.json"

    @property
    def sampling_index(self) -> Path:
        """HTML page: per prompt, the configurations side by side."""
        return self.sampling_reports / "index.html"

    # register
    @property
    def register_metrics(self) -> Path:
        return self.metrics / "register.json"

    @property
    def register_reports(self) -> Path:
        return self.reports / "register"

    @property
    def register_side_by_side(self) -> Path:
        """HTML: the candidate's sampling outputs beside the champion's, per prompt and configuration."""
        return self.register_reports / "side_by_side.html"

    @property
    def register_model_card(self) -> Path:
        """The model card registered with the version (a copy, for reading without MLflow)."""
        return self.register_reports / "model_card.md"

    def __str__(self) -> str:  # pragma: no cover - debugging aid
        return "\n".join(f"{k}: {v}" for k, v in self.__dict__.items())
