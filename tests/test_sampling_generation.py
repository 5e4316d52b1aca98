"""Batched generation: OA prompt ids (BOS once), effective parameters, the eos cut, batched == unbatched greedy,
reproducible sampling."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from orca8k.data.chat_format import ChatEncoder
from orca8k.model.tokenizer import ASSISTANT, BOS, EOS, PREFIX_BEGIN, PREFIX_END, PROMPTER, SYSTEM
from orca8k.sampling.generation import (
    RowSampler,
    build_prompt_ids,
    cut_at_eos,
    derive_seed,
    effective_params,
    generate_batched,
    model_facts,
    prefill_groups,
    prompt_seed,
    resolve_generation_config,
    sampler_name,
    sampling_warpers,
)
from orca8k.sampling.loading import load_local_model
from tests.fixtures.models import make_tiny_llama
from tests.fixtures.sampling import QA
from tests.fixtures.sampling import SYSTEM as FIXTURE_SYSTEM


@pytest.fixture()
def encoder(tokenizer):
    return ChatEncoder(tokenizer)


def _ids(tokenizer, *tokens):
    return tokenizer.convert_tokens_to_ids(list(tokens))


def test_v3_prompt_ids_are_the_training_format_with_bos_once(tokenizer, encoder):
    ids = build_prompt_ids(encoder, "What is 2 + 3?", mode="v3", pre_text="Be brief.")
    bos, eos, sys_id, prompter, assistant = _ids(tokenizer, BOS, EOS, SYSTEM, PROMPTER, ASSISTANT)
    expected = [bos, sys_id, *encoder.segment_ids("Be brief."), eos, prompter, *encoder.segment_ids("What is 2 + 3?"),
                eos, assistant]
    assert ids == expected
    assert ids.count(bos) == 1
    assert tokenizer.decode(ids) == "<s><|system|>Be brief.</s><|prompter|>What is 2 + 3?</s><|assistant|>"
    # the training encoder gives the same prefix for the same conversation
    chat = encoder.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                                {"role": "assistant", "content": "5"}])
    assert chat.input_ids[: len(ids)] == ids


def test_v2_5_has_no_system_block_and_oa_prefixes(tokenizer, encoder):
    bos, sys_id, begin, end = _ids(tokenizer, BOS, SYSTEM, PREFIX_BEGIN, PREFIX_END)
    plain = build_prompt_ids(encoder, "hi", mode="v2_5")
    assert plain == build_prompt_ids(encoder, "hi", mode="v3") and sys_id not in plain
    assert tokenizer.decode(plain) == "<s><|prompter|>hi</s><|assistant|>"
    raw = build_prompt_ids(encoder, "hi", mode="v2_5", pre_text="Context.")
    assert raw == [bos, *encoder.segment_ids("Context.", first=True), *plain[1:]] and sys_id not in raw
    tagged = build_prompt_ids(encoder, "hi", mode="v2_5", pre_text="Context.", add_prefix_tokens=True)
    assert tagged == [bos, begin, *encoder.segment_ids("Context."), end, *plain[1:]]
    assert [x.count(bos) for x in (plain, raw, tagged)] == [1, 1, 1]
    with pytest.raises(ValueError, match="unknown prompt mode 'v2'"):
        build_prompt_ids(encoder, "hi", mode="v2")


def test_cut_at_first_eos():
    assert cut_at_eos([5, 6, 2, 7, 2, 2], 2) == ([5, 6, 2], True)
    assert cut_at_eos([2, 2], 2) == ([2], True)
    assert cut_at_eos([5, 6, 7], 2) == ([5, 6, 7], False)
    assert cut_at_eos([], 2) == ([], False)


def test_effective_params_include_library_and_checkpoint_defaults(tokenizer):
    model = make_tiny_llama(len(tokenizer))
    kw = {"eos_token_id": 2, "pad_token_id": 2}
    sampled = effective_params(resolve_generation_config(model, {"do_sample": True, "temperature": 0.8, "max_new_tokens": 7}, **kw))
    assert sampled["top_k"] == 50 and sampled["top_p"] == 1.0 and sampled["temperature"] == 0.8  # implicit top_k
    assert sampled["max_new_tokens"] == 7 and sampled["repetition_penalty"] == 1.0
    assert (sampled["eos_token_id"], sampled["pad_token_id"], sampled["do_sample"], sampled["num_beams"]) == (2, 2, True, 1)
    assert "max_length" not in sampled and None not in sampled.values()
    greedy = effective_params(resolve_generation_config(model, {"do_sample": False, "max_new_tokens": 7}, **kw))
    assert not {"top_k", "top_p", "temperature"} & set(greedy) and greedy["do_sample"] is False
    # a checkpoint's generation_config (Llama-2 ships temperature 0.6 / top_p 0.9) fills what the file leaves unset
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.9
    merged = effective_params(resolve_generation_config(model, {"do_sample": True, "top_p": 0.95}, **kw))
    assert (merged["temperature"], merged["top_p"], merged["top_k"]) == (0.6, 0.95, 50)


def test_model_facts_record_dtype_and_rope(tokenizer):
    model = make_tiny_llama(len(tokenizer), rope_scaling={"rope_type": "linear", "factor": 2.0})
    facts = model_facts(model)
    assert facts["dtype"] == "float32" and facts["max_position_embeddings"] == 64 and facts["device"] == "cpu"
    assert facts["rope_parameters"]["rope_type"] == "linear" and facts["rope_parameters"]["factor"] == 2.0


def _greedy_qa(model, tok):
    """The fixture's eight questions as v3 prompts with its system prompt, and a greedy config of 24 new tokens."""
    enc = ChatEncoder(tok)
    prompts = [build_prompt_ids(enc, q, pre_text=FIXTURE_SYSTEM) for q, _ in QA]
    config = resolve_generation_config(model, {"do_sample": False, "max_new_tokens": 24}, eos_token_id=enc.eos_id,
                                       pad_token_id=tok.pad_token_id)
    return enc, prompts, config


@contextmanager
def _forward_shapes(model):
    """Record the `input_ids` shape [rows, new positions] of every forward pass of `model` inside the block."""
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        yield shapes
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def trained(sampling_model_dir):
    return load_local_model(sampling_model_dir, device="cpu")


def test_greedy_batched_equals_unbatched_on_a_trained_model(trained):
    model, tok = trained
    enc = ChatEncoder(tok)
    prompts = [build_prompt_ids(enc, q, pre_text=FIXTURE_SYSTEM) for q, _ in QA]
    assert len({len(p) for p in prompts}) > 3  # rows really are padded
    config = resolve_generation_config(model, {"do_sample": False, "max_new_tokens": 24}, eos_token_id=enc.eos_id,
                                       pad_token_id=tok.pad_token_id)
    one = generate_batched(model, tok, prompts, config, batch_size=1)
    batched = generate_batched(model, tok, prompts, config, batch_size=len(prompts))
    pairs = generate_batched(model, tok, prompts, config, batch_size=3)
    assert [g.token_ids for g in batched] == [g.token_ids for g in one] == [g.token_ids for g in pairs]
    # the trained model answers its questions and ends properly: the eos cut
    assert [g.text for g in one] == [a for _, a in QA]
    assert all(g.ended and g.token_ids[-1] == enc.eos_id and g.token_ids.count(enc.eos_id) == 1 for g in one)


def test_finished_rows_leave_the_batch_and_greedy_outputs_stay_the_same(trained):
    model, tok = trained
    enc, prompts, config = _greedy_qa(model, tok)
    reference = [g.token_ids for g in generate_batched(model, tok, prompts, config, batch_size=1, compact_every=None)]
    lengths = [len(ids) for ids in reference]
    assert lengths == [2, 3, 8, 7, 2, 7, 2, 21]  # the fixture's answers (+ </s>)
    width = max(len(p) for p in prompts)
    rows = {}
    for every in (None, 1, 3, 100):
        with _forward_shapes(model) as forwards:
            out = generate_batched(model, tok, prompts, config, batch_size=len(prompts), compact_every=every)
        assert [g.token_ids for g in out] == reference
        assert forwards[0] == (8, width) and all(n == 1 for _, n in forwards[1:])  # one prefill, then the cache
        rows[every] = [r for r, _ in forwards]
    assert rows[None] == rows[100] == [8] * 21  # transformers keeps finished rows to the end
    assert rows[1] == [sum(n >= t for n in lengths) for t in range(1, 22)] == [8, 8, 5, 4, 4, 4, 4, 2] + [1] * 13
    # every 3 tokens: after 3, the four rows of 2-3 tokens leave; after 9, those of 7-8; the 21-token row runs alone
    assert rows[3] == [8] * 3 + [4] * 6 + [1] * 12
    assert sum(rows[3]) == 60 < sum(rows[None]) == 168
    # one prompt at a time there is no row to drop: one generate call per prompt, whatever compact_every
    calls = []
    generate = model.generate
    model.generate = lambda *a, **kw: calls.append(tuple(kw["input_ids"].shape)) or generate(*a, **kw)
    try:
        alone = generate_batched(model, tok, prompts, config, batch_size=1, compact_every=1)
    finally:
        del model.generate
    assert [g.token_ids for g in alone] == reference
    assert sorted(calls) == sorted((1, len(p)) for p in prompts)  # one call each (in longest-first order)


def test_decoding_writes_into_one_growing_cache_per_batch(trained):
    """Every decode step of a batch (prefilled together: these prompts form one prefill group) and of a one-row call
    runs on a `GrowingKVCache` whose buffers were sized for the whole output at the start: no reallocation, no copy
    per token. (Caches joined after grouped prefills: `test_join_prefilled_pads_caches_on_the_left`.)"""
    from orca8k.sampling.kv_cache import GrowingKVCache

    model, tok = trained
    enc, prompts, config = _greedy_qa(model, tok)
    reference = [g.token_ids for g in generate_batched(model, tok, prompts, config, batch_size=1, compact_every=None)]
    width = max(len(p) for p in prompts)
    for batch_size, every in ((len(prompts), 3), (len(prompts), None), (1, None)):
        seen: list = []  # (cache object, its first layer's key buffer) of every decode step (one new position a row)

        def record(_m, _a, kw, seen=seen):
            if kw["input_ids"].shape[1] == 1:
                seen.append((kw["cache"], kw["cache"].layers[0]._key_buffer))

        hook = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            out = generate_batched(model, tok, prompts, config, batch_size=batch_size, compact_every=every)
        finally:
            hook.remove()
        assert [g.token_ids for g in out] == reference
        assert seen and all(type(cache) is GrowingKVCache for cache, _ in seen)
        if batch_size > 1:  # one cache for the batch; its buffers: the batch width + max_new_tokens positions
            assert len({id(cache) for cache, _ in seen}) == 1
            assert {buffer.shape[2] for _, buffer in seen} == {width + config.max_new_tokens}
    # growing_cache=False: transformers' DynamicCache throughout (the bench's comparison), the same outputs
    from transformers.cache_utils import DynamicCache

    caches: list = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: caches.append(type(kw["cache"])), with_kwargs=True)
    try:
        out = generate_batched(model, tok, prompts, config, batch_size=len(prompts), compact_every=3,
                               growing_cache=False)
    finally:
        hook.remove()
    assert [g.token_ids for g in out] == reference and set(caches[1:]) == {DynamicCache}


def _partition_cost(lengths, groups, pass_cost):
    return sum(pass_cost + len(g) * max(lengths[i] for i in g) for g in groups)


def test_prefill_groups_split_off_long_prompts_at_least_cost():
    demo = [38, 38, 34, 52, 39, 40, 51, 36, 136]  # the demo prompts' lengths
    groups = prefill_groups(demo, 64)
    assert groups == [[8], [3, 6], [5, 4, 0, 1, 7, 2]]
    assert _partition_cost(demo, groups, 64) == 64 + 136 + 64 + 2 * 52 + 64 + 6 * 40 == 672 < 64 + 9 * 136
    assert prefill_groups([30, 30, 30], 64) == [[0, 1, 2]]  # nothing to save: one pass
    assert prefill_groups([40, 32, 36], 64) == [[0, 2, 1]]  # splitting would save 4-8 positions, less than a pass
    assert prefill_groups([5, 9, 5, 9], 0) == [[1, 3], [0, 2]]  # free passes: one group per length
    assert prefill_groups([7], 64) == [[0]] and prefill_groups([], 64) == []
    # least cost over every contiguous partition of the rows sorted longest first (brute force, 2^(n-1) of them)
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 8))]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        best = min(
            _partition_cost(lengths, [order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], 64)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        groups = prefill_groups(lengths, 64)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert _partition_cost(lengths, groups, 64) == best


def test_prompts_of_different_lengths_prefill_apart_and_decode_together(trained, monkeypatch):
    import orca8k.sampling.generation as generation

    model, tok = trained
    enc, prompts, config = _greedy_qa(model, tok)
    reference = [g.token_ids for g in generate_batched(model, tok, prompts, config, batch_size=1, compact_every=None)]
    lengths = [len(p) for p in prompts]
    assert prefill_groups(lengths, generation.PREFILL_PASS_COST) == [sorted(range(8), key=lambda i: -lengths[i])]
    monkeypatch.setattr(generation, "PREFILL_PASS_COST", 0)  # every prompt length its own prefill pass
    groups = prefill_groups(lengths, 0)
    assert len(groups) == len(set(lengths)) > 3
    with _forward_shapes(model) as forwards:
        out = generate_batched(model, tok, prompts, config, batch_size=len(prompts), compact_every=3)
    assert [g.token_ids for g in out] == reference
    # each group's prefill at its own width, then one batch continues from the joined caches: the first new token
    # came from the prefills, so the batch's first call makes tokens 2-4, and the rows of 2-3 tokens leave after it
    assert forwards[: len(groups)] == [(len(g), lengths[g[0]]) for g in groups]
    output_lengths = [len(ids) for ids in reference]
    assert forwards[len(groups):] == [(8 - sum(n <= 1 for n in output_lengths), 1)] * 3 + [
        (sum(n > 4 for n in output_lengths), 1)] * 3 + [(sum(n > 7 for n in output_lengths), 1)] * 3 + [(1, 1)] * 11
    assert sum(r for r, _ in forwards[: len(groups)]) == 8


def test_join_prefilled_pads_caches_on_the_left():
    import torch
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    from orca8k.sampling.generation import _join_prefilled
    from orca8k.sampling.kv_cache import GrowingKVLayer

    k1, v1 = torch.ones(2, 3, 4, 5), torch.full((2, 3, 4, 5), 2.0)  # a group of 2 rows, 4 positions
    k2, v2 = torch.full((1, 3, 6, 5), 3.0), torch.full((1, 3, 6, 5), 4.0)  # 1 row, 6 positions
    seq1, seq2 = torch.tensor([[7, 8, 9, 10, 11], [2, 8, 9, 10, 12]]), torch.tensor([[5, 6, 7, 8, 9, 10, 13]])
    parts = [(torch.tensor([0, 2]), seq1, DynamicCache(ddp_cache_data=[(k1, v1)] * 2)),
             (torch.tensor([1]), seq2, DynamicCache(ddp_cache_data=[(k2, v2)] * 2))]
    rows, sequences, cache = _join_prefilled(parts, 6, pad=2)
    assert rows.tolist() == [0, 2, 1]
    assert sequences.tolist() == [[2, 2, 7, 8, 9, 10, 11], [2, 2, 2, 8, 9, 10, 12], [5, 6, 7, 8, 9, 10, 13]]
    assert cache.get_seq_length() == 6 and len(cache.layers) == 2
    assert all(type(layer) is GrowingKVLayer for layer in cache.layers)
    keys, values = cache.layers[1].keys, cache.layers[1].values
    assert keys.shape == values.shape == (3, 3, 6, 5)
    assert keys[:2, :, :2].eq(0).all() and keys[:2, :, 2:].eq(1).all() and keys[2].eq(3).all()
    assert values[:2, :, :2].eq(0).all() and values[:2, :, 2:].eq(2).all() and values[2].eq(4).all()
    # a sliding-window layer cannot be left-padded: no join (the caller prefills the batch together instead)
    sliding = DynamicCache(ddp_cache_data=[(k2, v2, torch.tensor(4))])
    assert isinstance(sliding.layers[0], DynamicSlidingWindowLayer)
    assert _join_prefilled([parts[0], (torch.tensor([1]), seq2, sliding)], 6, pad=2) is None


def test_compacting_calls_do_not_make_generate_warn(trained):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    model, tok = trained
    enc, prompts, config = _greedy_qa(model, tok)
    assert config.min_new_tokens is None and config.min_length is not None  # what made every call warn
    with CaptureLogger(logging.get_logger("transformers.generation.utils")) as captured:
        generate_batched(model, tok, prompts, config, batch_size=len(prompts), compact_every=2)
    assert "min_new_tokens" not in captured.out and "min_length" not in captured.out


@pytest.mark.parametrize("pass_cost", [64, 0])  # 0: the four prompt lengths prefill apart
def test_min_new_tokens_holds_across_compacting_calls(trained, monkeypatch, pass_cost):
    import orca8k.sampling.generation as generation

    monkeypatch.setattr(generation, "PREFILL_PASS_COST", pass_cost)
    model, tok = trained
    enc = ChatEncoder(tok)
    prompts = [build_prompt_ids(enc, q, pre_text=FIXTURE_SYSTEM) for q, _ in QA[:4]]
    assert len(prefill_groups([len(p) for p in prompts], pass_cost)) == (1 if pass_cost else 4)
    config = resolve_generation_config(model, {"max_new_tokens": 9, "min_new_tokens": 7}, eos_token_id=enc.eos_id,
                                       pad_token_id=tok.pad_token_id)
    whole = generate_batched(model, tok, prompts, config, batch_size=4, compact_every=None)
    parts = generate_batched(model, tok, prompts, config, batch_size=4, compact_every=2)
    assert [g.token_ids for g in parts] == [g.token_ids for g in whole]
    assert all(g.new_tokens >= 7 and enc.eos_id not in g.token_ids[:6] for g in parts)
    assert config.min_new_tokens == 7  # the caller's config is not changed by the per-call copies


def test_a_minimum_from_the_models_own_generation_config_holds_once(trained, monkeypatch):
    # a registered model carries the report's decoding defaults in generation_config.json (min_new_tokens 4 here):
    # once the minimum is met, later compacting calls must not fall back to it and block `</s>` again
    model, tok = trained
    monkeypatch.setattr(model.generation_config, "min_new_tokens", 4)
    enc, prompts, config = _greedy_qa(model, tok)
    assert config.min_new_tokens == 4
    whole = [g.token_ids for g in generate_batched(model, tok, prompts, config, batch_size=1, compact_every=None)]
    for every in (1, 3):
        assert [g.token_ids for g in generate_batched(model, tok, prompts, config, batch_size=8,
                                                      compact_every=every)] == whole
    # the minimum acted once: the answers of 7+ tokens are the trained ones; the 2-3-token ones ran past 4 tokens
    # (before the fix, compacting every 3 tokens blocked `</s>` again in each call: every row ran to 24)
    lengths = [len(ids) for ids in whole]
    assert [lengths[i] for i in (2, 3, 5, 7)] == [8, 7, 7, 21]
    assert all(4 < lengths[i] < 24 for i in (0, 1, 4, 6))
    assert all(ids[-1] == enc.eos_id and enc.eos_id not in ids[:4] for ids in whole)


def test_no_dynamic_cache_means_one_call_per_batch(trained):
    model, tok = trained
    enc = ChatEncoder(tok)
    prompts = [build_prompt_ids(enc, q, pre_text=FIXTURE_SYSTEM) for q, _ in QA[:4]]
    args = {"do_sample": False, "max_new_tokens": 12}
    config = resolve_generation_config(model, args, eos_token_id=enc.eos_id, pad_token_id=tok.pad_token_id)
    reference = [g.token_ids for g in generate_batched(model, tok, prompts, config, batch_size=1)]
    for extra in ({"use_cache": False}, {"cache_implementation": "static"}):
        other = resolve_generation_config(model, {**args, **extra}, eos_token_id=enc.eos_id,
                                          pad_token_id=tok.pad_token_id)
        assert [g.token_ids for g in generate_batched(model, tok, prompts, other, batch_size=4)] == reference


def test_eos_cut_and_special_tokens(trained):
    model, tok = trained
    enc = ChatEncoder(tok)
    prompts = [build_prompt_ids(enc, q, pre_text=FIXTURE_SYSTEM) for q, _ in QA[:3]]
    config = resolve_generation_config(model, {"max_new_tokens": 24}, eos_token_id=enc.eos_id, pad_token_id=tok.pad_token_id)
    kept = generate_batched(model, tok, prompts, config, batch_size=3, skip_special_tokens=False)
    assert [g.text for g in kept] == [f"{a}</s>" for _, a in QA[:3]]
    assert not any(g.empty for g in kept)
    # min_new_tokens = max_new_tokens forbids </s>: the output runs to the budget and is not a proper end
    forced = resolve_generation_config(model, {"max_new_tokens": 5, "min_new_tokens": 5}, eos_token_id=enc.eos_id,
                                       pad_token_id=tok.pad_token_id)
    cut = generate_batched(model, tok, prompts, forced, batch_size=3)
    assert [(g.new_tokens, g.ended) for g in cut] == [(5, False)] * 3
    assert all(enc.eos_id not in g.token_ids for g in cut)


def test_sampling_is_reproducible_for_a_fixed_seed(tokenizer, encoder):
    model = make_tiny_llama(len(tokenizer))  # flat logits: sampling draws differ from seed to seed
    prompts = [build_prompt_ids(encoder, p) for p in ("one", "two three", "four five six")]
    config = resolve_generation_config(model, {"do_sample": True, "max_new_tokens": 8}, eos_token_id=encoder.eos_id,
                                       pad_token_id=tokenizer.pad_token_id)
    run = lambda seed, every=None: [  # noqa: E731
        g.token_ids for g in generate_batched(model, tokenizer, prompts, config, batch_size=2, seed=seed,
                                              compact_every=every)]
    first = run(123)
    assert run(123) == first
    assert run(124) != first
    assert run(123, every=3) == run(123, every=3)
    assert derive_seed(123, "k50", 0) == derive_seed(123, "k50", 0) != derive_seed(123, "k50", 1)
    assert 0 <= derive_seed(123, "k50", 0) < 2**63


OA_SAMPLED = {  # the seed's sampled configurations, with the defaults every configuration shares
    "nucleus9": {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0},
    "k50": {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95},
}
OA_SHARED = {"repetition_penalty": 1.2, "min_new_tokens": 4, "max_new_tokens": 10}


@pytest.mark.parametrize("name", sorted(OA_SAMPLED))
def test_seeded_sampling_does_not_depend_on_the_batch(tokenizer, encoder, name):
    """Each output draws from its own generator: batch size, compaction, prefill groups and the other prompts do not
    change it (transformers' sampler, one global generator, would)."""
    model = make_tiny_llama(len(tokenizer), context=256)  # random weights: every draw is a real choice
    questions = ["one", "two three", "four five six seven", "eight " * 40, "nine"]
    prompts = [build_prompt_ids(encoder, q) for q in questions]
    assert len(prefill_groups([len(p) for p in prompts])) > 1  # the long prompt prefills apart
    config = resolve_generation_config(model, {**OA_SAMPLED[name], **OA_SHARED}, eos_token_id=encoder.eos_id,
                                       pad_token_id=tokenizer.pad_token_id)
    assert sampler_name(config) == "gumbel_max_per_row"
    run = lambda prompt_ids=prompts, **kw: [  # noqa: E731
        g.token_ids for g in generate_batched(model, tokenizer, prompt_ids, config, **kw)]
    reference = run(batch_size=1, seed=11)
    assert all(len(ids) == 10 for ids in reference)  # a random model never says </s>; min_new_tokens holds anyway
    assert len(set(reference)) == len(reference)  # five different draws
    for batch_size, every in ((len(prompts), 3), (len(prompts), None), (2, 1), (3, 100)):
        assert run(batch_size=batch_size, seed=11, compact_every=every) == reference
    # a prompt's seed is prompt_seed(seed, its ids): a subset, another order or more prompts leave its draws alone
    assert run(prompts[3:], batch_size=4, seed=11) == reference[3:]
    assert run(prompts[::-1], batch_size=4, seed=11) == reference[::-1]
    extra = [build_prompt_ids(encoder, "ten eleven")]
    assert run(extra + prompts, batch_size=3, seed=11)[1:] == reference
    seeds = [prompt_seed(11, ids) for ids in prompts]
    assert run(prompts[1:3], batch_size=4, row_seeds=seeds[1:3]) == reference[1:3]
    assert run(batch_size=4, seed=12) != reference


def test_seeded_sampling_survives_prefill_groups_that_cannot_be_joined(tokenizer, encoder, monkeypatch):
    """When the groups' caches cannot be joined (sliding-window or quantised caches), their first tokens are dropped
    and the batch starts over: the rows' generators go back to where they were, so the outputs stay those of one
    prompt at a time (they came out one token shifted before)."""
    import orca8k.sampling.generation as generation

    model = make_tiny_llama(len(tokenizer), context=256)
    prompts = [build_prompt_ids(encoder, q) for q in ("one", "two three", "eight " * 40, "nine")]
    assert len(prefill_groups([len(p) for p in prompts])) > 1
    config = resolve_generation_config(model, {**OA_SAMPLED["nucleus9"], **OA_SHARED}, eos_token_id=encoder.eos_id,
                                       pad_token_id=tokenizer.pad_token_id)
    reference = [g.token_ids for g in generate_batched(model, tokenizer, prompts, config, batch_size=1, seed=3)]
    joins = []
    monkeypatch.setattr(generation, "_join_prefilled", lambda *a, **kw: joins.append(1))
    out = generate_batched(model, tokenizer, prompts, config, batch_size=4, compact_every=3, seed=3)
    assert joins and [g.token_ids for g in out] == reference


def test_configs_row_sampler_does_not_cover_are_seeded_from_the_row_seeds(tokenizer, encoder):
    """Beam sampling uses transformers' sampler (torch's global generator): with row seeds the call seeds it, so the
    outputs do not depend on what ran before."""
    import torch

    model = make_tiny_llama(len(tokenizer), context=256)
    prompts = [build_prompt_ids(encoder, q) for q in ("one", "two three")]
    config = resolve_generation_config(model, {"do_sample": True, "num_beams": 2, "max_new_tokens": 6},
                                       eos_token_id=encoder.eos_id, pad_token_id=tokenizer.pad_token_id)
    assert sampler_name(config) == "transformers_multinomial"
    runs = []
    for state in (0, 1):
        torch.manual_seed(state)
        runs.append([g.token_ids for g in generate_batched(model, tokenizer, prompts, config, batch_size=2,
                                                           row_seeds=[5, 6])])
    assert runs[0] == runs[1]


def test_gumbel_noise_is_float64_and_finite(monkeypatch):
    """float64 uniforms: the noise reaches far beyond float32's 16.6-nat ceiling (so a token ~20 nats below the best
    can still be drawn), and u = 0 gives a finite value instead of -inf (the extreme uniforms are fed in through
    torch.rand)."""
    import torch

    from orca8k.sampling.generation import gumbel_noise

    noise = gumbel_noise([torch.Generator().manual_seed(s) for s in range(3)], 1000)
    assert noise.shape == (3, 1000) and noise.dtype == torch.float64 and torch.isfinite(noise).all()
    extremes = torch.tensor([0.0, 0.5, 1 - 2.0**-53], dtype=torch.float64)
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda size, generator, dtype: extremes.clone() if dtype == torch.float64
                        else rand(size, generator=generator, dtype=dtype))
    edge = gumbel_noise([torch.Generator()], 3)[0]
    assert torch.isfinite(edge).all() and edge[0] < -6 and edge[2] > 36
    assert edge[1] == -torch.log(-torch.log(torch.tensor(0.5, dtype=torch.float64)))


def test_row_sampler_draws_from_the_warped_distribution():
    """Gumbel-max over the warped scores draws from softmax(warped scores): temperature 0.5 then top_k 3 on fixed
    scores, 20,000 draws of one generator, frequencies within 0.012 (> 4 standard deviations) of the softmax; the
    tokens top_k removes are never drawn."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=3, top_p=1.0)
    warpers = sampling_warpers(config)
    assert [type(w).__name__ for w in warpers] == ["TemperatureLogitsWarper", "TopKLogitsWarper"]
    scores = torch.tensor([[1.0, 0.5, 0.0, -0.2, 2.0]])
    sampler = RowSampler(warpers, [torch.Generator().manual_seed(5)])
    draws = torch.stack([sampler(None, scores.clone()).argmax(dim=-1) for _ in range(20_000)]).flatten()
    counts = torch.bincount(draws, minlength=5).double() / len(draws)
    kept = torch.tensor([1.0, 0.5, 2.0]) / 0.5  # the top 3, tempered
    expected = torch.zeros(5, dtype=torch.double)
    expected[[0, 1, 4]] = torch.softmax(kept.double(), dim=0)
    assert counts[2] == counts[3] == 0
    assert torch.allclose(counts, expected, atol=0.012)
    with pytest.raises(ValueError, match="2 rows of scores for 1 generators"):
        sampler(None, scores.repeat(2, 1))


def test_sampling_warpers_are_transformers_own_in_its_order():
    from transformers import GenerationConfig

    def names(**kw):
        return [type(w).__name__ for w in sampling_warpers(GenerationConfig(do_sample=True, **kw))]

    # the seed's nucleus9 (top_k 0: off) and k50; min_p/typical/epsilon/eta in transformers' order
    assert names(temperature=0.8, top_p=0.9, top_k=0) == ["TemperatureLogitsWarper", "TopPLogitsWarper"]
    assert names(temperature=1.0, top_k=50, top_p=0.95) == ["TopKLogitsWarper", "TopPLogitsWarper"]
    assert names(temperature=0.7, top_k=0, min_p=0.1, typical_p=0.9, epsilon_cutoff=3e-4, eta_cutoff=1e-3) == [
        "TemperatureLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper", "EpsilonLogitsWarper",
        "EtaLogitsWarper"]
    # what RowSampler does not reproduce samples with transformers' own sampler: beams, and settings that would turn
    # the greedy decoding it runs under into contrastive search or assisted decoding
    for other in ({"num_beams": 2}, {"penalty_alpha": 0.6, "top_k": 4}, {"prompt_lookup_num_tokens": 3}):
        config = GenerationConfig(do_sample=True, **other)
        assert sampling_warpers(config) is None and sampler_name(config) == "transformers_multinomial"
    assert sampler_name(GenerationConfig(do_sample=False)) is None


def test_row_sampler_chain_equals_transformers_sampling_chain(tokenizer):
    """The processors `generate` runs when sampling give bit for bit the scores of the greedy chain it runs under
    `RowSampler` plus its warpers (before the noise), on a model whose generation_config carries Llama-2's sampling
    defaults (temperature 0.6, top_p 0.9), for the seed's configurations and every warper at once. The chains are
    read from `generate` itself (its `_sample` step, stopped before decoding)."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.generation.utils import GenerationMixin

    from orca8k.sampling.generation import _row_sampling

    model = make_tiny_llama(len(tokenizer), context=256)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, do_sample=True,
                                               temperature=0.6, top_p=0.9)

    class Stop(Exception):
        pass

    def chain(config, extra=None):
        seen = {}

        def spy(self, input_ids, logits_processor, *args, **kwargs):
            seen["processors"] = logits_processor
            raise Stop

        ids, mask = torch.tensor([[2, 2, 1, 5, 6, 7, 5]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
        original = GenerationMixin._sample
        GenerationMixin._sample = spy
        try:
            with pytest.raises(Stop):
                model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                               **({"logits_processor": extra} if extra else {}))
        finally:
            GenerationMixin._sample = original
        return seen["processors"]

    everything = {"temperature": 0.7, "top_k": 10, "top_p": 0.95, "min_p": 0.05, "typical_p": 0.9,
                  "epsilon_cutoff": 1e-3, "eta_cutoff": 1e-3}
    torch.manual_seed(0)
    for args in (*OA_SAMPLED.values(), {"do_sample": True, "top_k": 0}, {"do_sample": True, **everything}):
        config = resolve_generation_config(model, {**args, "repetition_penalty": 1.2, "min_new_tokens": 4,
                                                   "max_new_tokens": 8}, eos_token_id=2, pad_token_id=2)
        sampling = chain(config)
        greedy, warpers, generators = _row_sampling(config, [1])
        sampler = RowSampler(warpers, generators)
        under_row_sampler = chain(greedy, LogitsProcessorList([sampler]))
        assert under_row_sampler[-1] is sampler and len(sampling) == len(under_row_sampler) - 1 + len(warpers)
        for length in (7, 9, 15):
            ids = torch.randint(0, 64, (1, length))
            scores = torch.randn(1, len(tokenizer)) * 3
            ours = scores.clone()
            for processor in under_row_sampler:
                ours = processor.warpers(ids, ours) if processor is sampler else processor(ids, ours)
            assert torch.equal(sampling(ids, scores.clone()), ours)


def test_bad_arguments_raise(tokenizer):
    model = make_tiny_llama(len(tokenizer))
    config = resolve_generation_config(model, {}, eos_token_id=2, pad_token_id=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate_batched(model, tokenizer, [[1, 5]], config, batch_size=0)
    with pytest.raises(ValueError, match="empty prompt ids"):
        generate_batched(model, tokenizer, [[]], config, batch_size=1)
    with pytest.raises(ValueError, match="compact_every must be >= 1 or None, got 0"):
        generate_batched(model, tokenizer, [[1, 5]], config, batch_size=1, compact_every=0)
    with pytest.raises(ValueError, match="set max_new_tokens"):  # transformers' default is an absolute max_length
        generate_batched(model, tokenizer, [[1, 5]], config, batch_size=1)
    absolute = resolve_generation_config(model, {"max_new_tokens": 4, "min_length": 3}, eos_token_id=2, pad_token_id=2)
    with pytest.raises(ValueError, match="use min_new_tokens, not min_length"):
        generate_batched(model, tokenizer, [[1, 5]], absolute, batch_size=1)
    two = resolve_generation_config(model, {"max_new_tokens": 4, "num_beams": 2, "num_return_sequences": 2},
                                    eos_token_id=2, pad_token_id=2)
    with pytest.raises(ValueError, match="num_return_sequences must be 1"):
        generate_batched(model, tokenizer, [[1, 5], [1, 5, 6, 7]], two, batch_size=2)
