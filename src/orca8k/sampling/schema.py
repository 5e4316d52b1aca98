"""The OpenAssistant sampling-report file formats, as pydantic models, and their readers and writers.

Two shapes from OA's `model/model_eval/manual/sampling_report.py` (the seed team's tool, whose reports existing
viewers read):

- `Configuration` — the decoding set: `{"default": {...}, "configurations": [{"name", "generate_args",
  "pre_text", "add_prefix_tokens", ...}]}`. Each configuration is merged over `default` the way OA merges them
  (`merge_configs`): set fields of the configuration win, `generate_args` are merged key by key.
- `SamplingReport` — the result: `{"model_name", "date", "args", "prompts": [{"prompt", "results":
  [{"sampling_config", "sampling_params", "outputs": [...]}]}]}`, written without null fields (OA writes
  `report.dict(exclude_none=True)`).

Unlike OA's models, ours forbid unknown keys, so a typo in a config file fails instead of being ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orca8k.errors import DataError

# `generate_args` keys that `transformers.GenerationConfig` reads and that a sampling report may set. Anything else
# (a typo such as `top-p`, or a key for another library) is rejected when the file is loaded.
GENERATE_ARG_KEYS = frozenset(
    {
        "max_new_tokens", "min_new_tokens", "do_sample", "num_beams", "temperature",
        "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
        "no_repeat_ngram_size", "length_penalty", "early_stopping", "num_beam_groups", "diversity_penalty",
        "encoder_repetition_penalty", "renormalize_logits", "remove_invalid_values",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingConfig(_Strict):
    """One named decoding configuration (OA's `SamplingConfig`).

    `pre_text` is the system prompt: in mode `v3` it becomes `<|system|>{pre_text}</s>`; in mode `v2_5` it is
    plain text before `<|prompter|>` (or `<|prefix_begin|>{pre_text}<|prefix_end|>` with `add_prefix_tokens`).
    `human_name`/`bot_name` belong to OA's legacy plain-text mode; they are accepted so OA files load, and unused.
    """

    name: str | None = None
    generate_args: dict[str, Any] = Field(default_factory=dict)
    pre_text: str | None = None
    add_prefix_tokens: bool | None = False
    human_name: str | None = None
    bot_name: str | None = None

    @field_validator("generate_args")
    @classmethod
    def _known_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        absolute = sorted({"max_length", "min_length"} & set(v))
        if absolute:
            raise ValueError(f"{absolute}: use max_new_tokens / min_new_tokens (absolute lengths count the prompt and, "
                             "in a left-padded batch, its padding, so batched outputs would differ from one at a time)")
        unknown = sorted(set(v) - GENERATE_ARG_KEYS)
        if unknown:
            raise ValueError(f"unknown generate_args {unknown}; known: {sorted(GENERATE_ARG_KEYS)}")
        return v

    @property
    def is_greedy(self) -> bool:
        """True when decoding is deterministic (`do_sample` false or unset, transformers' default)."""
        return not bool(self.generate_args.get("do_sample", False))


class Configuration(_Strict):
    """A sampling configuration file (OA's `Configuration`): a default merged under each named configuration."""

    default: SamplingConfig | None = None
    configurations: list[SamplingConfig] = Field(min_length=1)

    @field_validator("configurations")
    @classmethod
    def _named_unique(cls, v: list[SamplingConfig]) -> list[SamplingConfig]:
        names = [c.name for c in v]
        for i, name in enumerate(names):
            if not name:
                raise ValueError(f"configurations[{i}].name: every configuration needs a name")
            if not re.fullmatch(r"[\w.-]+", name):
                raise ValueError(f"configurations[{i}].name: {name!r} must be word characters, '.' or '-' (it is a file name)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"configurations: duplicate names {dupes}")
        return v

    def merged(self) -> list[SamplingConfig]:
        """Each configuration merged over `default` (OA's `merge_configs`): truthy fields of the configuration
        replace the default's, and `generate_args` are merged key by key (the configuration wins)."""
        out = []
        for c in self.configurations:
            if self.default is None:
                out.append(c.model_copy(deep=True))
                continue
            merged = self.default.model_copy(deep=True)
            for field in ("name", "pre_text", "human_name", "bot_name", "add_prefix_tokens"):
                value = getattr(c, field)
                if value:
                    setattr(merged, field, value)
            merged.generate_args = {**merged.generate_args, **c.generate_args}
            out.append(merged)
        return out


class SamplingResult(_Strict):
    """The outputs of one configuration for one prompt, with the parameters that produced them."""

    sampling_config: str
    sampling_params: dict[str, Any]
    outputs: list[str]


class PromptResults(_Strict):
    prompt: str
    results: list[SamplingResult]


class SamplingReport(_Strict):
    """OA's `SamplingReport`: one model, one date (ISO-8601, UTC), the run's args, and results per prompt."""

    model_name: str
    date: str
    args: dict[str, Any]
    prompts: list[PromptResults]

    def to_json(self) -> str:
        """JSON text without null fields (OA writes `exclude_none=True`), indented like OA's files."""
        return json.dumps(drop_nulls(self.model_dump(mode="json", exclude_none=True)), indent=2, ensure_ascii=False)


def drop_nulls(value: Any) -> Any:
    """`value` with every None removed from dicts and lists, recursively (free-form `args`/`sampling_params` too)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value if v is not None]
    return value


def load_configuration(path: str | Path) -> Configuration:
    """Read and validate a sampling configuration file (OA `Configuration` JSON).

    Raises:
        DataError: the file is missing, is not JSON, or breaks the shape (the message names the file and field).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: sampling configuration file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not JSON: {err}") from None
    try:
        return Configuration.model_validate(data)
    except ValidationError as err:
        lines = [f"{path}: invalid sampling configuration"]
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {loc or '(root)'}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
        raise DataError("\n".join(lines)) from None


def load_prompts(path: str | Path) -> list[str]:
    """Read a prompts file: JSONL, one JSON string per line (OA's `*_text.jsonl`); blank lines are skipped.

    Raises:
        DataError: missing file, a line that is not JSON or not a non-empty string (names the file and line), or
            no prompt at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not JSON: {err}") from None
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}:{lineno}: expected a non-empty JSON string, got {type(value).__name__}")
        prompts.append(value)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def safe_model_name(model_name: str) -> str:
    """`model_name` for a file name: every character other than a word character or `-` becomes `_` (OA's rule)."""
    return re.sub(r"[^\w-]", "_", model_name)


def report_filename(date: str, model_name: str, config_name: str) -> str:
    """`{YYYY-MM-DD}_{model name, non-word chars → _}_sampling_{config name}.json` (OA's naming; the date part of
    the ISO-8601 `date`)."""
    return f"{date.split('T')[0]}_{safe_model_name(model_name)}_sampling_{config_name}.json"
