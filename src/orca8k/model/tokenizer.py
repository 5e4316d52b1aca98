"""Tokenizers: the demo's sentencepiece training, loading a base tokenizer, and the OA fine-tuning tokenizer.

The fine-tuning tokenizer is the base tokenizer plus the seed's special tokens (`<|system|>`, `<|prompter|>`,
`<|assistant|>`, `<|prefix_begin|>`, `<|prefix_end|>`), with pad = eos = `</s>` and bos `<s>`. Settings that change
tokenization are fixed here and saved with the tokenizer: `legacy=False` (no `▁` is inserted after a special token),
`add_bos_token=False` / `add_eos_token=False` (BOS and EOS are added by `orca8k.data.chat_format`, in one place).

transformers 5 has no sentencepiece-backed slow Llama tokenizer: `LlamaTokenizer` is tokenizers-backed and, loaded
from a folder holding `tokenizer.model`, gives the same ids as sentencepiece (see STACK_NOTES).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SYSTEM, PROMPTER, ASSISTANT = "<|system|>", "<|prompter|>", "<|assistant|>"
PREFIX_BEGIN, PREFIX_END = "<|prefix_begin|>", "<|prefix_end|>"
OA_SPECIAL_TOKENS = (SYSTEM, PROMPTER, ASSISTANT, PREFIX_BEGIN, PREFIX_END)


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


def load_base_tokenizer(name_or_path: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a Llama base tokenizer (a folder with `tokenizer.model`/`tokenizer.json`, or a hub id) with fixed settings.

    Never uses `trust_remote_code`. BOS/EOS are not added automatically (`orca8k.data.chat_format` adds them).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(name_or_path), revision=revision, legacy=False, add_bos_token=False, add_eos_token=False, trust_remote_code=False
    )
    return tok


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Turn a base tokenizer into the OA fine-tuning tokenizer (in place; also returned).

    Adds the five OA special tokens (new ids after the base vocabulary: 32,000 → 32,005 for Llama-2), sets
    pad = eos = `</s>`, right padding for training, and the OA chat template (`orca8k.data.chat_format`).
    """
    from orca8k.data.chat_format import OA_CHAT_TEMPLATE

    tok.add_special_tokens({"additional_special_tokens": list(OA_SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    tok.chat_template = OA_CHAT_TEMPLATE
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
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok: PreTrainedTokenizerBase) -> None:
    """Assert the OA tokenizer contract: special tokens are single known ids, pad = eos, bos present.

    Raises:
        ValueError: naming the token that breaks the contract.
    """
    for token in (BOS, EOS, *OA_SPECIAL_TOKENS):
        ids = tok.convert_tokens_to_ids([token])
        if len(ids) != 1 or ids[0] is None or ids[0] == tok.unk_token_id:
            raise ValueError(f"tokenizer: {token!r} is not a single known token")
    if tok.pad_token != tok.eos_token:
        raise ValueError(f"tokenizer: pad {tok.pad_token!r} != eos {tok.eos_token!r}")


def padded_vocab_size(tok: PreTrainedTokenizerBase, multiple: int) -> int:
    """Embedding rows for this tokenizer: len(tok) rounded up to `multiple` (the seed: 32,005 → 32,016)."""
    from orca8k.plan import padded_vocab_size as _round

    return _round(len(tok), multiple, added=0)
