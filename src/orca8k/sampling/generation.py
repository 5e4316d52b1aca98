"""Batched generation for sampling reports and `orca8k generate`: prompts in the OA format, left padding with
attention masks, the effective decoding parameters, and outputs cut at the first `</s>`.

Prompts are built with `orca8k.data.chat_format.ChatEncoder.encode_prompt`, the same function (and the same BOS
rule) as training. Rows of a batch are left-padded with the pad id (= `</s>`) and masked; transformers derives
`position_ids` from the attention mask (`cumsum - 1`), so a padded row sees the same positions — and, with greedy
decoding, gives the same tokens — as the prompt alone (up to float rounding where two logits tie).

`generate` keeps a finished row in its batch until the longest row ends, so one long reply makes every short one pay
for its steps. `generate_batched` therefore runs `generate` `compact_every` new tokens at a time and, between calls,
drops the finished rows from the batch and from its KV cache (`Cache.batch_select_indices`); the rest continue from
the cache, with `min_new_tokens` reduced by the tokens already made. A row's computation is the same either way, so
greedy outputs do not change, and neither do seeded sampled ones (each row draws from its own generator, below).

A batch pads every prompt to its longest, which makes one long prompt costly for the whole prefill (on the demo
prompts, one of 136 tokens among eight of 34-52 tripled the prefill's positions). So the rows are first split into
groups of similar prompt length (`prefill_groups`); each group runs its prefill apart, and the groups' KV caches are
left-padded to the batch width and joined before decoding goes on as one batch.

Decoding writes into a `GrowingKVCache` (`orca8k.sampling.kv_cache`) sized for the batch width + `max_new_tokens`,
instead of transformers' `DynamicCache`, which copies the whole cache at every new token.

Sampling with a seed draws each output from its own generator (`RowSampler`), so a sampled output depends on its
prompt, its seed and the model, not on the batch it ran in: the same outputs batched or one at a time, with or
without compaction. transformers' own sampling draws every row from torch's one global generator, so its draws
depend on which rows share a batch and in what order.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from orca8k.model.rope import scaling_of
from orca8k.model.tokenizer import PREFIX_BEGIN, PREFIX_END

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

    from orca8k.data.chat_format import ChatEncoder

Mode = Literal["v3", "v2_5"]

# Decoding parameters recorded in a report when set: the ones that act in every mode, those that act only when
# sampling, and those that act only with beam search.
_COMMON_KEYS = (
    "do_sample", "num_beams", "max_new_tokens", "max_length", "min_new_tokens", "min_length", "repetition_penalty",
    "no_repeat_ngram_size", "bos_token_id", "eos_token_id", "pad_token_id",
)
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")
_BEAM_KEYS = ("length_penalty", "early_stopping", "num_beam_groups", "diversity_penalty")
COMPACT_EVERY = 8  # new tokens per generate call of `generate_batched` (finished rows leave the batch between calls)
# The fixed cost of one more prefill pass, in prompt positions (`prefill_groups`). Measured on the demo model on 2 CPU
# cores: a one-token forward pass costs about as much as 40 prompt positions of a longer one; larger models on a GPU
# cost more per pass in absolute terms but far less per position, so this errs toward fewer passes there.
PREFILL_PASS_COST = 64


@dataclass(frozen=True)
class Generation:
    """One generated output.

    Attributes:
        token_ids: the new tokens up to and including the first `</s>` (all new tokens when none came).
        text: `token_ids` decoded (special tokens kept or skipped as asked).
        ended: True when the output ended with `</s>` within `max_new_tokens` (a proper end).
        empty: True when nothing but special tokens or whitespace came before the end.
    """

    token_ids: tuple[int, ...]
    text: str
    ended: bool
    empty: bool

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


def build_prompt_ids(
    encoder: ChatEncoder, prompt: str, *, mode: Mode = "v3", pre_text: str | None = None, add_prefix_tokens: bool = False
) -> list[int]:
    """Token ids of a generation prompt, BOS exactly once (added by `ChatEncoder.encode_prompt`).

    Modes (OA's `sampling_report.py`):
        v3: `<s><|system|>{pre_text}</s><|prompter|>{prompt}</s><|assistant|>` (no system block without pre_text).
        v2_5: `<s>{prefix}<|prompter|>{prompt}</s><|assistant|>`, where prefix is `pre_text` as plain text, or
            `<|prefix_begin|>{pre_text}<|prefix_end|>` with `add_prefix_tokens` (OA's v2.5 prefix); empty without
            pre_text.

    Raises:
        ValueError: unknown mode.
    """
    if mode == "v3":
        return encoder.encode_prompt(prompt, system=pre_text or None)
    if mode != "v2_5":
        raise ValueError(f"unknown prompt mode {mode!r}; use v3 or v2_5")
    ids = encoder.encode_prompt(prompt, system=None)
    if not pre_text:
        return ids
    if add_prefix_tokens:
        begin, end = encoder.tokenizer.convert_tokens_to_ids([PREFIX_BEGIN, PREFIX_END])
        prefix = [begin, *encoder.segment_ids(pre_text), end]
    else:
        prefix = encoder.segment_ids(pre_text, first=True)
    return [ids[0], *prefix, *ids[1:]]  # ids[0] is the BOS encode_prompt added


def resolve_generation_config(
    model: PreTrainedModel, generate_args: dict[str, Any], *, eos_token_id: int, pad_token_id: int
) -> GenerationConfig:
    """The generation config `model.generate` will actually use, resolved up front so it can be recorded.

    Precedence as in transformers 5's `generate`: `generate_args` > the model's `generation_config` (a checkpoint
    may carry e.g. `temperature`/`top_p`) > transformers' global defaults (e.g. `top_k=50`, applied whenever
    `do_sample` is true and `top_k` unset). EOS and pad are the tokenizer's `</s>`.

    Raises:
        ValueError: transformers rejects the combination (e.g. a negative temperature).
    """
    from transformers import GenerationConfig

    config = GenerationConfig(**generate_args, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    model_defaults = model.generation_config.to_dict() if model.generation_config is not None else {}
    config.update(**model_defaults, defaults_only=True)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    # `max_new_tokens`/`min_new_tokens` replace the absolute lengths (generate sets them from the prompt length);
    # leaving the absolute ones unset avoids transformers' "both were set" warning.
    if config.max_new_tokens is not None:
        config.max_length = None
    if config.min_new_tokens is not None:
        config.min_length = None
    config.validate(strict=False)
    return config


def effective_params(config: GenerationConfig) -> dict[str, Any]:
    """The decoding parameters that act, from a resolved config (no None values).

    Sampling knobs are listed only when `do_sample` is true, beam knobs only when `num_beams > 1`, so a greedy
    report does not show a `top_k` that never applied, and a sampled one shows the implicit `top_k=50`.
    """
    keys = list(_COMMON_KEYS)
    if config.do_sample:
        keys += _SAMPLING_KEYS
    if (config.num_beams or 1) > 1:
        keys += _BEAM_KEYS
    out = {}
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            out[key] = value
    return out


def model_facts(model: PreTrainedModel) -> dict[str, Any]:
    """The model settings that change outputs: dtype, RoPE settings, native context, attention kernel."""
    config = model.config
    facts = {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "rope_parameters": scaling_of(config),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "device": str(next(model.parameters()).device),
    }
    return {k: v for k, v in facts.items() if v is not None}


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and labels (config name, sample index): the same labels give the same seed,
    whichever other configurations run, so a configuration's outputs do not depend on its neighbours."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def prompt_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """The seed of one prompt's output under a call's `seed`: `derive_seed(seed, "prompt", <its token ids>)`. It
    depends on the prompt itself, not on its position, so reordering, adding or removing other prompts does not
    change its draws (the same prompt twice under one seed draws the same output)."""
    return derive_seed(seed, "prompt", ",".join(str(int(t)) for t in prompt_ids))


def cut_at_eos(new_ids: Sequence[int], eos_token_id: int) -> tuple[list[int], bool]:
    """New tokens up to and including the first `eos_token_id`, and whether it was found.

    Args:
        new_ids: the generated tokens only (prompt removed) `[new_tokens]`; batched rows may trail pad (= eos) ids.
        eos_token_id: the id of `</s>`.

    Returns:
        (kept ids, ended): everything after the first EOS dropped; `ended` is False when no EOS was generated.
    """
    ids = [int(x) for x in new_ids]
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1], True
    return ids, False


# Sampling parameters that `RowSampler` takes over from `generate` (reset to transformers' neutral defaults in the
# greedy config it decodes with) — the warpers transformers applies when `do_sample` is true.
_WARPER_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
                    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def sampling_warpers(config: GenerationConfig) -> Any:
    """The warpers transformers 5's `generate` applies when sampling with `config` (`_get_logits_processor`, one
    beam): `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`,
    `TypicalLogitsWarper`, `EpsilonLogitsWarper`, `EtaLogitsWarper`, each only when its setting acts, in that order.

    Returns:
        A `LogitsProcessorList`, or None when `config` asks for what `RowSampler` does not reproduce (beam search,
        `top_h`, a watermark, or settings that would turn the greedy decoding it runs under into another mode:
        `penalty_alpha` (contrastive search), `prompt_lookup_num_tokens` (assisted decoding)): such configs sample
        with transformers' own sampler.
    """
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        EpsilonLogitsWarper,
        EtaLogitsWarper,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    if ((config.num_beams or 1) > 1 or any(getattr(config, key, None) is not None for key in (
            "top_h", "watermarking_config", "penalty_alpha", "prompt_lookup_num_tokens"))):
        return None
    warpers = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=1))
    return warpers


class RowSampler:
    """A transformers logits processor that samples every row of a batch from its own generator (Gumbel-max).

    For each row it applies the sampling warpers to the scores, then adds Gumbel(0, 1) noise `-log(-log(u))`,
    `u ~ U[0, 1)` drawn in float64 from that row's `torch.Generator` (on the CPU, so the draws are the same on every
    device; float64 so the noise reaches ≈ 36.7 nats, where float32's stops at 16.6 and would never pick a token
    more than ≈ 19 nats below the best; `u` is kept above 0, so the noise is finite).
    Greedy decoding's argmax of the result is a draw from `softmax(warped scores)` — exactly the distribution that
    transformers' `multinomial` sampling draws from (Gumbel 1954; Maddison et al. 2014, "A* Sampling") — and it uses
    one `vocab`-sized draw of the row's own generator per new token, whichever rows share its batch.

    Pass it to `generate` with a greedy config (`do_sample=False`, sampling knobs at their defaults): it must run
    after the other processors (repetition penalty, `min_new_tokens`), as transformers' warpers do, and custom
    processors come after those in a greedy `generate`.

    Args:
        warpers: `sampling_warpers(config)` of the config being sampled.
        generators: one CPU `torch.Generator` per row of the batch, in row order.

    Shapes: `scores` `[rows, vocab]` (float) in, the same shape out.
    """

    def __init__(self, warpers: Any, generators: Sequence[Any]) -> None:
        self.warpers = warpers
        self.generators = list(generators)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"RowSampler: {scores.shape[0]} rows of scores for {len(self.generators)} generators")
        scores = self.warpers(input_ids, scores)
        return scores + gumbel_noise(self.generators, scores.shape[1]).to(device=scores.device, dtype=scores.dtype)


def gumbel_noise(generators: Sequence[Any], size: int) -> Any:
    """Gumbel(0, 1) noise `[len(generators), size]` (float64, finite), row r drawn from `generators[r]`: one
    `torch.rand(size, dtype=float64)` per row, kept above 0, through `-log(-log(u))`."""
    import torch

    uniform = torch.stack([torch.rand(size, generator=g, dtype=torch.float64) for g in generators])
    tiny = torch.finfo(torch.float64).tiny
    return -torch.log(-torch.log(uniform.clamp_(min=tiny)))


def sampler_name(config: GenerationConfig) -> str | None:
    """How a seeded `generate_batched` draws with `config`, as recorded in a report's `sampling_params`: None for
    greedy and beam search, `"gumbel_max_per_row"` (`RowSampler`) or `"transformers_multinomial"` (transformers'
    sampler on torch's global generator, for configs `RowSampler` does not cover)."""
    if not config.do_sample:
        return None
    return "gumbel_max_per_row" if sampling_warpers(config) is not None else "transformers_multinomial"


def _row_sampling(config: GenerationConfig, seeds: Sequence[int] | None) -> tuple[Any, Any, list[Any]] | None:
    """(the greedy config to decode with, the warpers, one generator per row) when `config` samples and `seeds`
    are given and `RowSampler` can reproduce it (`sampling_warpers`); else None."""
    import torch

    if seeds is None or not config.do_sample:
        return None
    warpers = sampling_warpers(config)
    if warpers is None:
        return None
    greedy = copy.deepcopy(config)
    greedy.do_sample = False
    for key, value in _WARPER_DEFAULTS.items():
        setattr(greedy, key, value)
    return greedy, warpers, [torch.Generator().manual_seed(int(s)) for s in seeds]


def batch_groups(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """The prompts of each `generate` call of `generate_batched`: indices ordered longest prompt first (ties: input
    order), cut into groups of `batch_size`, so a batch pads little."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def generate_batched(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    generation_config: GenerationConfig,
    *,
    batch_size: int,
    skip_special_tokens: bool = True,
    seed: int | None = None,
    row_seeds: Sequence[int] | None = None,
    compact_every: int | None = COMPACT_EVERY,
    growing_cache: bool = True,
) -> list[Generation]:
    """Generate for many prompts, `batch_size` at a time, left-padded with attention masks.

    Prompts are grouped by length (longest first) to waste little compute on padding, and the results come back in
    the input order. Only the new tokens are decoded, cut at the first `</s>` (kept in `token_ids`; dropped from
    `text` when `skip_special_tokens`).

    With a seed (`seed` or `row_seeds`), sampling draws each prompt's output from its own generator (`RowSampler`):
    the outputs depend on the prompt, its seed and the model only, not on `batch_size`, `compact_every` or the other
    prompts. Configs that `RowSampler` does not cover (`sampling_warpers` returns None) and unseeded calls sample
    with transformers' sampler from torch's global generator (seeded once with `seed`, or with
    `derive_seed(*row_seeds)`, when given), whose draws depend on the batch. Greedy outputs never depend on it.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer (pad = eos = `</s>`).
        prompt_ids: one list of token ids per prompt, each starting with BOS (`build_prompt_ids`).
        generation_config: from `resolve_generation_config` (its `eos_token_id` ends an output).
        batch_size: rows per `generate` call.
        skip_special_tokens: drop special tokens (`</s>`, `<|assistant|>`, ...) from the decoded text.
        seed: each prompt's output is seeded with `prompt_seed(seed, its ids)` (ignored when `row_seeds` is given).
        row_seeds: one seed per prompt (a report's outputs: `prompt_seed(sample seed, prompt ids)`).
        compact_every: new tokens per `generate` call; finished rows leave the batch between calls (see the module
            docstring). None: one call per batch, finished rows kept to the end (transformers' behaviour). Ignored
            (None) for a batch of one row (nothing to drop; the same outputs, sampled ones included), for beam
            search, whose rows are not independent prompts, and without a dynamic KV cache (`use_cache=False`, a
            `cache_implementation` such as "static").
        growing_cache: decode into a `GrowingKVCache` (`orca8k.sampling.kv_cache`; the same outputs, no copy of the
            cache per token); False keeps transformers' `DynamicCache` (what `benchmarks/bench_sampling.py` compares).

    Returns:
        One `Generation` per prompt, in order.

    Raises:
        ValueError: an empty prompt, `batch_size` < 1, `compact_every` < 1, no `max_new_tokens`, an absolute
            `min_length` without `min_new_tokens`, `num_return_sequences` > 1, or `row_seeds` not one per prompt.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if compact_every is not None and compact_every < 1:
        raise ValueError(f"compact_every must be >= 1 or None, got {compact_every}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate_batched: empty prompt ids")
    if generation_config.max_new_tokens is None:
        raise ValueError("generate_batched: set max_new_tokens (an absolute max_length counts the prompt and, in a "
                         "left-padded batch, its padding)")
    if generation_config.min_new_tokens is None and (generation_config.min_length or 0) > 0:
        raise ValueError("generate_batched: use min_new_tokens, not min_length (an absolute length counts the "
                         "prompt and, in a left-padded batch, its padding)")
    if (generation_config.num_return_sequences or 1) > 1:
        raise ValueError("generate_batched returns one output per prompt: num_return_sequences must be 1 (draw "
                         "several samples with their own seeds, as `sample_reports` does)")
    eos = generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else eos
    device = next(model.parameters()).device
    if row_seeds is not None and len(row_seeds) != len(prompt_ids):
        raise ValueError(f"generate_batched: {len(row_seeds)} row_seeds for {len(prompt_ids)} prompts")
    if row_seeds is None and seed is not None:
        row_seeds = [prompt_seed(seed, ids) for ids in prompt_ids]
    per_row = _row_sampling(generation_config, row_seeds)
    if per_row is not None:
        generation_config, warpers, generators = per_row
    else:
        warpers, generators = None, [None] * len(prompt_ids)
        if seed is not None:
            torch.manual_seed(seed)
        elif row_seeds is not None and generation_config.do_sample:  # transformers' sampler: one seed for the call
            torch.manual_seed(derive_seed(*row_seeds))
    results: dict[int, Generation] = {}
    with torch.inference_mode():
        for rows in batch_groups(prompt_ids, batch_size):
            width = max(len(prompt_ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [batch, seq_len]
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [batch, seq_len]
            for r, i in enumerate(rows):
                ids = torch.tensor(list(prompt_ids[i]), dtype=torch.long)
                input_ids[r, width - len(ids) :] = ids
                attention_mask[r, width - len(ids) :] = 1
            sampler = (warpers, [generators[i] for i in rows]) if warpers is not None else None
            new = _generate_compacting(model, input_ids.to(device), attention_mask.to(device), generation_config,
                                       eos, pad, compact_every, growing_cache, sampler)
            for r, i in enumerate(rows):
                kept, ended = cut_at_eos(new[r], eos)
                text = tokenizer.decode(kept, skip_special_tokens=skip_special_tokens)
                plain = text if skip_special_tokens else tokenizer.decode(kept, skip_special_tokens=True)
                results[i] = Generation(tuple(kept), text, ended, not plain.strip())
    return [results[i] for i in range(len(prompt_ids))]


def prefill_groups(lengths: Sequence[int], pass_cost: int = PREFILL_PASS_COST) -> list[list[int]]:
    """Split a batch's rows into groups that run their prefill apart, so short prompts are not padded to the width
    of a long one.

    A group of n rows whose longest prompt has w tokens costs n·w positions, plus `pass_cost` for its forward pass;
    the partition of the rows (sorted longest first) into contiguous groups of least total cost is found by dynamic
    programming over the rows (O(rows²)).

    Args:
        lengths: prompt lengths in tokens, one per row of the batch.
        pass_cost: the fixed cost of one more forward pass, in prompt positions.

    Returns:
        Row indices per group, longest prompts first (ties: row order); one group when splitting saves nothing.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = [0.0] + [float("inf")] * len(order)  # best[k]: least cost of the first k rows of `order`
    start = [0] * (len(order) + 1)  # start[k]: where the last group of that best partition begins
    for k in range(1, len(order) + 1):
        for j in range(k):  # rows j..k-1 as one group, padded to the width of row j (the longest)
            cost = best[j] + pass_cost + (k - j) * lengths[order[j]]
            if cost < best[k]:
                best[k], start[k] = cost, j
    groups, k = [], len(order)
    while k > 0:
        groups.append(order[start[k] : k])
        k = start[k]
    return groups[::-1]


def _generate_compacting(model: PreTrainedModel, input_ids: Any, attention_mask: Any, generation_config: GenerationConfig,
                         eos: int, pad: int, compact_every: int | None, growing_cache: bool = True,
                         sampler: tuple[Any, list[Any]] | None = None) -> list[list[int]]:
    """The new token ids of each row of one left-padded batch (`input_ids`, `attention_mask`: [batch, seq_len]),
    generated `compact_every` tokens per `generate` call, finished rows dropped between calls (module docstring).
    With `sampler` (the warpers, one generator per row), every call samples its rows with a `RowSampler` over
    those rows' generators (`generation_config` is then the greedy one of `_row_sampling`).

    When the prompt lengths differ enough (`prefill_groups`), each group of similar length first runs its prefill and
    first new token apart, at its own width; the groups' KV caches are then left-padded to the batch width and joined
    (`_join_prefilled`), and decoding goes on as one batch, exactly as if the batch had been prefilled together."""
    import torch
    from transformers import LogitsProcessorList

    def processors(rows: Any) -> dict[str, Any]:
        """The `logits_processor` argument for a call on the batch's rows `rows` (indices into `input_ids`)."""
        if sampler is None:
            return {}
        warpers, generators = sampler
        return {"logits_processor": LogitsProcessorList([RowSampler(warpers, [generators[int(r)] for r in rows])])}

    total = generation_config.max_new_tokens
    if (compact_every is None or input_ids.shape[0] == 1 or (generation_config.num_beams or 1) > 1
            or generation_config.use_cache is False or generation_config.cache_implementation not in (None, "dynamic")):
        cache = _growing_cache(model, generation_config, input_ids.shape[1] + total) if growing_cache else None
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                             **({"cache": cache} if cache is not None else {}), **processors(range(input_ids.shape[0])))
        return out[:, input_ids.shape[1]:].tolist()  # [batch, new_tokens]
    width = input_ids.shape[1]
    min_new = generation_config.min_new_tokens or 0

    def call(sequences: Any, mask: Any, cache: Any, done: int, tokens: int, rows: Any) -> tuple[Any, Any, int]:
        """(sequences after the call, its KV cache, new tokens asked) for up to `tokens` more tokens; `rows`: the
        batch rows (indices into `input_ids`) that `sequences` holds, in order."""
        step = copy.deepcopy(generation_config)
        step.max_new_tokens = min(tokens, total - done)
        # 0, not None, once the minimum is met: generate fills None from the model's own generation_config (a
        # registered model carries the report's `min_new_tokens`), which would block `</s>` again in every call
        step.min_new_tokens = min(step.max_new_tokens, max(0, min_new - done))
        step.min_length = None  # min_new_tokens rules (an absolute min_length is refused above); a set min_length
        # beside it only makes generate warn on every call
        step.return_dict_in_generate = True
        out = model.generate(input_ids=sequences, attention_mask=mask, generation_config=step, cache=cache,
                             **processors(rows))
        return out.sequences, out.cache, step.max_new_tokens

    new_ids: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    rows = torch.arange(input_ids.shape[0])  # the batch's rows still generating, by their index in `input_ids`
    # decoding writes into buffers sized for the whole output (`kv_cache`), not a copy of the cache per token
    cache = _growing_cache(model, generation_config, width + total) if growing_cache else None
    sequences, mask, done = input_ids, attention_mask, 0
    groups = prefill_groups(attention_mask.sum(dim=1).tolist(), PREFILL_PASS_COST) if total > 1 else []
    pending = None  # the first call's (sequences, cache, tokens asked) when the groups' prefills were joined
    if len(groups) > 1:
        parts = []
        # the groups' first tokens draw once from each row's generator; if their caches cannot be joined, that work
        # is dropped and the batch starts over, so the generators go back to where they were
        states = [g.get_state() for g in sampler[1]] if sampler is not None else []
        for group in groups:  # each group's prefill and first new token, at the group's own width
            index = torch.tensor(group, device=input_ids.device)
            w = int(attention_mask[index].sum(dim=1).max())
            parts.append((index, *call(input_ids[index, -w:], attention_mask[index, -w:], None, 0, 1, group)[:2]))
        joined = _join_prefilled(parts, width, pad, capacity=width + total if growing_cache else None)
        if joined is not None:
            order, produced, joined_cache = joined
            rows = order.cpu()
            sequences, mask = input_ids[order], attention_mask[order]
            pending = (produced, joined_cache, 1)
        elif sampler is not None:
            for generator, state in zip(sampler[1], states, strict=True):
                generator.set_state(state)
    while True:
        produced, cache, asked = pending or call(sequences, mask, cache, done, compact_every, rows.tolist())
        pending = None
        made = produced.shape[1] - sequences.shape[1]  # fewer than asked when every row ended
        done += made
        # a row is done when it made `</s>` or reached `max_new_tokens`; generate stops early only when all are done
        finished = (produced[:, width:] == eos).any(dim=1).cpu()
        if done >= total or made < asked:
            finished[:] = True
        for r in torch.nonzero(finished).flatten().tolist():
            new_ids[int(rows[r])] = produced[r, width:].tolist()
        keep = torch.nonzero(~finished).flatten()
        if keep.numel() == 0:
            return new_ids
        keep_here = keep.to(produced.device)
        if keep.numel() < finished.numel():
            cache.batch_select_indices(keep_here)
        sequences = produced[keep_here]
        mask = torch.cat([mask[keep_here], mask.new_ones((keep.numel(), made))], dim=1)
        rows = rows[keep]


def _growing_cache(model: PreTrainedModel, generation_config: GenerationConfig, capacity: int) -> Any:
    """A `GrowingKVCache` of `capacity` positions for one `generate` call, or None (transformers' own cache) with beam
    search, without a cache, with a `cache_implementation` named explicitly ("dynamic" included: the library's, as
    asked) or for a model whose layers it does not cover (`GrowingKVCache.for_model`)."""
    from orca8k.sampling.kv_cache import GrowingKVCache

    if ((generation_config.num_beams or 1) > 1 or generation_config.use_cache is False
            or generation_config.cache_implementation is not None):
        return None
    return GrowingKVCache.for_model(model, capacity)


def _join_prefilled(parts: list[tuple[Any, Any, Any]], width: int, pad: int, capacity: int | None = 0
                    ) -> tuple[Any, Any, Any] | None:
    """Join the outputs of prefills run apart into one batch, as if it had been prefilled together.

    Args:
        parts: per group, (row indices [n_g], sequences [n_g, w_g + 1] (prompt at its own width + 1 new token),
            its `DynamicCache` holding w_g positions).
        width: the batch width; every part is left-padded to it (pad ids in the sequences, zeros in the cache; the
            attention mask hides both).
        pad: the pad id.
        capacity: positions the joined cache's buffers hold before they grow (`GrowingKVCache`); None joins into
            transformers' `DynamicCache` instead.

    Returns:
        (row indices [n], sequences [n, width + 1], a cache of width positions: `GrowingKVCache`, or `DynamicCache`
        when `capacity` is None), or None when a cache is not a plain `DynamicCache` of full-attention layers
        (sliding windows, quantised layers): those cannot be padded.
    """
    import torch
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from orca8k.sampling.kv_cache import GrowingKVCache, GrowingKVLayer

    caches = [cache for _, _, cache in parts]
    if not all(type(c) in (DynamicCache, GrowingKVCache)
               and all(type(layer) in (DynamicLayer, GrowingKVLayer) for layer in c.layers) for c in caches):
        return None
    if any(c.get_seq_length() != seq.shape[1] - 1 for _, seq, c in parts):
        return None
    rows = torch.cat([index for index, _, _ in parts])
    sequences = torch.cat([F.pad(seq, (width + 1 - seq.shape[1], 0), value=pad) for _, seq, _ in parts])
    layers = []
    for per_part in zip(*(list(c) for c in caches), strict=True):  # one layer: ((keys, values, _) of each part)
        # keys/values: [n_g, heads, w_g, head_dim] → left-padded to [n_g, heads, width, head_dim], then joined
        keys = torch.cat([F.pad(k, (0, 0, width - k.shape[2], 0)) for k, _, _ in per_part])
        values = torch.cat([F.pad(v, (0, 0, width - v.shape[2], 0)) for _, v, _ in per_part])
        layers.append((keys, values))
    if capacity is None:
        return rows, sequences, DynamicCache(ddp_cache_data=layers)
    return rows, sequences, GrowingKVCache.from_states(layers, capacity)
