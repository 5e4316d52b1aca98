"""One strict, typed config for every stage: pydantic models mirroring `params.yaml`.

`params.yaml` (the demo) and `recipes/llama2-13b-orca-8k.yaml` (the seed recipe) both load through `load_config`.
Unknown keys fail with their dotted path, cross-field rules are checked at load, and `--set dotted.key=value`
overrides are applied before validation so they get the same checks. HF's names are used wherever HF names the
thing (`learning_rate`, `per_device_train_batch_size`, `max_length`, `rope_scaling`).

Paths: every entry of `paths` except `root` is relative to `paths.root` (absolute paths are kept as they are), and
`paths.root` is relative to the working directory, so `--set paths.root=runs/x` moves a whole run. File names
inside those folders live in `orca8k.layout`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orca8k.errors import ConfigError

SOURCE_FORMATS = ("orca_chat", "fanfics", "red_pajama")
CHAT_FORMATS = ("orca_chat",)


class StrictModel(BaseModel):
    """Base: unknown keys are errors, values are validated on assignment too, and a boolean is never taken for a
    number (pydantic's lax mode reads `true` as 1; its strict mode would also refuse YAML 1.1's `3e-4`, a string)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: Any) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types inside an annotation (`int | None` → {int, NoneType}); Literal values and generics count as
    their origin."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return {type(a) for a in args}
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args)) | ({typing.get_origin(annotation)} - {types.UnionType,
                                                                                            typing.Union})


# --------------------------------------------------------------------------------------------------- paths
class PathsConfig(StrictModel):
    root: str = Field(".", description="Base folder of a run; the other paths are relative to it.")
    data: str = Field(description="Raw source snapshots (orca-chat/, fanfics/, red_pajama/ below it).")
    mix: str = Field(description="The sampled mix: train/val parquet, manifest, quarantine.")
    validation: str = Field(description="Great Expectations results and Data Docs of the mix.")
    base: str = Field(description="The base model + tokenizer (built for the demo, resolved for a hub base).")
    tokenized: str = Field(description="Tokenized Arrow datasets and the fine-tuning tokenizer.")
    model: str = Field(description="The fine-tuned model (safetensors + tokenizer).")
    checkpoints: str = Field(description="Trainer checkpoints (kept by DVC with persist, never cached).")
    metrics: str = Field(description="Small JSON metrics and plot tables read by `dvc metrics/plots`.")
    reports: str = Field(description="Human-readable reports: eval plots, sampling reports, registry pages.")

    def resolve(self, name: str) -> Path:
        """Absolute path of `paths.<name>` (root resolved against the working directory).

        Raises:
            ConfigError: `name` is not a key of `paths`.
        """
        if name not in type(self).model_fields:
            raise ConfigError(f"paths.{name}: no such path key")
        root = Path(self.root).expanduser()
        root = root if root.is_absolute() else Path.cwd() / root
        if name == "root":
            return root.resolve()
        value = Path(getattr(self, name)).expanduser()
        return (value if value.is_absolute() else root / value).resolve()


# --------------------------------------------------------------------------------------------------- data
class HubSource(StrictModel):
    repo_id: str = Field(description="Hub dataset id, e.g. shahules786/orca-chat.")
    revision: str = Field(description="Pinned revision (a commit sha) so a fetch is reproducible.")
    data_files: list[str] | None = Field(None, description="Files inside the repo to load (None = the default config).")
    split: str = "train"


class SourceConfig(StrictModel):
    format: Literal["orca_chat", "fanfics", "red_pajama"] = Field(description="Schema adapter of the source.")
    path: str = Field(description="Local snapshot, relative to paths.data: a file or a folder of .json/.jsonl/.parquet.")
    hub: HubSource | None = Field(None, description="Where `orca8k fetch-data` gets it (None: local only).")
    fraction: float = Field(gt=0.0, le=1.0, description="Share of the train rows drawn, without replacement.")
    max_val_set: int | None = Field(None, ge=1, description="Cap on validation rows (drawn without replacement).")
    max_chunk_size: int | None = Field(None, ge=1, description="Text sources: contiguous chunks of at most this many chars.")
    expected_train_rows: int | None = Field(
        None, ge=0, description="Train rows the mix is expected to give (the card's count); `orca8k plan` uses it before data exists."
    )
    license: str = Field("unknown", description="Licence of the source, written into the model card.")

    @property
    def is_chat(self) -> bool:
        return self.format in CHAT_FORMATS


class DataConfig(StrictModel):
    val_split: float = Field(gt=0.0, lt=1.0, description="Share of each source's documents held out for validation.")
    max_reject_fraction: float = Field(ge=0.0, le=1.0, description="Quarantined rows above this share fail the mix.")
    max_row_bytes: int = Field(ge=1, description="Rows larger than this (UTF-8 bytes) are quarantined.")
    sources: dict[str, SourceConfig]

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        if not self.sources:
            raise ValueError("at least one source is required")
        for name, src in self.sources.items():
            if src.is_chat and src.max_chunk_size is not None:
                raise ValueError(f"sources.{name}.max_chunk_size: chat sources are not chunked; set it to null")
        return self


class DemoDataConfig(StrictModel):
    """Sizes of the deterministic demo data written by `orca8k demo-data` (the recipe sets the section to null)."""

    orca_chat_conversations: int = Field(ge=1)
    fanfics_stories: int = Field(ge=1)
    fanfics_story_chars: int = Field(ge=1000, description="Length of one story (it ends at the next paragraph end).")
    red_pajama_documents: int = Field(ge=1)
    red_pajama_document_chars: int = Field(ge=200, description="Typical length of one web document.")


# --------------------------------------------------------------------------------------------------- validate
class ValidateConfig(StrictModel):
    min_rows: int = Field(1, ge=1, description="Each source and split must have at least this many rows.")
    max_text_chars: int = Field(ge=1, description="Upper bound on a text row's characters (a chunk).")
    min_text_chars: int = Field(1, ge=1)
    max_turn_chars: int = Field(ge=1, description="Upper bound on one message's characters.")
    max_duplicate_fraction: float = Field(ge=0.0, le=1.0)
    fraction_tolerance: float = Field(ge=0.0, le=1.0, description="Allowed gap between realised and asked fractions.")


# --------------------------------------------------------------------------------------------------- base
class ArchitectureConfig(StrictModel):
    """`LlamaConfig` fields: what the demo builds, and what a hub base is checked against."""

    vocab_size: int = Field(ge=8)
    hidden_size: int = Field(ge=8)
    intermediate_size: int = Field(ge=8)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    max_position_embeddings: int = Field(ge=16, description="The base's native context (tokens), before RoPE scaling.")
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads(self) -> ArchitectureConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class TokenizerTrainConfig(StrictModel):
    """sentencepiece training of the demo tokenizer (Llama-2's trainer settings; only the size is a knob)."""

    vocab_size: int = Field(ge=300)
    input_sentence_size: int = Field(ge=100, description="Lines sampled from the train split to train on.")


class PretrainConfig(StrictModel):
    """Pre-training of the tiny demo base at its native context (fp32 on CPU)."""

    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    lr_scheduler_type: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Decay after warm-up (a short from-scratch run ends lower with a decay)."
    )
    per_device_train_batch_size: int = Field(ge=1)
    max_steps: int = Field(ge=1, description="The budget: reruns with the same thread count give the same weights.")
    max_seconds: float | None = Field(
        None, gt=0, description="Safety cap on wall-clock; training stops early (and says so) if it is reached."
    )
    logging_steps: int = Field(25, ge=1, description="Loss is logged (and kept in base_info.json) every N steps.")


class BaseConfig(StrictModel):
    model_name_or_path: str | None = Field(description="Hub id or local dir of the base; null builds the demo base.")
    revision: str | None = Field(None, description="Pinned hub revision of the base (commit sha).")
    architecture: ArchitectureConfig
    tokenizer: TokenizerTrainConfig | None = None
    pretrain: PretrainConfig | None = None

    @model_validator(mode="after")
    def _demo_or_hub(self) -> BaseConfig:
        if self.model_name_or_path is None and (self.tokenizer is None or self.pretrain is None):
            raise ValueError("a demo base (model_name_or_path: null) needs base.tokenizer and base.pretrain")
        if self.tokenizer is not None and self.tokenizer.vocab_size != self.architecture.vocab_size:
            raise ValueError(
                f"base.tokenizer.vocab_size={self.tokenizer.vocab_size} must equal "
                f"base.architecture.vocab_size={self.architecture.vocab_size} (the demo base's embedding rows)"
            )
        return self

    @property
    def native_context(self) -> int:
        return self.architecture.max_position_embeddings


# --------------------------------------------------------------------------------------------------- model
class RopeScalingConfig(StrictModel):
    """Linear RoPE scaling (position interpolation, Chen et al. 2023). `rope_type` is accepted as `type`'s alias."""

    type: Literal["linear"] = "linear"
    factor: float = Field(ge=1.0)

    @model_validator(mode="before")
    @classmethod
    def _canonicalise(cls, data: Any) -> Any:
        if isinstance(data, dict) and "rope_type" in data:
            data = dict(data)
            rope_type = data.pop("rope_type")
            if "type" in data and data["type"] != rope_type:
                raise ValueError(f"type={data['type']!r} and rope_type={rope_type!r} disagree")
            data["type"] = rope_type
        return data


class ModelConfig(StrictModel):
    rope_scaling: RopeScalingConfig
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    pad_vocab_size_multiple: int = Field(16, ge=1, description="Embeddings are resized to a multiple of this.")


# --------------------------------------------------------------------------------------------------- tokenize
class TokenizeConfig(StrictModel):
    max_length: int = Field(ge=16, description="Tokens per training row (the fine-tuning context).")
    packing: bool = Field(description="Pack examples into max_length rows (no cross-attention) instead of padding.")
    packing_strategy: Literal["bfd", "bfd_text_fill"] = Field(
        "bfd", description="With packing: 'bfd' packs whole examples (best-fit decreasing); 'bfd_text_fill' keeps "
        "chat examples whole and cuts the pretraining text again to fill the rows' free space.")
    train_on_system: bool = Field(False, description="Supervise the system block too (the seed's accident).")
    num_proc: int = Field(1, ge=1, description="At most this many datasets.map processes; a split gets one per "
                          "8 M chars of text (`orca8k.stages.tokenize.processes_for`), so small splits stay in-process.")
    min_supervised_share: float = Field(0.0, ge=0.0, le=1.0, description="Per-source lower bound (token suite).")
    max_supervised_share: float = Field(1.0, ge=0.0, le=1.0)

    @property
    def packed_by(self) -> str | None:
        """The packing strategy the train split is packed by, or None without packing (as the metrics record it)."""
        return self.packing_strategy if self.packing else None

    @model_validator(mode="after")
    def _strategy_needs_packing(self) -> TokenizeConfig:
        if self.packing_strategy != "bfd" and not self.packing:
            raise ValueError(f"packing_strategy={self.packing_strategy!r} packs: it needs packing: true")
        return self


# --------------------------------------------------------------------------------------------------- train
class TrainConfig(StrictModel):
    """`transformers.TrainingArguments` under their HF names, plus the launcher."""

    learning_rate: float = Field(gt=0)
    lr_scheduler_type: Literal["constant_with_warmup", "linear", "cosine", "constant"] = "constant_with_warmup"
    warmup_steps: int = Field(ge=0)
    warmup_shape: Literal["linear", "log"] = Field(
        "linear", description="Warm-up curve; DeepSpeed's WarmupLR (the seed) is 'log'."
    )
    weight_decay: float = Field(ge=0)
    adam_beta1: float = Field(ge=0, lt=1)
    adam_beta2: float = Field(ge=0, lt=1)
    adam_epsilon: float = Field(gt=0)
    max_grad_norm: float = Field(gt=0)
    optim: Literal["adamw_torch_fused", "adamw_torch"] = Field(
        "adamw_torch_fused", description="torch's AdamW, fused (one kernel for all parameters; on the demo model on "
        "CPU its step takes 2.8 ms against 17.7 ms for adamw_torch's foreach loop) or not. A DeepSpeed config with "
        "an `optimizer` block replaces it with DeepSpeed's own.")
    per_device_train_batch_size: int = Field(ge=1)
    per_device_eval_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
    num_train_epochs: float = Field(gt=0)
    max_steps: int = Field(-1, description="> 0 overrides num_train_epochs.")
    max_seconds: float | None = Field(None, gt=0, description="Wall-clock budget (demo); null for real runs.")
    eval_steps: int = Field(ge=1)
    save_steps: int = Field(ge=1)
    save_total_limit: int = Field(ge=1)
    logging_steps: int = Field(ge=1)
    gradient_checkpointing: bool
    torch_compile: bool = Field(False, description="torch.compile the model and the loss (inductor): 10–17 % per "
                                "step on the demo model on CPU, after 20–35 s of compiling; shapes that vary (padded "
                                "batches) recompile.")
    fp16: bool = False
    bf16: bool = False
    deepspeed: str | None = Field(None, description="DeepSpeed config JSON (repo-relative), e.g. configs/deepspeed/zero2.json.")
    launcher: Literal["none", "torchrun", "deepspeed"] = "none"
    nproc_per_node: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    hostfile: str | None = None
    dataloader_num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 are exclusive")
        if self.launcher == "none" and (self.nproc_per_node > 1 or self.num_nodes > 1):
            raise ValueError("several processes need launcher: torchrun or deepspeed")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.num_nodes


# --------------------------------------------------------------------------------------------------- evaluate
class PasskeyConfig(StrictModel):
    context_factors: list[float] = Field(description="Lengths as multiples of the base's native context.")
    depths: list[float] = Field(description="Where the key sits, as a fraction of the filler (0 = start).")
    trials: int = Field(ge=1, description="Keys per (length, depth).")
    digits: int = Field(5, ge=1, le=12)


class EvaluateConfig(StrictModel):
    context_factors: list[float] = Field(
        description="PPL-vs-length at these multiples of the native context; 1.0 and 2.0 are required (ppl_1x, ppl_2x)."
    )
    scored_tail_tokens: int = Field(ge=1, description="Each window scores only its last N tokens.")
    tokens_per_length: int = Field(ge=1, description="Scored tokens per context length (a fixed budget).")
    per_device_eval_batch_size: int = Field(ge=1)
    passkey: PasskeyConfig

    @model_validator(mode="after")
    def _factors(self) -> EvaluateConfig:
        missing = [f for f in (1.0, 2.0) if f not in self.context_factors]
        if missing:
            raise ValueError(f"context_factors must contain {missing} (the registry gate reads ppl_1x and ppl_2x)")
        if any(f <= 0 for f in self.context_factors + self.passkey.context_factors):
            raise ValueError("context factors must be positive")
        if any(not 0.0 <= d <= 1.0 for d in self.passkey.depths):
            raise ValueError("passkey.depths must lie in [0, 1]")
        return self


# --------------------------------------------------------------------------------------------------- sampling
class SamplingConfig(StrictModel):
    """The `sampling-report` stage (OA sampling reports) and the defaults of `orca8k generate`."""

    config_file: str = Field(description="OA `Configuration` JSON (repo-relative).")
    prompts_file: str = Field(description="JSONL, one JSON string per line (repo-relative).")
    model_name: str = Field(min_length=1, description="Name written into the reports and their file names.")
    mode: Literal["v3", "v2_5"] = Field("v3", description="v3: pre_text as a <|system|> block; v2_5: no system block.")
    num_samples: int = Field(2, ge=1, description="Outputs per prompt for a sampled configuration (greedy: 1).")
    max_new_tokens: int | None = Field(None, ge=1, description="Overrides the file's max_new_tokens (demo: smaller).")
    batch_size: int = Field(8, ge=1, description="Rows (prompt × sample) per generate call (left-padded).")
    compact_every: int | None = Field(8, ge=1, description="New tokens per generate call: finished rows leave the "
                                      "batch and its KV cache between calls (null: kept to the end, one call).")
    skip_special_tokens: bool = True
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Weights dtype for sampling (CPU: fp32).")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")


# --------------------------------------------------------------------------------------------------- tracking
class GateConfig(StrictModel):
    enabled: bool = True
    max_eval_loss_regression: float = Field(ge=0, description="Allowed per-source eval-loss increase vs the champion.")
    max_ppl_ratio_2x_over_1x: float = Field(gt=0, description="PPL at 2x native context / PPL at 1x must be below this.")
    min_proper_end_rate: float = Field(ge=0, le=1, description="Share of sampled outputs that end with </s>.")


class TrackingConfig(StrictModel):
    tracking_uri: str = Field(description="MLflow URI; MLFLOW_TRACKING_URI wins. sqlite paths resolve against the repo root.")
    artifact_location: str = Field(description="Artifact root for a new experiment (repo-relative for local stores).")
    experiment_name: str


class RegisterConfig(StrictModel):
    model_name: str = Field(description="Registered model name: load with models:/<name>@champion.")
    base_license: str = Field("unknown", description="Licence of the base model, written into the model card.")
    gate: GateConfig


# --------------------------------------------------------------------------------------------------- root
class Config(StrictModel):
    seed: int = Field(ge=0, lt=2**32, description="One seed for the mix, the base, training and sampling.")
    paths: PathsConfig
    demo_data: DemoDataConfig | None
    data: DataConfig
    validate_: ValidateConfig = Field(alias="validate")
    base: BaseConfig
    model: ModelConfig
    tokenize: TokenizeConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    sampling: SamplingConfig
    tracking: TrackingConfig
    register_: RegisterConfig = Field(alias="register")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        native = self.base.native_context
        effective = int(native * self.model.rope_scaling.factor)
        if self.tokenize.max_length > effective:
            raise ValueError(
                f"tokenize.max_length={self.tokenize.max_length} exceeds the effective context "
                f"base.architecture.max_position_embeddings × model.rope_scaling.factor = {native} × "
                f"{self.model.rope_scaling.factor} = {effective}"
            )
        top = max(self.evaluate.context_factors + self.evaluate.passkey.context_factors)
        if top > self.model.rope_scaling.factor + 1e-9:
            raise ValueError(f"evaluate context factors go up to {top}, beyond model.rope_scaling.factor")
        if self.train.deepspeed and self.train.launcher == "torchrun" and self.train.world_size > 1:
            pass  # torchrun + DeepSpeed config is valid (HF Trainer initialises DeepSpeed itself)
        return self

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_hex(cls, v: Any) -> Any:
        if isinstance(v, str):
            return int(v, 0)
        return v

    @property
    def effective_context(self) -> int:
        """Native context × RoPE factor, in tokens."""
        return int(self.base.native_context * self.model.rope_scaling.factor)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (YAML keys, e.g. `validate`, not `validate_`)."""
        return self.model_dump(mode="json", by_alias=True)

    def section_hash(self, *keys: str) -> str:
        """sha256 of the JSON of the given top-level sections, for content-keyed caches and lineage tags."""
        data = self.to_dict()
        blob = json.dumps({k: data[k] for k in keys} if keys else data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `dotted.key=value` into the key path and a YAML-typed value (`3e-4` → float, `null` → None).

    Raises:
        ConfigError: no `=` or an empty key.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {text!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `data` with `dotted.key=value` overrides applied.

    An override may only replace a key the file has (or a key inside a section that is null in the file), so a
    typo fails instead of adding a key that nothing reads.

    Raises:
        ConfigError: the key does not exist; the message names the dotted path.
    """
    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".") if isinstance(key, str) else key
        node = out
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"--set {'.'.join(parts)}: unknown key {'.'.join(parts[: i + 1])}")
            if node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict) or (parts[-1] not in node and node):
            raise ConfigError(f"--set {'.'.join(parts)}: unknown key {'.'.join(parts)}")
        node[parts[-1]] = value
    return out


def _format_validation_error(err: ValidationError, source: str, overridden: dict[str, Any] | None = None) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = ".".join(str(p).rstrip("_") for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        # a value that came from --set is blamed on the --set, not on the file, quoted as typed (`null`, not None)
        origin = next((f" (from --set {k}={v if isinstance(v, str) else json.dumps(v)})"
                       for k, v in (overridden or {}).items()
                       if loc == k or loc.startswith(k + ".")), "")
        lines.append(f"  {loc or '(root)'}: {msg}{origin}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>", overridden: dict[str, Any] | None = None
                     ) -> Config:
    """Validate plain data as a `Config`.

    Args:
        data: the params as plain data.
        source: named in errors (the params file).
        overridden: dotted key → value of the `--set` overrides applied to `data`; errors under those keys say so.

    Raises:
        ConfigError: with one line per problem, each naming the dotted key.
    """
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, overridden)) from None


def read_params(path: str | Path) -> dict[str, Any]:
    """Read a params YAML file as plain data.

    Raises:
        ConfigError: missing file, YAML syntax error, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load and validate a params file, with `--set` style overrides applied first.

    Args:
        path: the params YAML (`params.yaml`, or a recipe).
        overrides: `["train.learning_rate=3e-4", ...]` or `{"train.learning_rate": 3e-4}`.

    Returns:
        The validated `Config`.

    Raises:
        ConfigError: unreadable file, unknown key (named by its dotted path), wrong type, failed cross-field check.
    """
    data = read_params(path)
    items = (overrides or {}).items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    overridden = {(k if isinstance(k, str) else ".".join(k)): v for k, v in items}  # dotted key → value
    if overridden:
        data = apply_overrides(data, overridden)
    return config_from_dict(data, str(path), overridden)
