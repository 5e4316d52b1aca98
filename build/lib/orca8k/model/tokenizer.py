"""Tokenizers: the demo's sentencepiece training, loading a base tokenizer, and the OA fine-tuning tokenizer.

The fine-tuning tokenizer is the base tokenizer plus the seed's special tokens (`<|system|>`, `<|prompter|>`,
`<|assistant|>`, `<|prefix_begin|>`, `<|prefix_end|>`), with pad = eos = `</s>` and bos `<s>`. Settings that change
tokenization are fixed here and saved with the tokenizer: `legacy=False` (no `▁` is inserted after a special token),
`add_bos_token=False` / `add_eos_token=False` (BOS and EOS are added by `orca8k.data.chat_format`, in one place).

transformers 5 has no sentencepiece-backed slow Llama tokenizer: `LlamaTokenizer` is tokenizers-backed and, loaded
from a folder holding `tokenizer.model`, gives the same ids as sentencepiece (see STACK_NOTES).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SYSTEM, PROMPTER, ASSISTANT = "<|system|>", "<|prompter|>", "<|assistant|>"
PREFIX_BEGIN, PREFIX_END = "<|prefix_begin|>", "<|prefix_end|>"
OA_SPECIAL_TOKENS = (SYSTEM, PROMPTER, ASSISTANT, PREFIX_BEGIN, PREFIX_END)
METASPACE = "\u2581"  # "▁", sentencepiece's whitespace marker


def train_sentencepiece(
    lines: Iterable[str], out_dir: str | Path, vocab_size: int, input_sentence_size: int, seed: int = 0
) -> Path:
    """Train a BPE sentencepiece model with Llama-2's trainer settings and write `out_dir/tokenizer.model`.

    Llama-2's settings: BPE, byte fallback (no unknown characters), digits split into single pieces, whitespace
    kept as is (`identity` normalisation, no collapsing), a dummy prefix, ids unk=0, bos=1, eos=2 and no pad id.

    Args:
        lines: training sentences (one document line each); empty lines are skipped.
        out_dir: folder to write `tokenizer.model` and `tokenizer.vocab` into.
        vocab_size: pieces in the model (Llama-2: 32,000).
        input_sentence_size: at most this many lines are used (sentencepiece samples them with its own seed).
        seed: only used to order the sampling deterministically (sentencepiece seeds its sampler from `srand`).

    Returns:
        Path of `tokenizer.model`.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed % (2**31))
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line for line in lines if line.strip()),
        model_prefix=str(out_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=0.99995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        num_threads=min(os.cpu_count() or 1, 16),
        minloglevel=2,
    )
    return out_dir / "tokenizer.model"


def normalised_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a `tokenizers` JSON spec so it encodes like a non-legacy Llama tokenizer (a pure function).

    Llama-2's hub `tokenizer.json` is *legacy*: its normalizer is `Sequence[Prepend("▁"), Replace(" ", "▁")]` with no
    pre-tokenizer, so every stretch of text between two special tokens gets its own `▁` dummy prefix
    (`<|assistant|>Hi` → `<|assistant|>`, `▁Hi`). The non-legacy form moves the dummy prefix into a
    `Metaspace(prepend_scheme="first", split=False)` pre-tokenizer: only the very start of the input gets `▁`, which
    is how `orca8k.data.chat_format` encodes segments. Plain text without special tokens encodes to the same ids in
    both forms (the prefix goes before the first character either way). A `Metaspace` with `prepend_scheme="always"`
    (a Llama tokenizer built with `legacy=True`) becomes `"first"` too.

    Args:
        spec: `json.loads(tokenizer.backend_tokenizer.to_str())`; not modified.

    Returns:
        A new spec (equal to `spec` when it is already non-legacy); it shares `spec`'s model (vocabulary) object.

    Raises:
        ValueError: the spec has a `Prepend("▁")` normalizer *and* a pre-tokenizer (no known Llama layout).
    """
    spec = {**spec, "normalizer": copy.deepcopy(spec.get("normalizer")),
            "pre_tokenizer": copy.deepcopy(spec.get("pre_tokenizer"))}  # the vocabulary is shared, not copied
    normalizer, removed = _drop_prepend(spec.get("normalizer"))
    if removed:
        if spec.get("pre_tokenizer") is not None:
            raise ValueError("tokenizer.json: a Prepend('▁') normalizer with a pre-tokenizer is not a Llama layout")
        spec["normalizer"] = normalizer
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "first", "split": False}
    spec["pre_tokenizer"] = _metaspace_first(spec.get("pre_tokenizer"))
    return spec


def _drop_prepend(node: Any) -> tuple[Any, bool]:
    """Remove `Prepend("▁")` from a normalizer JSON node; returns (node, whether one was removed)."""
    if node is None:
        return None, False
    if node.get("type") == "Prepend" and node.get("prepend") == METASPACE:
        return None, True
    if node.get("type") == "Sequence":
        kept = [n for n in node["normalizers"] if not (n.get("type") == "Prepend" and n.get("prepend") == METASPACE)]
        if len(kept) == len(node["normalizers"]):
            return node, False
        return ({**node, "normalizers": kept} if kept else None), True
    return node, False


def _metaspace_first(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "always":
            return {**node, "prepend_scheme": "first"}
        return {k: _metaspace_first(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_metaspace_first(n) for n in node]
    return node


def load_base_tokenizer(name_or_path: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a Llama base tokenizer (a folder with `tokenizer.model` and/or `tokenizer.json`, or a hub id).

    Loaded as transformers' `LlamaTokenizer` (tokenizers-backed; ids equal sentencepiece's), with the settings
    that change tokenization fixed: `legacy=False`, no automatic BOS/EOS (`orca8k.data.chat_format` adds them).
    Never uses `trust_remote_code`.

    Raises:
        orca8k.errors.StageInputMissing: a local folder without `tokenizer.model` or `tokenizer.json`.
    """
    from transformers import LlamaTokenizer

    from orca8k.errors import StageInputMissing

    local = Path(name_or_path)
    if local.is_dir() and not ((local / "tokenizer.model").is_file() or (local / "tokenizer.json").is_file()):
        raise StageInputMissing(f"{local}: no tokenizer.model or tokenizer.json (is the base stage done?)")
    return drop_loading_kwargs(LlamaTokenizer.from_pretrained(
        str(name_or_path), revision=revision, legacy=False, add_bos_token=False, add_eos_token=False,
        trust_remote_code=False,
    ))


# how a tokenizer was loaded, not what it is: transformers keeps these in `init_kwargs`, so `save_pretrained` would
# write e.g. `"local_files_only": true` under HF_HUB_OFFLINE=1 and false without it — the same tokenizer, other bytes
LOADING_KWARGS = ("local_files_only", "cache_dir", "force_download", "proxies", "token", "revision", "subfolder")


def drop_loading_kwargs(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Remove `LOADING_KWARGS` from `tok.init_kwargs` (in place; also returned), so what `save_pretrained` writes
    depends on the tokenizer only, not on the environment it was loaded in."""
    for key in LOADING_KWARGS:
        tok.init_kwargs.pop(key, None)
    return tok


def fix_tokenization_settings(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pin the settings that change tokenization, in the backend and in what `save_pretrained` writes (in place).

    - the backend pipeline is non-legacy (`normalised_spec`), and `legacy=False` is saved, so a reload as
      `LlamaTokenizer` rebuilds the same pipeline;
    - no automatic BOS/EOS: the post-processor adds nothing. transformers 5 does not save `add_bos_token` /
      `add_eos_token`; the post-processor saved in `tokenizer.json` is what survives a reload, so it is the one to
      pin (`update_post_processor` with both off gives `$A` alone).

    Raises:
        ValueError: see `normalised_spec`.
    """
    from tokenizers import Tokenizer

    backend = tok.backend_tokenizer
    spec = json.loads(backend.to_str())
    fixed = normalised_spec(spec)
    if fixed != spec:
        rebuilt = Tokenizer.from_str(json.dumps(fixed))
        backend.normalizer = rebuilt.normalizer
        backend.pre_tokenizer = rebuilt.pre_tokenizer
    tok.legacy = False
    tok.init_kwargs["legacy"] = False
    tok.add_eos_token = False  # each setter rebuilds the post-processor from both flags
    tok.add_bos_token = False
    return tok


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Turn a base tokenizer into the OA fine-tuning tokenizer (in place; also returned).

    Adds the five OA special tokens (new ids after the base vocabulary: 32,000 → 32,005 for Llama-2; each one id,
    never split, never normalised), sets pad = eos = `</s>`, right padding for training, the OA chat template
    (`orca8k.data.chat_format.OA_CHAT_TEMPLATE`), and pins the tokenization settings (`fix_tokenization_settings`:
    non-legacy pipeline, no automatic BOS/EOS) so that they survive `save_pretrained` + reload.

    Raises:
        ValueError: an unsupported backend pipeline (see `normalised_spec`), or the result breaks the contract
            (see `check_tokenizer`).
    """
    from tokenizers import AddedToken

    from orca8k.data.chat_format import OA_CHAT_TEMPLATE

    fix_tokenization_settings(tok)
    for name, token in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", UNK)):
        if getattr(tok, name) is None:  # a bare tokenizer.json names none of them
            setattr(tok, name, token)
    new = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
           for t in OA_SPECIAL_TOKENS]
    tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    tok.chat_template = OA_CHAT_TEMPLATE
    check_tokenizer(tok)
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a saved fine-tuning tokenizer (from `tokenize`'s output or a model dir) and check its contract.

    Raises:
        orca8k.errors.StageInputMissing: no tokenizer files at `path`.
        ValueError: a special token is missing or not a single id, or pad != eos.
    """
    from transformers import AutoTokenizer

    from orca8k.errors import StageInputMissing

    path = Path(path)
    if not (path / "tokenizer_config.json").is_file():
        raise StageInputMissing(f"{path}: no tokenizer here (run `orca8k tokenize` first)")
    tok = AutoTokenizer.from_pretrained(str(path), legacy=False, add_bos_token=False, add_eos_token=False, trust_remote_code=False)
    drop_loading_kwargs(tok)
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok: PreTrainedTokenizerBase) -> None:
    """Assert the OA tokenizer contract: special tokens are single known ids, pad = eos, bos present.

    Also checks the pinned tokenization settings: a non-legacy pipeline and no automatic BOS/EOS.

    Raises:
        ValueError: naming the token or setting that breaks the contract.
    """
    for token in (BOS, EOS, *OA_SPECIAL_TOKENS):
        ids = tok.convert_tokens_to_ids([token])
        if len(ids) != 1 or ids[0] is None or ids[0] == tok.unk_token_id:
            raise ValueError(f"tokenizer: {token!r} is not a single known token")
    if (tok.bos_token, tok.eos_token) != (BOS, EOS):
        raise ValueError(f"tokenizer: bos/eos are {tok.bos_token!r}/{tok.eos_token!r}, expected {BOS!r}/{EOS!r}")
    if tok.pad_token != tok.eos_token:
        raise ValueError(f"tokenizer: pad {tok.pad_token!r} != eos {tok.eos_token!r}")
    spec = json.loads(tok.backend_tokenizer.to_str())
    if normalised_spec(spec) != spec:
        raise ValueError("tokenizer: legacy pipeline (a `▁` after each special token); use prepare_tokenizer")
    probe = tok("a", add_special_tokens=True)["input_ids"]
    if tok.bos_token_id in probe or tok.eos_token_id in probe:
        raise ValueError("tokenizer: adds BOS/EOS by itself; orca8k.data.chat_format.ChatEncoder.add_bos adds BOS")


def padded_vocab_size(tok: PreTrainedTokenizerBase, multiple: int) -> int:
    """Embedding rows for this tokenizer: len(tok) rounded up to `multiple` (the seed: 32,005 → 32,016)."""
    from orca8k.plan import padded_vocab_size as _round

    return _round(len(tok), multiple, added=0)
