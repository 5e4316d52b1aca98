"""Perplexity vs context length: window placement (same targets at every length), PPL = exp(mean NLL) by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from orca8k.data.chat_format import ChatEncoder
from orca8k.errors import ConfigError, DataError
from orca8k.evaluation.context import (
    Document,
    TargetBlock,
    context_lengths,
    load_documents,
    perplexity_by_length,
    plan_targets,
    window,
)
from tests.fixtures.models import make_tiny_llama
from tests.fixtures.tokenizer import corpus_lines


def test_context_lengths_follow_the_factors():
    assert context_lengths(256, [0.25, 0.5, 1.0, 1.5, 2.0]) == [64, 128, 256, 384, 512]
    assert context_lengths(4096, [0.25, 0.5, 1.0, 1.5, 2.0]) == [1024, 2048, 4096, 6144, 8192]
    with pytest.raises(ConfigError, match="duplicate"):
        context_lengths(4, [0.5, 0.6])


def test_plan_targets_is_round_robin_over_documents_and_respects_the_budget():
    # L_max 10, tail 4: blocks end at 10, 14, 18, … ≤ n. Doc 1 is too short (9 tokens).
    blocks = plan_targets([20, 9, 14], max_context=10, tail=4, budget_tokens=19)  # 19 // 4 = 4 blocks
    assert blocks == [TargetBlock(0, 10), TargetBlock(2, 10), TargetBlock(0, 14), TargetBlock(2, 14)]
    everything = plan_targets([20, 9, 14], max_context=10, tail=4, budget_tokens=400)
    assert everything == [TargetBlock(0, 10), TargetBlock(2, 10), TargetBlock(0, 14), TargetBlock(2, 14), TargetBlock(0, 18)]
    assert plan_targets([9], max_context=10, tail=4, budget_tokens=40) == []
    with pytest.raises(ConfigError, match="scored_tail_tokens"):
        plan_targets([20], max_context=4, tail=8, budget_tokens=40)
    with pytest.raises(ConfigError, match="tokens_per_length"):
        plan_targets([20], max_context=10, tail=8, budget_tokens=4)


def test_every_length_scores_exactly_the_same_target_tokens(tokenizer):
    encoder = ChatEncoder(tokenizer)
    doc = list(range(10, 60))  # 50 distinct "tokens"
    lengths, tail = [4, 8, 16, 24, 32], 4
    blocks = plan_targets([len(doc)], max(lengths), tail, budget_tokens=1000)
    assert [b.end for b in blocks] == [32, 36, 40, 44, 48]
    for block in blocks:
        targets = set()
        for length in lengths:
            input_ids, scored = window(doc, block.end, length, tail, encoder)
            assert len(input_ids) == length
            assert input_ids[0] == encoder.bos_id and encoder.bos_id not in input_ids[1:]
            # BOS, then the tokens before the window's end: position i predicts doc[end - length + i]
            assert input_ids[1:] == doc[block.end - length : block.end - 1]
            targets.add(tuple(scored))
        assert targets == {tuple(doc[block.end - tail : block.end])}


def test_window_refuses_what_does_not_fit(tokenizer):
    encoder = ChatEncoder(tokenizer)
    with pytest.raises(ValueError):
        window(list(range(10, 30)), end=8, context_length=16, tail=4, encoder=encoder)


def _by_hand(model, docs, blocks, length, tail, bos):
    """Unbatched full forward passes, NLL by `cross_entropy` on the last `tail` next-token predictions."""
    nll, count = 0.0, 0
    for b in blocks:
        d = docs[b.doc].ids
        input_ids = torch.tensor([[bos] + d[b.end - length : b.end - 1]])
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[0]  # [length, vocab]
        targets = torch.tensor(d[b.end - tail : b.end])
        nll += torch.nn.functional.cross_entropy(logits[-tail:], targets, reduction="sum").item()
        count += tail
    return math.exp(nll / count)


def test_perplexity_equals_exp_of_the_mean_nll_computed_by_hand(tokenizer):
    encoder = ChatEncoder(tokenizer)
    lines = corpus_lines(200, seed=5)
    docs = [Document(f"d{i}", "fanfics", encoder.encode_text(" ".join(lines[i * 30 : i * 30 + 30])).input_ids[1:]) for i in range(3)]
    lengths, tail = [16, 32, 64], 8
    blocks = plan_targets([len(d.ids) for d in docs], 64, tail, budget_tokens=56)  # 7 blocks over 3 documents
    assert len(blocks) == 7 and {b.doc for b in blocks} == {0, 1, 2}
    model = make_tiny_llama(len(tokenizer), context=32, seed=4, rope_scaling={"rope_type": "linear", "factor": 2.0})
    result = perplexity_by_length(model, docs, blocks, lengths, tail, encoder, batch_size=3)
    for length in lengths:
        assert result[length].tokens == 7 * tail
        assert result[length].perplexity == pytest.approx(_by_hand(model, docs, blocks, length, tail, encoder.bos_id), rel=1e-5)
    again = perplexity_by_length(model, docs, blocks, lengths, tail, encoder, batch_size=3)
    assert again == result  # deterministic, bit for bit


def test_ids_outside_a_base_vocabulary_are_refused(tokenizer):
    encoder = ChatEncoder(tokenizer)
    docs = [Document("d", "fanfics", [5] * 30 + [599, 600])]
    model = make_tiny_llama(600, context=32)
    with pytest.raises(DataError, match="600 is outside"):
        perplexity_by_length(model, docs, [TargetBlock(0, 32)], [32], 8, encoder, batch_size=1)


def test_load_documents_keeps_text_rows_sorted_by_id(tmp_path, tokenizer):
    encoder = ChatEncoder(tokenizer)
    path = tmp_path / "val.parquet"
    pd.DataFrame(
        [
            {"id": "rp-2", "source": "red_pajama", "kind": "text", "text": "the river and the castle", "messages": None},
            {"id": "c-1", "source": "orca-chat", "kind": "chat", "text": None,
             "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"id": "ff-1", "source": "fanfics", "kind": "text", "text": "a knight and a dragon", "messages": None},
        ]
    ).to_parquet(path)
    docs = load_documents(path, encoder)
    assert [(d.id, d.source) for d in docs] == [("ff-1", "fanfics"), ("rp-2", "red_pajama")]
    assert docs[0].ids == encoder.encode_text("a knight and a dragon").input_ids[1:]
    assert docs[0].ids[-1] == encoder.eos_id and encoder.bos_id not in docs[0].ids


def test_load_documents_names_the_row_with_an_empty_text(tmp_path, tokenizer):
    path = tmp_path / "val.parquet"
    pd.DataFrame([{"id": "ff-9", "source": "fanfics", "kind": "text", "text": ""}]).to_parquet(path)
    with pytest.raises(DataError, match=r"id='ff-9': field 'text'"):
        load_documents(path, ChatEncoder(tokenizer))
