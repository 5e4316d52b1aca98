"""`orca8k generate`: chat with a model in the OA format from the command line.

    orca8k generate "What is 12 + 30?"                                 # the pipeline's model (paths.model), greedy
    orca8k generate --model artifacts/model --config nucleus9 --system "Answer briefly." "Tell me a story."
    orca8k generate --model models:/orca8k-demo@champion "What is 12 + 30?"    # the registry's champion

The prompt is built by the same function as training (`ChatEncoder.encode_prompt`, BOS once; v3 with a system
block when `--system` is given), decoded with a named configuration of `sampling.config_file`, and the new tokens
are printed, cut at the first `</s>`. Several prompts run as one left-padded batch.

`load_for_generation` is the one place that turns `--model` into (model, tokenizer): a local dir, or a registry
URI `models:/<name>@<alias>` / `models:/<name>/<version>` that MLflow resolves to the registered checkpoint folder
(`orca8k.tracking.resolve_model_dir`; tracking URI from `MLFLOW_TRACKING_URI` or `tracking.tracking_uri`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from orca8k.config import Config
from orca8k.errors import ConfigError, StageInputMissing
from orca8k.layout import Layout

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from orca8k.sampling.generation import Generation
    from orca8k.sampling.schema import SamplingConfig


def load_for_generation(cfg: Config, model: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Turn `--model` into (model, tokenizer, a display name).

    Args:
        cfg: the config (`paths.model` is the default; `sampling.dtype`/`device` apply).
        model: a local model dir, a registry URI `models:/<name>@<alias>` (or `/<version>`), or None for
            `paths.model`.

    Returns:
        (model in eval mode, tokenizer, name).

    Raises:
        orca8k.errors.StageInputMissing: no such folder, or it holds no model or tokenizer.
        orca8k.errors.RegistryError: the registry has no such model/alias/version, or is unreachable after retries.
    """
    from orca8k.sampling.loading import load_local_model

    if model is not None and model.startswith("models:/"):
        from orca8k.tracking import resolve_model_dir

        path, name = resolve_model_dir(cfg, model), model
    else:
        path = Layout.from_config(cfg).model if model is None else model
        name = str(path)
        if not Path(path).is_dir():
            hint = "run `orca8k train` first" if model is None else "a model folder or models:/<name>@<alias>"
            raise StageInputMissing(f"--model {path}: no such folder ({hint})")
    m, tok = load_local_model(
        path, dtype=cfg.sampling.dtype, device=cfg.sampling.device, attn_implementation=cfg.model.attn_implementation
    )
    return m, tok, name


def sampling_configuration(cfg: Config, config_name: str) -> SamplingConfig:
    """The configuration `config_name` of `cfg.sampling.config_file`, merged over the file's `default`.

    Raises:
        ConfigError: no configuration of that name in the file.
        orca8k.errors.DataError: the configuration file is missing or malformed.
    """
    from orca8k.layout import repo_file
    from orca8k.sampling.schema import load_configuration

    configuration = load_configuration(repo_file(cfg.sampling.config_file))
    merged = {c.name: c for c in configuration.merged()}
    if config_name not in merged:
        raise ConfigError(f"--config {config_name}: not in {cfg.sampling.config_file} (have: {', '.join(merged)})")
    return merged[config_name]


def generate(
    cfg: Config,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    system: str | None = None,
    config_name: str = "greedy",
    max_new_tokens: int | None = None,
) -> list[Generation]:
    """Generate one reply per prompt with a named configuration of `cfg.sampling.config_file`.

    Args:
        cfg: the config (`sampling.config_file`, `batch_size`, `compact_every`, `skip_special_tokens`, `seed`).
        model: the causal LM.
        tokenizer: its OA tokenizer.
        prompts: user prompts.
        system: system prompt (a `<|system|>` block); None uses the configuration's `pre_text`, "" none at all.
        config_name: which configuration to decode with (merged over the file's default).
        max_new_tokens: overrides the configuration's; None takes `cfg.sampling.max_new_tokens`, and when that is null
            too, the configuration's own (the sampling-report stage's rule).

    Returns:
        One `Generation` per prompt.

    Raises:
        ConfigError: no configuration of that name in the file.
        orca8k.errors.DataError: the configuration file is missing or malformed.
    """
    from orca8k.data.chat_format import ChatEncoder
    from orca8k.sampling.generation import build_prompt_ids, derive_seed, generate_batched, resolve_generation_config

    sc = sampling_configuration(cfg, config_name)
    args = dict(sc.generate_args)
    if max_new_tokens is None:
        max_new_tokens = cfg.sampling.max_new_tokens
    if max_new_tokens is not None:
        args["max_new_tokens"] = max_new_tokens
    encoder = ChatEncoder(tokenizer)
    gen_config = resolve_generation_config(model, args, eos_token_id=encoder.eos_id, pad_token_id=tokenizer.pad_token_id)
    pre_text = sc.pre_text if system is None else system
    ids = [
        build_prompt_ids(encoder, p, mode=cfg.sampling.mode, pre_text=pre_text, add_prefix_tokens=bool(sc.add_prefix_tokens))
        for p in prompts
    ]
    return generate_batched(
        model, tokenizer, ids, gen_config, batch_size=cfg.sampling.batch_size, compact_every=cfg.sampling.compact_every,
        skip_special_tokens=cfg.sampling.skip_special_tokens, seed=derive_seed(cfg.seed, config_name, 0),
    )


def generate_cli(cfg: Config, args: argparse.Namespace) -> None:
    """`orca8k generate`: print each prompt's reply (and a note when it was cut at `--max-new-tokens`)."""
    sampling_configuration(cfg, args.sampling_config)  # a wrong --config fails before the weights load
    model, tokenizer, name = load_for_generation(cfg, args.model)
    outputs = generate(
        cfg, model, tokenizer, list(args.prompts), system=args.system, config_name=args.sampling_config,
        max_new_tokens=args.max_new_tokens,
    )
    for prompt, out in zip(args.prompts, outputs, strict=True):
        print(f"### {name} [{args.sampling_config}] prompt: {prompt}")
        print(out.text)
        if not out.ended:
            print(f"[cut at {out.new_tokens} new tokens: no </s>]")
        print()
