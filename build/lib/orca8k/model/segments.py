"""Plain text → token ids without ever parsing special tokens: the segment encoder behind the OA format.

`orca8k.data.chat_format.ChatEncoder` encodes each message (or text) on its own and inserts the special ids itself,
so a message containing `<|assistant|>` or `</s>` stays plain text. The segments are encoded the way the tokenizer
encodes text right after a special token (no `▁` dummy prefix) or at the very start (with it), so the ids equal the
tokenizer's on the rendered string whenever the text holds no special-token strings.

Long texts are encoded in pieces cut after a newline when the vocabulary allows it (`newline_is_a_boundary`): the
ids are the same, and Llama's BPE — which runs over a whole text as one word (`Metaspace(split=False)`) with a cost
that grows faster than the length — gets shorter words and a Rust batch that balances across threads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orca8k.model.tokenizer import METASPACE, normalised_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PIECE_CHARS = 1024  # long texts are encoded in pieces of about this many chars, cut after a newline
# (measured on realdata, 4k vocab, CPU time: whole 65k-char chunks 1.17 M tok/s; pieces of 1,024 chars 1.56 M)


def _set_dummy_prefix(node: Any, dummy_prefix: bool) -> Any:
    """Rewrite a (non-legacy) tokenizers JSON spec so Llama's `▁` dummy prefix is always (True) or never (False)
    added: Metaspace pre-tokenizers get `prepend_scheme` always/never."""
    if isinstance(node, list):
        return [_set_dummy_prefix(n, dummy_prefix) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Metaspace":
        return {**node, "prepend_scheme": "always" if dummy_prefix else "never"}
    return {k: _set_dummy_prefix(v, dummy_prefix) for k, v in node.items()}


def segment_tokenizer(tok: PreTrainedTokenizerBase, dummy_prefix: bool) -> Any:
    """A `tokenizers.Tokenizer` over `tok`'s vocabulary for plain-text segments: special-token strings are never
    matched (`encode_special_tokens=True`), no special tokens are added, and Llama's `▁` dummy prefix is always
    (`dummy_prefix=True`, text at the start of a sequence) or never (text after a special token) added.
    Used by `orca8k.data.chat_format.ChatEncoder`; ids equal `tok`'s for text without special-token strings.
    """
    from tokenizers import Tokenizer

    spec = normalised_spec(json.loads(tok.backend_tokenizer.to_str()))
    spec["pre_tokenizer"] = _set_dummy_prefix(spec.get("pre_tokenizer"), dummy_prefix)
    spec["post_processor"] = None  # segments get no special tokens; they are inserted by id
    spec["padding"] = spec["truncation"] = None
    segments = Tokenizer.from_str(json.dumps(spec))
    segments.encode_special_tokens = True  # text is never parsed for special tokens
    return segments


def newline_is_a_boundary(tok: PreTrainedTokenizerBase) -> bool:
    """Whether BPE never merges across a `\n` for this tokenizer, so text cut after a newline encodes to the same ids
    piece by piece (with the dummy prefix only on the first piece) as in one call.

    True when: the model is BPE with byte fallback, the normalizer is absent or `Replace(" ", "▁")` (per character),
    the pre-tokenizer is `Metaspace(split=False)` (non-legacy), and no vocabulary piece other than the byte token
    `<0x0A>` contains a newline (so no merge can involve one: it is always a byte-fallback symbol on its own).
    Llama-2's tokenizer and the demo's (trained on lines) qualify.
    """
    return spec_newline_is_a_boundary(json.loads(tok.backend_tokenizer.to_str()))


def spec_newline_is_a_boundary(spec: dict[str, Any]) -> bool:
    """`newline_is_a_boundary` on a `tokenizers` JSON spec."""
    spec = normalised_spec(spec)
    model, norm, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer") or {}
    replace_only = {"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}
    norms = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else ([norm] if norm else [])
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not model.get("byte_fallback") or any(n != replace_only for n in norms):
        return False
    if len(pres) != 1 or pres[0].get("type") != "Metaspace" or pres[0].get("split") is not False:
        return False
    return not any("\n" in piece for piece in model.get("vocab", {}))


def split_after_newlines(text: str, piece_chars: int) -> list[str]:
    """Cut `text` after newlines into pieces of at most `piece_chars` chars where a newline allows it (a piece
    without a newline in reach runs to the next one). `"".join(pieces) == text`; an empty text gives `[""]`."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = text.rfind("\n", start, start + piece_chars)
        if cut < 0:
            cut = text.find("\n", start + piece_chars)
            if cut < 0:
                break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    if start < len(text) or not pieces:
        pieces.append(text[start:])
    return pieces


class SegmentEncoder:
    """Encodes plain-text segments over a tokenizer's vocabulary (see the module docstring).

    Args:
        tokenizer: a non-legacy Llama tokenizer (`orca8k.model.tokenizer.prepare_tokenizer`).

    Attributes:
        first: `tokenizers.Tokenizer` for text at the start of a sequence (`▁` dummy prefix).
        inner: `tokenizers.Tokenizer` for text after a special token (no dummy prefix).
        piece_chars: piece size for long texts; 0 when the vocabulary does not allow cutting after newlines.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.first = segment_tokenizer(tokenizer, dummy_prefix=True)
        self.inner = segment_tokenizer(tokenizer, dummy_prefix=False)
        self.piece_chars = PIECE_CHARS if newline_is_a_boundary(tokenizer) else 0

    def encode(self, texts: Sequence[str], *, first: bool = False) -> list[list[int]]:
        """Token ids of each text: one call into the Rust tokenizer per kind of piece for the whole list (threads
        across cores unless `TOKENIZERS_PARALLELISM=false`); the same ids as encoding each text whole.

        Args:
            texts: the texts.
            first: encode them as text at the start of a sequence (only a text's first piece gets the prefix).
        """
        pieces: list[str] = []
        owners: list[int] = []
        starts: list[bool] = []
        for i, text in enumerate(texts):
            for k, piece in enumerate(split_after_newlines(text, self.piece_chars) if self.piece_chars else [text]):
                pieces.append(piece)
                owners.append(i)
                starts.append(first and k == 0)
        out: list[list[int]] = [[] for _ in texts]
        for tokenizer, flag in ((self.first, True), (self.inner, False)):
            chosen = [j for j, s in enumerate(starts) if s == flag]
            if not chosen:
                continue
            encodings = tokenizer.encode_batch_fast([pieces[j] for j in chosen], add_special_tokens=False)
            for j, e in zip(chosen, encodings, strict=True):
                out[owners[j]] += e.ids
        return out
