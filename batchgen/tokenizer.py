"""LLaMA's SentencePiece tokenizer, the Llama-2-chat prompt format, streaming detokenisation and stop strings.

Built on ``sentencepiece`` alone, so the engine needs neither ``transformers`` nor a network.

Three facts about SentencePiece decoding shape :class:`IncrementalDecoder` (all checked against the
real LLaMA model in the tests):

* The ``▁`` (space) that starts the first *visible* piece of a sequence is dropped: ``decode`` of
  ``["▁Hello"]`` is ``"Hello"``. Control tokens (``<s>``, ``</s>``) do not count as visible; byte
  pieces and ``<unk>`` do.
* Byte-fallback pieces (``<0xE2>`` ...) are joined with their *directly adjacent* byte pieces and
  decoded as UTF-8; every byte of an invalid or unfinished sequence becomes one U+FFFD. Any other
  token, control tokens included, ends the byte run.
* Everything else decodes piece by piece, independently of its neighbours.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Mapping, Optional, Sequence

import sentencepiece as spm

from batchgen import prompts
from batchgen.prompts import B_INST, B_SYS, E_INST, E_SYS  # noqa: F401 - kept importable from here

TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    """A SentencePiece model (LLaMA's ``tokenizer.model``) with Meta's encode/decode conventions."""

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if not path.is_file():
            raise ValueError(f"tokenizer path {path} is not a file (expected a SentencePiece {TOKENIZER_FILE})")
        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece model: {e}") from e
        n = self._sp.vocab_size()
        if n <= 0:
            raise ValueError(f"{path} is a SentencePiece model with no pieces")
        # One pass over the vocabulary so that the per-token checks of streaming are set lookups.
        self._control = frozenset(i for i in range(n) if self._sp.is_control(i))
        self._bytes = {i: int(self._sp.id_to_piece(i)[3:-1], 16) for i in range(n) if self._sp.is_byte(i)}
        self._anchor_id, self._anchor_text = self._find_anchor()

    @property
    def vocab_size(self) -> int:
        """Number of pieces; valid ids are ``0 .. vocab_size - 1``."""
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        """Id of ``<s>`` (-1 if the model has none)."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (-1 if the model has none)."""
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Id of the pad piece; LLaMA has none, so this is -1 there."""
        return self._sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally with BOS first and EOS last (as Meta's ``Tokenizer.encode``)."""
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
        return self._sp.encode(text, out_type=int, add_bos=bos, add_eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control tokens decode to nothing, ``<unk>`` to ``" ⁇ "``."""
        return self._sp.decode(self._checked_ids(ids))

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of ``token_id`` (e.g. ``"▁Hello"``, ``"<0xE2>"``, ``"<s>"``)."""
        return self._sp.id_to_piece(self._checked_id(token_id))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a Llama-2-chat dialog, built exactly as Meta's ``chat_completion`` builds them.

        See :func:`batchgen.prompts.encode_chat` (this is a thin wrapper); a malformed dialog or a
        chat marker inside a message raises :class:`batchgen.prompts.PromptError` (a ``ValueError``).
        """
        return prompts.encode_chat(self, messages)

    def encode_chat_prompt(self, user: str, system: Optional[str] = None) -> list[int]:
        """Token ids of a one-turn Llama-2-chat prompt (see :meth:`encode_chat`)."""
        return self.encode_chat(prompts.single_turn(user, system))

    def _checked_id(self, token_id: int, where: str = "token id") -> int:
        try:
            i = operator.index(token_id)  # ints and numpy/torch integer scalars; never floats
        except TypeError:
            raise TypeError(f"{where} must be an integer, got {token_id!r}") from None
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"{where} {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return i

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        return [self._checked_id(t, f"ids[{k}]") for k, t in enumerate(ids)]

    def _find_anchor(self) -> tuple[int, str]:
        """A plain piece with no leading ``▁``: put before a window, it makes the window decode mid-text."""
        for i in range(self._sp.vocab_size()):
            piece = self._sp.id_to_piece(i)
            if (self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_byte(i)
                    or self._sp.is_unused(i) or piece.startswith("▁")):
                continue
            text = self._sp.decode([i])
            if text and "\ufffd" not in text:
                return i, text
        raise ValueError(f"{self.path}: no plain piece without a leading '▁' to anchor streaming decode")


class IncrementalDecoder:
    """Turns generated token ids into text as they arrive.

    *Completion text* is defined as ``tokenizer.decode(completion_ids)``: the completion decoded on its
    own, so its first ``▁`` is dropped and control tokens add nothing (what vLLM and HF return with
    ``skip_special_tokens``). After :meth:`finish`, :attr:`text` equals exactly that, for any ids.

    With ``prompt_ids`` the completion is instead decoded as the continuation of the prompt: the text is
    what the completion adds to ``decode(prompt_ids)`` (so a leading space survives). If the prompt ends
    in an unfinished UTF-8 character, those bytes are decoded together with the completion.

    :meth:`add` returns only text that later tokens cannot change: it holds back (at most three) byte
    pieces that may still be the start of a multi-byte character, so no half character (U+FFFD) is
    emitted early. Each call decodes at most five ids: O(1) per token.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Optional[Sequence[int]] = None) -> None:
        self._tok = tokenizer
        self._pending: list[int] = []  # ids not yet turned into text: an unfinished character's bytes
        self._after_visible = False  # a visible (non-control) token precedes the pending ids
        self._chunks: list[str] = []
        self._finished = False
        if prompt_ids:
            ids = tokenizer._checked_ids(prompt_ids)
            cut = len(ids) - self._unfinished_len(ids)
            self._pending = ids[cut:]
            self._after_visible = any(i not in tokenizer._control for i in reversed(ids[:cut]))

    @property
    def text(self) -> str:
        """All text emitted so far (without held-back bytes until :meth:`finish`)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_id: int) -> str:
        """Take the next generated id; return the text it completes (often one piece, possibly ``""``)."""
        if self._finished:
            raise RuntimeError("IncrementalDecoder.add() after finish()")
        self._pending.append(self._tok._checked_id(token_id))
        if self._unfinished_len(self._pending):
            return ""
        return self._flush()

    def finish(self) -> str:
        """End the stream: return the held-back bytes' text (U+FFFD per byte, as ``decode`` gives)."""
        if self._finished:
            return ""
        self._finished = True
        return self._flush() if self._pending else ""

    def _flush(self) -> str:
        pending, self._pending = self._pending, []
        if self._after_visible:
            # Decoding the window after a plain anchor piece keeps the window's leading "▁" as a space
            # and starts it with a fresh byte run, exactly as inside the full sequence. The previous ids
            # would not do: if they are only control tokens, SentencePiece still drops that "▁".
            anchor, anchor_text = self._tok._anchor_id, self._tok._anchor_text
            full = self._tok._sp.decode([anchor] + pending)
            if not full.startswith(anchor_text):
                raise RuntimeError(f"tokenizer decodes piece {anchor} differently in context; cannot stream")
            new = full[len(anchor_text):]
        else:
            new = self._tok._sp.decode(pending)
        self._after_visible = self._after_visible or any(i not in self._tok._control for i in pending)
        self._chunks.append(new)
        return new

    def _unfinished_len(self, ids: Sequence[int]) -> int:
        """How many of the last ``ids`` are byte pieces that a further byte could make one character (0-3).

        Permissive on purpose (any 0xC0..0xF7 lead byte counts): holding back too much only delays
        text, while emitting too early would emit U+FFFD halves.
        """
        tail: list[int] = []
        for i in reversed(ids[-3:]):
            b = self._tok._bytes.get(i)
            if b is None:
                break
            tail.insert(0, b)
        for k in range(1, len(tail) + 1):
            lead = tail[-k]
            need = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 0
            if need > k and all(0x80 <= b < 0xC0 for b in tail[len(tail) - k + 1:]):
                return k
        return 0


class StopStringMatcher:
    """Finds a stop string in streamed text, also when it spans several tokens' text.

    OpenAI semantics: the text ends *before* the stop string. Generation stops at the first stop
    string to be completed; if several are completed by the same character, at the longest. Feed each
    new chunk with :meth:`feed`; only the last ``max(len(stop)) - 1`` characters are searched again,
    so each call costs O(len(chunk) + longest stop).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            raise TypeError("stops must be a list of strings, not a single string")
        for k, s in enumerate(stops):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{k}] must be a non-empty string, got {s!r}")
        self.stops: tuple[str, ...] = tuple(stops)
        self._keep = max((len(s) for s in self.stops), default=1) - 1  # chars a later match can start in
        self._chunks: list[str] = []
        self._len = 0  # characters fed so far
        self._tail = ""  # the last `_keep` characters fed
        self._cut: Optional[int] = None
        self.stop: Optional[str] = None  # the stop string that matched

    def feed(self, new_text: str) -> Optional[int]:
        """Add text; return the length of the text before the stop string once one is found, else None."""
        if self._cut is not None:
            raise RuntimeError(f"StopStringMatcher.feed() after stop string {self.stop!r} was found")
        window = self._tail + new_text
        base = self._len - len(self._tail)  # offset of window[0] in the whole text
        self._chunks.append(new_text)
        self._len += len(new_text)
        self._tail = window[max(0, len(window) - self._keep):] if self._keep else ""
        # The stop string completed first wins (the longest, if several end at the same character):
        # the same answer however the text was chunked, and what a token-by-token check would see.
        best: Optional[tuple[int, int, str]] = None
        for s in self.stops:
            at = window.find(s)
            if at >= 0 and (best is None or (at + len(s), at) < best[:2]):
                best = (at + len(s), at, s)
        if best is not None:
            self._cut, self.stop = base + best[1], best[2]
        return self._cut

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been found."""
        return self._cut is not None

    @property
    def text(self) -> str:
        """All text fed, truncated before the stop string if one was found."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        full = self._chunks[0] if self._chunks else ""
        return full if self._cut is None else full[:self._cut]

    @property
    def safe_text(self) -> str:
        """The part of :attr:`text` that no later chunk can cut: for streaming it out early.

        Before a stop is found, a tail of the text that is a prefix of some stop string is held back.
        """
        text = self.text
        if self._cut is not None:
            return text
        for n in range(min(self._keep, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return text[:-n]
        return text


def load_tokenizer(model_dir: str | Path) -> Optional[Tokenizer]:
    """The ``tokenizer.model`` in ``model_dir``, or None when it has none (token ids still work)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    path = d / TOKENIZER_FILE
    return Tokenizer(path) if path.exists() else None
