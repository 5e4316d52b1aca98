"""The OA tokenizer: ids equal sentencepiece's, the special tokens, pinned settings that survive save/reload, the
chat template, and the normalisation of a Llama-2-style legacy `tokenizer.json`."""

from __future__ import annotations

import json

import pytest

from orca8k.data.chat_format import ChatEncoder, render_chat
from orca8k.model.tokenizer import (
    ASSISTANT,
    OA_SPECIAL_TOKENS,
    check_tokenizer,
    load_base_tokenizer,
    load_tokenizer,
    normalised_spec,
    padded_vocab_size,
    prepare_tokenizer,
)
from tests.fixtures.tokenize import TWO_TURNS
from tests.fixtures.tokenizer import corpus_lines

LEGACY_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
LLAMA2_POST_PROCESSOR = {  # Llama-2's: "<s> $A"
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
}


def texts_for_parity(realdata) -> list[str]:
    lines = corpus_lines(200, seed=3)
    if realdata is not None:
        for line in (realdata / "red_pajama" / "sample.jsonl").read_text().splitlines()[:40]:
            lines.append(json.loads(line)["text"][:3000])
    return lines + ["digits 1234567890", "tabs\tand\nnewlines\n\n", "émoji 🙂 中文 ünïcödé", "a  b   c"]


def test_base_tokenizer_ids_equal_sentencepiece(base_tokenizer_dir, request):
    import sentencepiece as spm

    try:
        realdata = request.getfixturevalue("realdata")
    except pytest.skip.Exception:
        realdata = None
    sp = spm.SentencePieceProcessor(model_file=str(base_tokenizer_dir / "tokenizer.model"))
    tok = load_base_tokenizer(base_tokenizer_dir)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (1, 2, 0, 600)
    texts = texts_for_parity(realdata)
    assert all(not t[:1].isspace() for t in texts)
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text[:80]
    # the one known difference (transformers' non-legacy Metaspace): a text that starts with a space gets no
    # second `▁`; sentencepiece adds the dummy prefix anyway
    assert sp.encode(" lead", out_type=str)[:2] == ["▁", "▁le"]
    assert tok.tokenize(" lead")[:1] == ["▁le"]


def test_prepare_tokenizer_adds_the_oa_tokens_after_the_base_vocabulary(base_tokenizer_dir):
    tok = prepare_tokenizer(load_base_tokenizer(base_tokenizer_dir))
    assert len(tok) == 605
    assert tok.convert_tokens_to_ids(list(OA_SPECIAL_TOKENS)) == [600, 601, 602, 603, 604]
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.pad_token_id) == ("</s>", "</s>", "<s>", 2)
    assert tok.padding_side == "right"
    assert padded_vocab_size(tok, 16) == 608


def test_settings_survive_save_and_a_plain_reload(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["legacy"] is False and config["tokenizer_class"] == "LlamaTokenizer"
    assert (tokenizer_dir / "chat_template.jinja").is_file()
    reference = ChatEncoder(load_tokenizer(tokenizer_dir)).encode_chat(TWO_TURNS).input_ids
    plain = AutoTokenizer.from_pretrained(str(tokenizer_dir))  # no kwargs: what a server or a notebook does
    check_tokenizer(plain)
    assert plain("The river", add_special_tokens=True)["input_ids"][0] != plain.bos_token_id
    assert plain(render_chat(TWO_TURNS))["input_ids"] == reference  # template string: no second <s>
    # transformers 5.24: flipping add_eos_token rebuilds the post-processor from flags that a reload forgets
    plain.add_eos_token = True
    assert plain("x")["input_ids"][-1] == plain.eos_token_id and plain("x")["input_ids"][0] != plain.bos_token_id
    plain.add_eos_token = False
    assert ChatEncoder(plain).encode_chat(TWO_TURNS).input_ids == reference
    # a second save/reload round trip changes nothing
    plain.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert ChatEncoder(again).encode_chat(TWO_TURNS).input_ids == reference
    assert json.loads(again.backend_tokenizer.to_str())["post_processor"]["single"] == [
        {"Sequence": {"id": "A", "type_id": 0}}]


def test_chat_template_renders_the_training_string_and_its_ids(tokenizer):
    encoded = ChatEncoder(tokenizer).encode_chat(TWO_TURNS)
    assert tokenizer.apply_chat_template(TWO_TURNS, tokenize=False) == render_chat(TWO_TURNS)
    ids = tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=False)
    assert list(ids) == encoded.input_ids
    with_prompt = tokenizer.apply_chat_template(TWO_TURNS[:2], tokenize=False, add_generation_prompt=True)
    assert with_prompt == render_chat(TWO_TURNS[:2]) + ASSISTANT
    with pytest.raises(Exception, match="unknown role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def legacy_tokenizer_dir(base_tokenizer_dir, out, config: dict | None):
    """A Llama-2-style legacy `tokenizer.json` over the test vocabulary (Prepend("▁") + Replace normalizer, no
    pre-tokenizer, a post-processor adding <s>), optionally with a tokenizer_config."""
    from transformers import AutoTokenizer

    spec = json.loads(AutoTokenizer.from_pretrained(str(base_tokenizer_dir)).backend_tokenizer.to_str())
    spec.update(normalizer=LEGACY_NORMALIZER, pre_tokenizer=None, post_processor=LLAMA2_POST_PROCESSOR)
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(spec))
    if config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("loader", ["auto_no_config", "load_base_tokenizer_llama_config"])
def test_a_legacy_llama2_tokenizer_json_is_normalised(base_tokenizer_dir, tmp_path, loader):
    from transformers import AutoTokenizer

    config = None if loader == "auto_no_config" else {
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>"}
    src = legacy_tokenizer_dir(base_tokenizer_dir, tmp_path / "legacy", config)
    raw = AutoTokenizer.from_pretrained(str(src))
    raw.add_special_tokens({"additional_special_tokens": [ASSISTANT]})
    # the stand-in is legacy: text after a special token gets its own `▁`, and <s> is added
    assert raw.tokenize(ASSISTANT + "Hi")[:2] == [ASSISTANT, "▁"] or raw.tokenize(ASSISTANT + "Hi")[1].startswith("▁")
    assert raw("Hi")["input_ids"][0] == 1

    base = AutoTokenizer.from_pretrained(str(src)) if loader == "auto_no_config" else load_base_tokenizer(src)
    tok = prepare_tokenizer(base)
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert spec == normalised_spec(spec)
    assert "Prepend" not in json.dumps(spec["normalizer"])
    tok.save_pretrained(tmp_path / "oa")
    for reloaded in (load_tokenizer(tmp_path / "oa"), AutoTokenizer.from_pretrained(str(tmp_path / "oa"))):
        assert reloaded.tokenize(ASSISTANT + "Hi")[1] != "▁" and not reloaded.tokenize(ASSISTANT + "Hi")[1].startswith("▁")
        encoded = ChatEncoder(reloaded).encode_chat(TWO_TURNS).input_ids
        assert list(reloaded.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=False)) == encoded
        assert reloaded("Hi")["input_ids"][0] != 1
        # plain text (no special tokens) keeps the legacy ids: only what follows a special token changes
        for text in corpus_lines(30, seed=5):
            assert reloaded(text, add_special_tokens=False)["input_ids"] == raw(text, add_special_tokens=False)["input_ids"]


def test_normalised_spec_rules():
    meta_first = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    legacy = {"normalizer": LEGACY_NORMALIZER, "pre_tokenizer": None}
    assert normalised_spec(legacy) == {
        "normalizer": {"type": "Sequence", "normalizers": [LEGACY_NORMALIZER["normalizers"][1]]},
        "pre_tokenizer": meta_first}
    always = {"normalizer": None, "pre_tokenizer": {**meta_first, "prepend_scheme": "always"}}
    assert normalised_spec(always) == {"normalizer": None, "pre_tokenizer": meta_first}
    assert normalised_spec({"normalizer": None, "pre_tokenizer": meta_first}) == {"normalizer": None, "pre_tokenizer": meta_first}
    with pytest.raises(ValueError, match="not a Llama layout"):
        normalised_spec({"normalizer": LEGACY_NORMALIZER, "pre_tokenizer": {"type": "Whitespace"}})


def test_load_tokenizer_refuses_a_missing_or_base_tokenizer(base_tokenizer_dir, tmp_path):
    from orca8k.errors import StageInputMissing

    with pytest.raises(StageInputMissing, match="no tokenizer here"):
        load_tokenizer(tmp_path)
    with pytest.raises(StageInputMissing, match="no tokenizer.model or tokenizer.json"):
        load_base_tokenizer(tmp_path)
    load_base_tokenizer(base_tokenizer_dir).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"'<\|system\|>' is not a single known token"):
        load_tokenizer(tmp_path / "base")


def test_saved_files_do_not_depend_on_offline_mode(base_tokenizer_dir, tokenizer_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    saved = {}
    for offline in (True, False):  # tests run with HF_HUB_OFFLINE=1; `orca8k` from a shell usually without
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        for name, tok in (("base", prepare_tokenizer(load_base_tokenizer(base_tokenizer_dir))),
                          ("saved", load_tokenizer(tokenizer_dir))):
            out = tmp_path / f"{name}-{offline}"
            tok.save_pretrained(out)
            saved[name, offline] = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
            assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())
    assert saved["base", True] == saved["base", False] and saved["saved", True] == saved["saved", False]
