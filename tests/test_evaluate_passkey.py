"""Passkey retrieval: the key sits at the asked depth, the prompt fills the length, scores on crafted models."""

from __future__ import annotations

import math

import pytest
import torch

from orca8k.data.chat_format import ChatEncoder
from orca8k.errors import ConfigError
from orca8k.evaluation import passkey as pk
from tests.fixtures.evaluate import bigram_llama
from tests.fixtures.models import make_tiny_llama


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_the_key_is_placed_at_the_asked_depth(tokenizer, depth):
    encoder = ChatEncoder(tokenizer)
    trial = pk.build_trial(encoder, 1024, depth, "40213")
    n, k = trial.filler_count, trial.key_index
    assert n == 16 and k == int(depth * n + 0.5)  # 54-token paragraphs in 1024 tokens (this 600-piece tokenizer)
    text = tokenizer.decode(trial.prompt_ids, skip_special_tokens=True)
    key_sentence = pk.KEY_SENTENCE.format(key="40213")
    assert text.count(key_sentence) == 1 and text.startswith(pk.INTRO) and text.endswith(pk.QUESTION)
    before = text[len(pk.INTRO) : text.index(key_sentence)]
    assert before.count(pk.FILLER) == k  # exactly k filler paragraphs precede the key
    after = text[text.index(key_sentence) + len(key_sentence) : -len(pk.QUESTION)]
    assert after.count(pk.FILLER) == n - k
    assert trial.realised_depth == pytest.approx(k / n, abs=0.01)  # in tokens, too
    assert abs(k / n - depth) <= 1 / (2 * n) + 1e-9


def test_the_prompt_fills_the_length_and_starts_with_one_bos(tokenizer):
    encoder = ChatEncoder(tokenizer)
    for length in (256, 512):
        trial = pk.build_trial(encoder, length, 0.5, "77777")
        used = len(trial.prompt_ids) + len(trial.answer_ids) + 1
        assert used <= length
        # maximal: one more filler paragraph would not fit
        bigger = encoder.add_bos(encoder.segment_ids("".join(pk.prompt_text(trial.filler_count + 1, trial.key_index, "77777")), first=True))
        assert len(bigger) + len(trial.answer_ids) + 1 > length
        assert trial.prompt_ids[0] == encoder.bos_id and trial.prompt_ids.count(encoder.bos_id) == 1
        assert tokenizer.decode(trial.answer_ids).strip() == "77777"


def test_keys_are_deterministic_with_the_asked_digits():
    keys = [pk.draw_key(7, 512, 0.5, t, 5) for t in range(20)]
    assert keys == [pk.draw_key(7, 512, 0.5, t, 5) for t in range(20)]
    assert all(len(k) == 5 and k[0] != "0" for k in keys) and len(set(keys)) > 15
    assert [pk.draw_key(8, 512, 0.5, t, 5) for t in range(20)] != keys  # another seed, other keys
    assert [pk.draw_key(7, 256, 0.5, t, 5) for t in range(20)] != keys  # another length, other keys


def test_too_short_a_length_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="too short"):
        pk.build_trial(ChatEncoder(tokenizer), 64, 0.5, "12345")
    with pytest.raises(ConfigError, match="outside"):
        pk.build_trial(ChatEncoder(tokenizer), 512, 1.5, "12345")


def test_a_model_that_knows_the_key_scores_one_and_another_key_scores_zero(tokenizer):
    encoder = ChatEncoder(tokenizer)
    hit = pk.build_trial(encoder, 256, 0.5, "12345", trial=0)
    miss = pk.build_trial(encoder, 256, 0.5, "54321", trial=1)
    # the crafted model continues the question's last token with the tokens of " 12345", then </s>
    chain = [hit.prompt_ids[-1], *hit.answer_ids, encoder.eos_id]
    model = bigram_llama(len(tokenizer), chain)
    results = pk.evaluate_passkey(model, tokenizer, [hit, miss])
    assert [r.correct for r in results] == [True, False]
    assert results[0].generated_text.strip() == "12345"
    assert results[0].key_logprob_per_digit > -0.01  # ≈ 0: the model is sure
    # teacher-forced log-probability by hand for the missed key
    full = torch.tensor([miss.prompt_ids + miss.answer_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)
    start = len(miss.prompt_ids)
    by_hand = sum(logprobs[start - 1 + i, tok].item() for i, tok in enumerate(miss.answer_ids))
    assert results[1].key_logprob == pytest.approx(by_hand, abs=1e-4)
    assert results[1].key_logprob_per_digit == pytest.approx(by_hand / 5, abs=1e-4)


def test_one_teacher_forced_pass_equals_greedy_generation(tokenizer):
    encoder = ChatEncoder(tokenizer)
    trials = [pk.build_trial(encoder, 256, d, k, i) for i, (d, k) in enumerate([(0.0, "12345"), (0.5, "90817")])]
    hit_chain = [trials[0].prompt_ids[-1], *trials[0].answer_ids, encoder.eos_id]
    (nine,) = encoder.segment_ids("9")
    partial_chain = [*hit_chain[:4], nine]  # follows " 12" of the key, then says 9
    models = [bigram_llama(len(tokenizer), hit_chain), bigram_llama(len(tokenizer), partial_chain),
              make_tiny_llama(len(tokenizer), context=128, seed=9)]
    for model in models:
        for trial, result in zip(trials, pk.evaluate_passkey(model, tokenizer, trials), strict=True):
            prompt = torch.tensor([trial.prompt_ids])
            with torch.no_grad():
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=len(trial.answer_ids) + 1, pad_token_id=encoder.eos_id)
            greedy = out[0, len(trial.prompt_ids) :].tolist()
            assert greedy[: len(result.generated_ids)] == result.generated_ids
    assert pk.evaluate_passkey(models[0], tokenizer, trials[:1])[0].generated_ids == [*trials[0].answer_ids, encoder.eos_id]
    partial = pk.evaluate_passkey(models[1], tokenizer, trials[:1])[0]
    assert partial.generated_ids == partial_chain[1:] and partial.generated_text.strip() == "129"
    assert not partial.correct


def test_table_and_summary_aggregate_per_length_and_depth():
    def result(length, depth, correct, lp):
        return pk.PasskeyResult(length, depth, 0, "1", "", [], correct, lp * 5, lp, length, 1, depth)

    results = [result(256, 0.0, True, -1.0), result(256, 0.0, False, -3.0), result(512, 0.5, False, -2.0)]
    assert pk.passkey_table(results) == [
        {"context_length": 256, "depth": 0.0, "accuracy": 0.5, "key_logprob_per_digit": -2.0, "trials": 2},
        {"context_length": 512, "depth": 0.5, "accuracy": 0.0, "key_logprob_per_digit": -2.0, "trials": 1},
    ]
    summary = pk.passkey_summary(results)
    assert summary["accuracy"] == pytest.approx(1 / 3) and summary["trials"] == 3
    assert summary["chance_logprob_per_digit"] == pytest.approx(-math.log(10))
    assert summary["by_context_length"]["256"] == {"accuracy": 0.5, "key_logprob_per_digit": -2.0}
