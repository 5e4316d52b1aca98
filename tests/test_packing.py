"""Packing and collation: exact bins, no cross-contamination (loss, gradients and logits equal the unpacked ones),
padding on either side supervising exactly one `</s>` per reply, and a finite loss without supervised tokens."""

from __future__ import annotations

import pytest

from orca8k.data.chat_format import IGNORE_INDEX
from orca8k.data.collate import CausalLMCollator, causal_lm_loss, training_loss
from orca8k.data.packing import pack_examples, plan_bins, plan_text_fill
from tests.fixtures.models import make_tiny_llama
from tests.fixtures.tokenize import mix_rows


def test_best_fit_decreasing_bins_are_exact_and_deterministic():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    bins = plan_bins(lengths, 10)
    # longest first: 9→new, 8→new, 7→new, 5→new, 4→ fullest bin with room (the 5's: 5+4=9), 3→ the 7's (10),
    # 2→ the 8's (10), 1→ the 9's (10)
    assert bins == [[1, 6], [5, 4], [3, 2], [0, 7]]
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert plan_bins([3, 3, 3], 10) == [[0, 1, 2]]  # ties: lower index first
    assert plan_bins([], 10) == []
    with pytest.raises(ValueError, match="example 1: length 11 is outside 1..max_length=10"):
        plan_bins([3, 11], 10)


def test_text_fill_plans_whole_examples_first_then_cuts_the_texts_into_the_gaps():
    # whole 10 and 7 take a row each (free 2 and 5); a 2-token gap holds < min_piece text tokens and stays empty;
    # text 0 (9 tokens) fills the 5-token gap with 4 (+ <s>); its other 5 open a new row, which text 1 fills on
    pieces, bins = plan_text_fill([10, 7], [9, 20], max_length=12, min_piece=3)
    assert pieces.tolist() == [[0, 0, 4], [0, 4, 9], [1, 0, 5], [1, 5, 16], [1, 16, 20]]
    assert bins == [[0], [1, 2], [3, 4], [5], [6]]
    lengths = [10, 7] + [end - start + 1 for _, start, end in pieces.tolist()]  # each piece with its <s>
    assert [sum(lengths[i] for i in b) for b in bins] == [10, 12, 12, 12, 5]
    # no sliver left behind: text 0 (5 tokens) would leave 1 after a 4-token piece, and 5 - 3 = 2 < min_piece
    # tokens are not worth the gap, so it stays empty; a 6-token text gives 3 + 3 instead of 4 + 2
    assert plan_text_fill([10, 7], [5, 20], 12, min_piece=3)[1] == [[0], [1], [2, 3], [4], [5]]
    pieces, bins = plan_text_fill([7], [6], 12, min_piece=3)
    assert pieces.tolist() == [[0, 0, 3], [0, 3, 6]] and bins == [[0, 1], [2]]
    # only text; only whole examples (plan_bins' plan); a row too short for two min_pieces still takes a sliver
    assert plan_text_fill([], [30], 12)[0].tolist() == [[0, 0, 11], [0, 11, 22], [0, 22, 30]]
    assert plan_text_fill([5, 9], [], 12)[1] == plan_bins([5, 9], 12)
    assert plan_text_fill([], [20], 16)[0].tolist() == [[0, 0, 15], [0, 15, 20]]  # min_piece 15 > 20 - 15
    with pytest.raises(ValueError, match="min_piece=12"):
        plan_text_fill([3], [3], 12, min_piece=12)
    with pytest.raises(ValueError, match="text 1: no token"):
        plan_text_fill([3], [3, 0], 12)
    with pytest.raises(ValueError, match="example 0: length 13"):
        plan_text_fill([13], [3], 12)


def test_packed_rows_restart_positions_and_keep_every_token():
    examples = [{"input_ids": [1] + [10 + k] * (n - 1), "labels": [IGNORE_INDEX] + [10 + k] * (n - 1)}
                for k, n in enumerate([5, 9, 3, 7, 2, 8, 1, 4])]
    rows = pack_examples(examples, 10)
    assert [r["num_examples"] for r in rows] == [2, 2, 2, 2]
    assert rows[0]["input_ids"] == [1] + [11] * 8 + [1]  # example 1 (9 tokens) then example 6 (1 token)
    assert rows[0]["position_ids"] == list(range(9)) + [0]
    assert rows[1]["position_ids"] == list(range(8)) + [0, 1]
    assert rows[1]["labels"] == [IGNORE_INDEX] + [15] * 7 + [IGNORE_INDEX, 14]
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    assert sum(r["input_ids"].count(1) for r in rows) == len(examples)  # one <s> per example
    assert "sources" not in rows[0]  # examples without a source: no column


def test_pack_table_reads_chunked_sliced_columns_and_checks_a_given_plan():
    """The rows a datasets cache file gives (several chunks, sliced) pack as the same examples in one array do; a
    given plan must hold every example once, in bins within max_length."""
    import pyarrow as pa

    from orca8k.data.packing import pack_table

    lengths = [5, 9, 3, 7, 2, 8, 1, 4, 6]
    ids = [[1] + [10 + k] * (n - 1) for k, n in enumerate(lengths)]
    labels = [[IGNORE_INDEX] + [10 + k] * (n - 1) for k, n in enumerate(lengths)]
    whole = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "labels": pa.array(labels, pa.list_(pa.int32()))})
    padded = pa.concat_tables([whole.slice(0, 1), whole, whole.slice(0, 2)])  # extra rows on both sides
    chunked = pa.concat_tables([padded.slice(1, 4), padded.slice(5, 5)])  # two chunks, both sliced from padded
    assert chunked.column("input_ids").num_chunks == 2 and chunked.to_pylist() == whole.to_pylist()
    expected = pack_table(whole, 10).to_pylist()
    assert pack_table(chunked, 10).to_pylist() == expected
    bins = plan_bins(lengths, 10)
    assert pack_table(chunked, 10, bins).to_pylist() == expected
    with pytest.raises(ValueError, match="every example exactly once"):
        pack_table(whole, 10, bins[:-1])
    with pytest.raises(ValueError, match="every example exactly once"):
        pack_table(whole, 10, [*bins, []])
    with pytest.raises(ValueError, match="more than max_length=10"):
        pack_table(whole, 10, [[1, 5], *[[i] for i in range(len(lengths)) if i not in (1, 5)]])
    assert pack_table(whole.slice(0, 0), 10).num_rows == 0


def test_packed_rows_name_their_sources_and_the_collator_counts_supervised_tokens_per_source():
    """The per-source curves' inputs: packed rows carry each example's source in order, and the collator counts a
    batch's supervised tokens per source for examples and packed rows alike."""
    from orca8k.data.collate import SOURCE_TOKENS_KEY

    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    names = ["a", "b", "a", "c", "b", "a", "c", "a"]
    examples = [{"input_ids": [1] + [10 + k] * (n - 1), "labels": [IGNORE_INDEX] + [10 + k] * (n - 1), "source": s}
                for k, (n, s) in enumerate(zip(lengths, names, strict=True))]
    rows = pack_examples(examples, 10)
    assert [r["sources"] for r in rows] == [["b", "c"], ["a", "b"], ["c", "a"], ["a", "a"]]  # bins [[1,6],[5,4],[3,2],[0,7]]
    collate = CausalLMCollator(pad_token_id=2, sources=("a", "b", "c"))
    supervised = {s: sum(n - 1 for n, x in zip(lengths, names, strict=True) if x == s) for s in "abc"}  # position 0 unsupervised
    assert collate(rows)[SOURCE_TOKENS_KEY].tolist() == [supervised["a"], supervised["b"], supervised["c"]] == [16, 9, 6]
    assert collate(examples)[SOURCE_TOKENS_KEY].tolist() == [16, 9, 6]
    assert collate(rows[:1])[SOURCE_TOKENS_KEY].tolist() == [0, 8, 0]  # example 1 (b, 8) + example 6 (c, 0)
    assert SOURCE_TOKENS_KEY not in CausalLMCollator(pad_token_id=2)(rows)  # not asked for
    assert SOURCE_TOKENS_KEY not in collate([{k: v for k, v in e.items() if k != "source"} for e in examples])
    with pytest.raises(ValueError, match="source 'c' not in \\['a', 'b'\\]"):
        CausalLMCollator(pad_token_id=2, sources=("a", "b"))(rows)


def chat_batch(tokenizer, n: int, max_length: int = 64):
    from orca8k.data.chat_format import ChatEncoder

    rows = mix_rows(n_chat=n, n_text=0, seed=11)
    enc = ChatEncoder(tokenizer)
    out = []
    for r in enc.encode_rows([r["kind"] for r in rows], [r["messages"] for r in rows], [None] * n, max_length):
        out += [{"input_ids": e.input_ids, "labels": e.labels, "turns": e.meta["assistant_turns"]} for e in r.examples]
    return out


def forward(model, batch, **kwargs):
    return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False, **kwargs)


def loss_and_grads(model, batch):
    model.zero_grad()
    out = forward(model, batch)
    loss = causal_lm_loss(out, batch["labels"])
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()], out.logits.detach()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_the_same_examples_unpacked(tokenizer, attn):
    import torch

    examples = chat_batch(tokenizer, 6)
    text = [{"input_ids": [1, 30, 31, 32, 33, 2], "labels": [IGNORE_INDEX, 30, 31, 32, 33, 2]}]
    examples = examples + text
    rows = pack_examples(examples, 128)
    assert len(rows) < len(examples)  # something was actually packed together
    model = make_tiny_llama(len(tokenizer), context=128, attn_implementation=attn).train()
    packed = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    assert "attention_mask" not in packed
    unpacked = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((unpacked["labels"] != IGNORE_INDEX).sum())
    lp, gp, logits_packed = loss_and_grads(model, packed)
    lu, gu, _ = loss_and_grads(model, unpacked)
    assert torch.isfinite(lp) and abs(lp.item() - lu.item()) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(gp, gu, strict=True)) < 1e-5
    # the logits of each packed example equal its logits alone (row r holds bins[r], in order)
    model.eval()
    bins = plan_bins([len(e["input_ids"]) for e in examples], 128)
    with torch.no_grad():
        for r, members in enumerate(bins):
            start = 0
            for i in members:
                ids = examples[i]["input_ids"]
                assert rows[r]["input_ids"][start:start + len(ids)] == ids
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                assert (logits_packed[r, start:start + len(ids)] - alone).abs().max().item() < 1e-5
                start += len(ids)


def test_a_cache_disables_packed_detection_in_transformers_5_24(tokenizer):
    """Why the collator's contract says `use_cache=False`: with a cache, attention crosses examples."""
    import torch

    rows = pack_examples(chat_batch(tokenizer, 4), 128)
    batch = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    model = make_tiny_llama(len(tokenizer), context=128)
    model.config.use_cache = True
    with torch.no_grad():
        safe = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert (safe - cached).abs().max().item() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_supervise_exactly_one_eos_per_reply(tokenizer, side):
    import torch

    examples = chat_batch(tokenizer, 5)
    batch = CausalLMCollator(pad_token_id=tokenizer.pad_token_id, padding_side=side, pad_to_multiple_of=8)(examples)
    eos = tokenizer.eos_token_id
    assert batch["input_ids"].shape[1] % 8 == 0
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        real = batch["attention_mask"][i].bool()
        assert int(real.sum()) == n
        assert int(((batch["labels"][i] == eos) & real).sum()) == e["turns"] >= 1
        assert int((batch["labels"][i] == eos).sum()) == e["turns"]  # padding (eos ids) is never supervised
        assert int((batch["input_ids"][i][~real] == eos).sum()) == batch["input_ids"].shape[1] - n  # pad = eos
        span = slice(0, n) if side == "right" else slice(batch["input_ids"].shape[1] - n, None)
        assert batch["input_ids"][i, span].tolist() == e["input_ids"]
        assert batch["position_ids"][i, span].tolist() == list(range(n))
    # both sides give the same logits on the real tokens
    model = make_tiny_llama(len(tokenizer), context=128)
    other = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        a, b = forward(model, batch).logits, forward(model, other).logits
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        got = a[i, :n] if side == "right" else a[i, a.shape[1] - n:]
        assert (got - b[i, :n]).abs().max().item() < 1e-5


def test_an_all_masked_batch_gives_loss_zero_not_nan(tokenizer):
    import torch

    batch = CausalLMCollator(pad_token_id=2)([{"input_ids": [1, 40, 41, 2], "labels": [IGNORE_INDEX] * 4},
                                             {"input_ids": [1, 42], "labels": [IGNORE_INDEX] * 2}])
    model = make_tiny_llama(len(tokenizer)).train()
    out = forward(model, batch)
    loss = causal_lm_loss(out, batch["labels"])
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())
    assert causal_lm_loss(out, batch["labels"], num_items_in_batch=torch.tensor(0)).item() == 0.0
    assert torch.isnan(model(**batch, use_cache=False).loss)  # transformers' own loss: NaN here


def test_causal_lm_loss_is_the_mean_log_loss_of_each_next_supervised_token():
    import torch

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)  # [batch, seq_len, vocab]
    # position 0's label can never be a target (nothing predicts it); the last position predicts nothing
    labels = torch.tensor([[3, IGNORE_INDEX, 4, 5, IGNORE_INDEX], [6, 1, IGNORE_INDEX, IGNORE_INDEX, 2]])
    log_p = logits.log_softmax(-1)
    expected_terms = [-log_p[0, 1, 4], -log_p[0, 2, 5], -log_p[1, 0, 1], -log_p[1, 3, 2]]  # target at t + 1
    expected = torch.stack(expected_terms).sum() / 4
    loss = causal_lm_loss(logits, labels)
    assert torch.allclose(loss, expected, atol=1e-6, rtol=0)
    assert torch.allclose(causal_lm_loss(logits, labels, num_items_in_batch=8), expected / 2, atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad, expected_grad, atol=1e-7, rtol=0)
    assert not grad[:, 4].any() and not grad[0, 0].any()  # positions without a target get no gradient
    assert labels.tolist()[0][0] == 3  # the labels are not shifted in place


def test_training_loss_compiles_causal_lm_loss_only_with_torch_compile():
    import torch

    assert training_loss(False) is causal_lm_loss
    compiled = training_loss(True)
    assert compiled is training_loss(True) and compiled is not causal_lm_loss  # one compiled function, shared
    torch.manual_seed(0)
    labels = torch.tensor([[3, IGNORE_INDEX, 4, 5, IGNORE_INDEX], [6, 1, IGNORE_INDEX, IGNORE_INDEX, 2]])
    for seq_len, kwargs in ((5, {}), (5, {"num_items_in_batch": torch.tensor(8)}), (9, {})):
        lab = torch.nn.functional.pad(labels, (0, seq_len - 5), value=IGNORE_INDEX)
        logits = torch.randn(2, seq_len, 7, requires_grad=True)
        eager, fused = causal_lm_loss(logits, lab, **kwargs), compiled(logits, lab, **kwargs)
        torch.testing.assert_close(fused, eager, atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.autograd.grad(fused, logits)[0], torch.autograd.grad(eager, logits)[0],
                                   atol=1e-7, rtol=0)
    assert compiled(torch.randn(2, 5, 7), torch.full((2, 5), IGNORE_INDEX)).item() == 0.0  # all masked: 0, not NaN


def test_num_items_in_batch_weighs_every_target_equally_across_micro_batches(tokenizer):
    import torch

    examples = chat_batch(tokenizer, 4)
    model = make_tiny_llama(len(tokenizer), context=128)
    collate = CausalLMCollator(pad_token_id=2)
    whole = collate(examples)
    parts = [collate(examples[:1]), collate(examples[1:])]
    total = int(sum((p["labels"][:, 1:] != IGNORE_INDEX).sum() for p in parts))
    with torch.no_grad():
        accumulated = sum(causal_lm_loss(forward(model, p), p["labels"], num_items_in_batch=total) for p in parts)
        reference = causal_lm_loss(forward(model, whole), whole["labels"])
    assert abs(accumulated.item() - reference.item()) < 1e-5


def test_collator_rejects_inconsistent_rows():
    collate = CausalLMCollator(pad_token_id=2, max_length=4)
    with pytest.raises(ValueError, match="row 0 has 5 tokens > max_length=4"):
        collate([{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}])
    with pytest.raises(ValueError, match="row 1: input_ids, labels and position_ids differ"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="mixes packed rows"):
        collate([{"input_ids": [1], "labels": [1], "position_ids": [0]}, {"input_ids": [1], "labels": [1]}])
    with pytest.raises(ValueError, match="padding_side"):
        CausalLMCollator(pad_token_id=2, padding_side="middle")
