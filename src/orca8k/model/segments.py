"""Plain text → token ids without ever parsing special tokens: the segment encoder behind the OA format.

`orca8k.data.chat_format.ChatEncoder` encodes each message (or text) on its own and inserts the special ids itself,
so a message containing `<|assistant|>` or `</s>` stays plain text. The segments are encoded the way the tokenizer
encodes text right after a special token (no `▁` dummy prefix) or at the very start (with it), so the ids equal the
tokenizer's on the rendered string whenever the text holds no special-token strings.

Long texts are encoded in pieces cut after a newline when the vocabulary allows it (`spec_newline_is_a_boundary`): the
ids are the same, and Llama's BPE — which runs over a whole text as one word (`Metaspace(split=False)`) with a cost
that grows faster than the length — gets shorter words and a Rust batch that balances across threads.

When the normalizer and pre-tokenizer do nothing but `Metaspace(split=False)`'s work (`spec_metaspace_only`: Llama's
layout), that work — `" "` → `▁`, and the `▁` dummy prefix of a non-empty text that does not already start with one —
is done in Python (`metaspace`, one `str.replace`), and the pieces go to a tokenizer without normalizer or
pre-tokenizer (`SegmentEncoder.bare`): the same ids, without the Rust side's per-character alignment bookkeeping
(measured on the text rows of `benchmarks/bench_tokenize.py`, 8 M tokens, 4k vocabulary, 2 threads: 3.30 s → 2.91 s).
"""

from __future__ import annotations

import functools
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


def _segment_tokenizer(spec: dict[str, Any], dummy_prefix: bool) -> Any:
    """A `tokenizers.Tokenizer` over a (normalised) spec's vocabulary for plain-text segments: special-token strings
    are never matched, no special tokens are added, and Llama's `▁` dummy prefix is always (`dummy_prefix=True`, text
    at the start of a sequence) or never (text after a special token) added. Ids equal the tokenizer's for text
    without special-token strings."""
    return _plain_text_tokenizer({**spec, "pre_tokenizer": _set_dummy_prefix(spec.get("pre_tokenizer"), dummy_prefix)})


def _plain_text_tokenizer(spec: dict[str, Any]) -> Any:
    """The `tokenizers.Tokenizer` of `spec` that never matches special-token strings and adds no special tokens
    (segments get none: they are inserted by id)."""
    from tokenizers import Tokenizer

    segments = Tokenizer.from_str(json.dumps({**spec, "post_processor": None, "padding": None, "truncation": None}))
    segments.encode_special_tokens = True  # text is never parsed for special tokens
    return segments


def spec_newline_is_a_boundary(spec: dict[str, Any]) -> bool:
    """Whether BPE never merges across a `\n` for this `tokenizers` JSON spec, so text cut after a newline encodes to
    the same ids piece by piece (with the dummy prefix only on the first piece) as in one call.

    True when: the model is BPE with byte fallback, the normalizer and pre-tokenizer only do `Metaspace(split=False)`'s
    work (`spec_metaspace_only`), and no vocabulary piece other than the byte token `<0x0A>` contains a newline (so
    no merge can involve one: it is always a byte-fallback symbol on its own). Llama-2's tokenizer and the demo's
    (trained on lines) qualify.
    """
    spec = normalised_spec(spec)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not spec_metaspace_only(spec):
        return False
    return not any("\n" in piece for piece in model.get("vocab", {}))


def spec_metaspace_only(spec: dict[str, Any]) -> bool:
    """Whether a (normalised, `normalised_spec`) `tokenizers` JSON spec's normalizer and pre-tokenizer do nothing
    but `Metaspace(replacement="▁", split=False)`'s work: no normalizer, or only `Replace(" ", "▁")` ones, and one
    such `Metaspace` pre-tokenizer. Then `metaspace` + a tokenizer without either encode exactly as the spec does."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer") or {}
    replace_only = {"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}
    norms = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else ([norm] if norm else [])
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any(n != replace_only for n in norms) or len(pres) != 1:
        return False
    return (pres[0].get("type") == "Metaspace" and pres[0].get("split") is False
            and pres[0].get("replacement") == METASPACE)


def metaspace(text: str, dummy_prefix: bool) -> str:
    """What `Metaspace(split=False)` makes of `text` before BPE: every `" "` → `"▁"`, and with `dummy_prefix` a
    leading `"▁"` unless the text is empty or already starts with one (tokenizers' own rule, checked against it in
    tests/test_chat_format.py)."""
    text = text.replace(" ", METASPACE)
    return METASPACE + text if dummy_prefix and text and not text.startswith(METASPACE) else text


def _bare_tokenizer(spec: dict[str, Any]) -> Any:
    """The segment tokenizer without normalizer and pre-tokenizer, for text already through `metaspace` (only when
    `spec_metaspace_only(spec)`)."""
    return _plain_text_tokenizer({**spec, "normalizer": None, "pre_tokenizer": None})


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
        first: `tokenizers.Tokenizer` for text at the start of a sequence (`▁` dummy prefix); built on first use.
        inner: `tokenizers.Tokenizer` for text after a special token (no dummy prefix); built on first use.
        bare: a tokenizer without normalizer and pre-tokenizer when `spec_metaspace_only` holds (then `encode`
            uses it for both kinds), else None.
        piece_chars: piece size for long texts; 0 when the vocabulary does not allow cutting after newlines.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._build(normalised_spec(json.loads(tokenizer.backend_tokenizer.to_str())))

    def _build(self, spec: dict[str, Any]) -> None:
        self._spec = spec
        self.bare = _bare_tokenizer(spec) if spec_metaspace_only(spec) else None
        self.piece_chars = PIECE_CHARS if spec_newline_is_a_boundary(spec) else 0

    @functools.cached_property
    def first(self) -> Any:
        return _segment_tokenizer(self._spec, dummy_prefix=True)  # built on first use: unused when `bare` exists

    @functools.cached_property
    def inner(self) -> Any:
        return _segment_tokenizer(self._spec, dummy_prefix=False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as the spec, rebuilt on load: a `tokenizers.Tokenizer` pickles through its JSON, which lacks
        `encode_special_tokens`, so a pickled segment tokenizer would parse `</s>` or `<|assistant|>` in the text as
        special tokens again (in `datasets.map`'s worker processes, say)."""
        return {"spec": json.dumps(self._spec)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._build(json.loads(state["spec"]))

    def encode(self, texts: Sequence[str], *, first: bool = False) -> list[list[int]]:
        """Token ids of each text: one call into the Rust tokenizer for the whole list (two without `bare`; threads
        across cores unless `TOKENIZERS_PARALLELISM=false`); the same ids as encoding each text whole with `first`
        or `inner`.

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
        if self.bare is not None:
            ready = [metaspace(p, s) for p, s in zip(pieces, starts, strict=True)]
            for j, e in enumerate(self.bare.encode_batch_fast(ready, add_special_tokens=False)):
                out[owners[j]] += e.ids
            return out
        for tokenizer, flag in ((self.first, True), (self.inner, False)):
            chosen = [j for j, s in enumerate(starts) if s == flag]
            if not chosen:
                continue
            encodings = tokenizer.encode_batch_fast([pieces[j] for j in chosen], add_special_tokens=False)
            for j, e in zip(chosen, encodings, strict=True):
                out[owners[j]] += e.ids
        return out
