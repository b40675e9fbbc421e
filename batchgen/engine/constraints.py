"""Constrained decoding: JSON schema, regex and choice constraints as per-step token masks.

Built on llguidance (a maintained grammar engine: Earley parser over a lexer, written in Rust, a
3 MB wheel with no dependencies). This module only adapts it to batchgen:

* :class:`TokenizerInfo` tells llguidance what bytes every SentencePiece piece stands for: byte
  fallback pieces ``<0x00>``..``<0xFF>`` are single bytes, ``▁`` is a space, control, unknown and
  unused pieces are special tokens that no grammar can produce (only EOS, to end).
* :func:`compile_constraint` turns a constraint into a grammar once per job (cached by content)
  and refuses one the engine cannot compile with :class:`ConstraintError`.
* :class:`ConstraintState` follows one request: it fills that row's bitmask before sampling and
  accepts the sampled token after. :func:`apply_masks` masks the constrained rows of a batch's
  logits and leaves the other rows untouched.

**What is checked is the completion text.** batchgen's completion text is
``tokenizer.decode(completion_ids)``, which drops the ``▁`` that starts the first piece. A model
continuing ``Answer:`` naturally writes ``▁{`` or ``▁to`` ``xic``, so every grammar allows one
optional leading space, written as the first piece's ``▁`` (which the completion text then drops):
never as the byte piece ``<0x20>``, which decoding keeps. Constraints whose own text starts with a
space are therefore ambiguous and best avoided. JSON is generated without free whitespace, so a
document ends as soon as its closing bracket is written. A regex must match the whole completion;
``\\d``, ``\\w`` and ``\\s`` are ASCII classes (as with Python's ``re.ASCII`` and in JSON Schema's
``pattern``), so ``\\d`` is ``[0-9]``, not every Unicode digit.

Engine semantics this supports, per constrained row and step: :func:`apply_masks` before
sampling, :meth:`ConstraintState.accept` after. If ``accept`` returns False or
:attr:`~ConstraintState.error` is set, finish the row with ``error``; else when
:meth:`~ConstraintState.is_terminated` turns true (the document ended: only EOS could follow, or
EOS was just taken) finish it with ``stop``, before any ``max_tokens`` check. A row cut by
``max_tokens`` gets ``finish_reason: length`` and the error from
:meth:`~ConstraintState.length_error` (None when what it wrote is already complete, as with
``\\d+``). Stop strings should not apply to constrained rows: they would cut a document.

A :class:`CompiledConstraint` holds llguidance objects that do not pickle: send the ``(kind,
value)`` to a Ray replica and compile there (cached per process); :func:`check_constraint` checks
a spec without a tokenizer.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import llguidance
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from batchgen.tokenizer import Tokenizer

ConstraintKind = Literal["json_schema", "regex", "choice"]
KINDS: tuple[str, ...] = ("json_schema", "regex", "choice")

# llguidance marks special tokens by a leading 0xFF byte, which never occurs in UTF-8 text.
_SPECIAL_PREFIX = b"\xff"
_WORD_START = "\u2581"  # SentencePiece's "▁"


class ConstraintError(ValueError):
    """A constraint that cannot be compiled (bad schema or regex, unsupported feature)."""


@dataclass(frozen=True, eq=False)
class TokenizerInfo:
    """A SentencePiece vocabulary as llguidance sees it. Build with :func:`tokenizer_info`."""

    ll_tokenizer: Any  # llguidance.LLTokenizer
    vocab_size: int  # pieces in the tokenizer; a model's logits may be wider (the rest is masked)
    eos_id: int
    bos_id: int
    space_byte_id: Optional[int]  # the byte piece <0x20>, if the vocabulary has one
    source: str  # the tokenizer file, for messages

    @property
    def mask_words(self) -> int:
        """int32 words per bitmask row (32 tokens each)."""
        return (self.vocab_size + 31) // 32


def _plain_encoder(model_proto: bytes) -> spm.SentencePieceProcessor:
    """The same model encoding text as a *continuation*: no ``▁`` prefixed, nothing normalised away.

    llguidance tokenizes forced text (``{"name":`` when the schema leaves no choice) and allows only
    that canonical tokenization, so the encoder must return pieces whose bytes are exactly the text.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    spec = proto.normalizer_spec
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


class _Encoder:
    """The callable llguidance's ``TokenizerWrapper`` wants: bytes in, token ids out."""

    def __init__(self, sp: spm.SentencePieceProcessor, byte_ids: dict[int, int], vocab: Sequence[bytes]) -> None:
        self.eos_token_id = sp.eos_id()
        self.bos_token_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.tokens = vocab
        self.special_token_ids = [i for i, t in enumerate(vocab) if t.startswith(_SPECIAL_PREFIX)]
        self._sp = sp
        self._byte_ids = byte_ids

    def __call__(self, data: bytes) -> list[int]:
        try:
            text, rest = data.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            # An unfinished character at the end: encode the valid prefix, the rest byte by byte.
            text, rest = data[:e.start].decode("utf-8"), data[e.start:]
        ids: list[int] = self._sp.encode(text, out_type=int) if text else []
        for b in rest:
            if b not in self._byte_ids:
                raise ValueError(f"byte 0x{b:02X} has no byte-fallback piece in this vocabulary")
            ids.append(self._byte_ids[b])
        return ids


def _piece_bytes(sp: spm.SentencePieceProcessor) -> tuple[list[bytes], dict[int, int]]:
    """Bytes of every piece, and byte value -> byte-fallback piece id."""
    vocab: list[bytes] = []
    byte_ids: dict[int, int] = {}
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            b = int(piece[3:-1], 16)  # "<0xE2>"
            byte_ids[b] = i
            vocab.append(bytes([b]))
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            vocab.append(_SPECIAL_PREFIX + piece.encode("utf-8"))
        else:
            vocab.append(piece.replace(_WORD_START, " ").encode("utf-8"))
    return vocab, byte_ids


@functools.lru_cache(maxsize=8)
def _tokenizer_info_cached(path: str, mtime_ns: int) -> TokenizerInfo:
    sp = spm.SentencePieceProcessor(model_file=path)
    vocab, byte_ids = _piece_bytes(sp)
    encoder = _Encoder(_plain_encoder(sp.serialized_model_proto()), byte_ids, vocab)
    if encoder.eos_token_id < 0:
        raise ConstraintError(f"{path}: the tokenizer has no EOS piece; constrained decoding needs one")
    ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(encoder))
    return TokenizerInfo(ll_tokenizer=ll, vocab_size=sp.vocab_size(), eos_id=sp.eos_id(), bos_id=sp.bos_id(),
                         space_byte_id=byte_ids.get(0x20), source=path)


def tokenizer_info(tokenizer: Union[Tokenizer, str, Path]) -> TokenizerInfo:
    """The llguidance view of a batchgen :class:`Tokenizer` (or a ``tokenizer.model`` path).

    Built once per file (about 0.3 s for LLaMA's 32,000 pieces) and cached.
    """
    path = Path(tokenizer.path if isinstance(tokenizer, Tokenizer) else tokenizer).resolve()
    return _tokenizer_info_cached(str(path), path.stat().st_mtime_ns)


@dataclass(frozen=True, eq=False)
class CompiledConstraint:
    """A constraint compiled for one tokenizer; shared by every request of a job."""

    kind: str
    value: Any  # the schema (a dict), the regex or the list of choices
    grammar: str  # llguidance's grammar text
    info: TokenizerInfo = field(repr=False)

    def new_state(self) -> "ConstraintState":
        """A fresh per-request state at the start of the completion."""
        return ConstraintState(self)


def _json_dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _normalize(kind: str, value: Any) -> tuple[str, str]:
    """(kind, canonical JSON of the value): the cache key, with the value's type checked."""
    if kind not in KINDS:
        raise ConstraintError(f"unknown constraint kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(value, Mapping):
            raise ConstraintError(f"json_schema must be a JSON object (a mapping), got {type(value).__name__}")
        try:
            return kind, _json_dumps(dict(value))
        except (TypeError, ValueError) as e:
            raise ConstraintError(f"json_schema is not JSON-serialisable: {e}") from None
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ConstraintError(f"regex must be a non-empty string, got {value!r}")
        return kind, json.dumps(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConstraintError(f"choice must be a non-empty list of strings, got {value!r}")
    for k, c in enumerate(value):
        if not isinstance(c, str) or not c:
            raise ConstraintError(f"choice[{k}] must be a non-empty string, got {c!r}")
    return kind, json.dumps(list(value), ensure_ascii=False)


def _lark(kind: str, value: Any) -> str:
    """The grammar, as llguidance's Lark dialect, with the optional leading word-start space."""
    if kind == "json_schema":
        # Free whitespace off unless the schema's own x-guidance options say otherwise.
        opts = {"whitespace_flexible": False, **value.get("x-guidance", {})}
        body = "%json " + _json_dumps({**value, "x-guidance": opts})
    elif kind == "regex":
        body = "/" + llguidance.regex_to_lark(value, use_ascii="dws") + "/"
    else:
        body = "(" + " | ".join(json.dumps(c, ensure_ascii=False) for c in value) + ")"
    return f'start: " "? body\nbody: {body}\n'


def _engine_message(message: str) -> str:
    """llguidance's message without the excerpt of our wrapper grammar and its position in it."""
    message = re.split(r"\n\s*\d+ \| ", message, maxsplit=1)[0]
    message = re.sub(r"^at \d+\(\d+\): ", "", message.strip())
    return message.replace("failed to compile JSON schema: ", "").strip() or "unknown error"


def _grammar(kind: str, key: str, info: Optional[TokenizerInfo]) -> tuple[Any, str]:
    """(value, llguidance grammar) of a normalised constraint; ConstraintError if it cannot compile."""
    value = json.loads(key)
    what = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice list"}[kind]
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(_lark(kind, value))
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, info.ll_tokenizer if info is not None else None)
    except (ValueError, RuntimeError) as e:
        raise ConstraintError(f"cannot compile the {what}: {_engine_message(str(e))}") from None
    if is_error:
        raise ConstraintError(f"cannot compile the {what}: {_engine_message(messages[0] if messages else '')}")
    if messages:
        # A warning means part of the constraint would be ignored (an unknown "format", say):
        # completions could then violate it, so refuse rather than promise conformance.
        raise ConstraintError(f"the {what} uses features the grammar engine would ignore: "
                              + "; ".join(_engine_message(m) for m in messages))
    return value, grammar


@functools.lru_cache(maxsize=256)
def _compile_cached(kind: str, key: str, info: TokenizerInfo) -> CompiledConstraint:
    value, grammar = _grammar(kind, key, info)
    return CompiledConstraint(kind=kind, value=value, grammar=grammar, info=info)


def check_constraint(kind: ConstraintKind, value: Any) -> None:
    """Raise :class:`ConstraintError` if the grammar engine cannot compile the constraint.

    Needs no tokenizer: for a spec's ``validate``, which loads no model. :func:`compile_constraint`
    gives the same verdict (it runs the same checks, with the tokenizer).
    """
    k, key = _normalize(kind, value)
    _grammar(k, key, None)


def compile_constraint(kind: ConstraintKind, value: Any, tokenizer_info: TokenizerInfo) -> CompiledConstraint:
    """Compile a constraint for a tokenizer, once per distinct content (cached).

    ``kind`` is ``json_schema`` (``value``: a mapping, or its JSON text), ``regex`` (a string, to
    match the whole completion) or ``choice`` (a non-empty list of non-empty strings). Raises
    :class:`ConstraintError` with the grammar engine's reason when it cannot compile the value,
    including when it would silently ignore part of a schema.
    """
    k, key = _normalize(kind, value)
    return _compile_cached(k, key, tokenizer_info)


def incomplete_message(kind: str) -> str:
    """The ``error`` of a constrained row that ``max_tokens`` cut before its output was complete."""
    what = {"json_schema": "the JSON document", "regex": "the text matching the regex",
            "choice": "the choice"}.get(kind, "the constrained output")
    return f"max_tokens reached before {what} was complete: the completion is incomplete and does not conform"


def _word_bit(token_id: int) -> tuple[int, int]:
    """(word, bit value as a signed int32) of a token in a bitmask row: bit 31 is negative."""
    w, b = divmod(token_id, 32)
    bit = 1 << b
    return w, bit - (1 << 32) if bit >= 1 << 31 else bit


class ConstraintState:
    """One request's progress through a :class:`CompiledConstraint`.

    Per step: :meth:`fill_mask` before sampling, :meth:`accept` with the sampled token after.
    """

    def __init__(self, constraint: CompiledConstraint) -> None:
        self.constraint = constraint
        self._matcher = llguidance.LLMatcher(constraint.info.ll_tokenizer, constraint.grammar, log_level=0)
        self._n_accepted = 0
        if self._matcher.is_error():
            raise ConstraintError(f"cannot start the constraint: {self._matcher.get_error()}")

    @property
    def matcher(self) -> Any:
        """The underlying ``llguidance.LLMatcher`` (for batch helpers)."""
        return self._matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 CPU, :attr:`TokenizerInfo.mask_words`
        words; bit ``t % 32`` of word ``t // 32`` is token ``t``).

        In an error state only EOS is allowed, so that sampling stays defined; :attr:`error` says why.
        """
        info = self.constraint.info
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2:
            raise ValueError("bitmask must be a 2-D int32 CPU tensor")
        if bitmask.shape[1] != info.mask_words:
            raise ValueError(f"bitmask rows must have {info.mask_words} words, got {bitmask.shape[1]}")
        target = bitmask[row]
        if self._matcher.is_error():
            self._only_eos(target)
            return
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), info.mask_words * 4)
        self._after_fill(target)

    def _after_fill(self, target: torch.Tensor) -> None:
        """Rules on top of the grammar, applied after llguidance wrote ``target``."""
        info = self.constraint.info
        if self._n_accepted == 0 and info.space_byte_id is not None:
            # A leading space is allowed only as the first piece's "▁" (dropped from the completion
            # text); the byte piece <0x20> would stay in the text and break the match.
            w, bit = _word_bit(info.space_byte_id)
            target[w] &= ~bit
        if self._matcher.is_error():
            self._only_eos(target)

    def _only_eos(self, target: torch.Tensor) -> None:
        target.zero_()
        w, bit = _word_bit(self.constraint.info.eos_id)
        target[w] = bit

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False (and an error state) if the constraint forbids it."""
        ok = bool(self._matcher.consume_token(int(token_id)))
        if ok:
            self._n_accepted += 1
        return ok

    def is_terminated(self) -> bool:
        """The output cannot go on: finished (only EOS could follow), EOS taken, or an error."""
        return bool(self._matcher.is_stopped())

    def is_complete(self) -> bool:
        """The text so far is a finished, valid document / regex match / choice (EOS allowed now)."""
        return bool(self._matcher.is_accepting()) and not self._matcher.is_error()

    @property
    def error(self) -> Optional[str]:
        """Why the state is in error (a forbidden token was accepted, an engine limit), else None."""
        return (self._matcher.get_error() or "constraint error") if self._matcher.is_error() else None

    def length_error(self) -> Optional[str]:
        """The ``error`` for a row cut by ``max_tokens`` now: None when its output is already complete."""
        return None if self.is_complete() else incomplete_message(self.constraint.kind)


def allocate_bitmask(batch: int, info: TokenizerInfo) -> torch.Tensor:
    """A zeroed int32 bitmask [batch, words] on the CPU."""
    return torch.zeros(batch, info.mask_words, dtype=torch.int32)


_BITS_CACHE: dict[tuple[torch.device, bool], torch.Tensor] = {}


def _byte_bits(device: torch.device, value: bool) -> torch.Tensor:
    """Bool [256, 8]: whether each bit of each byte value (least significant first) equals ``value``."""
    t = _BITS_CACHE.get((device, value))
    if t is None:
        bits = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()
        t = _BITS_CACHE[(device, value)] = (bits if value else ~bits).to(device)
    return t


def _unpack(bitmask: torch.Tensor, value: bool) -> torch.Tensor:
    """Bool [rows, 32 * words]: bit t of each row equals ``value``."""
    # A byte -> 8 bools table lookup: several times faster on CPU than shifting each int32 32 ways.
    # Viewing int32 as bytes relies on a little-endian host, as llguidance's own masks do.
    as_bytes = bitmask.contiguous().view(torch.uint8).reshape(-1).int()
    return torch.index_select(_byte_bits(bitmask.device, value), 0, as_bytes).view(bitmask.shape[0], -1)


def unpack_bitmask(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """Bool [rows, width]: token ``t`` allowed. Tokens past the mask's vocabulary are not allowed."""
    allowed = _unpack(bitmask, True)
    n = allowed.shape[1]
    if width <= n:
        return allowed[:, :width]
    pad = torch.zeros(allowed.shape[0], width - n, dtype=torch.bool, device=bitmask.device)
    return torch.cat([allowed, pad], dim=1)


def apply_masks(logits: torch.Tensor, states: Sequence[Optional[ConstraintState]],
                executor: Optional[Any] = None) -> None:
    """Set to -inf, in place, the logits [B, V] of tokens each constrained row may not take next.

    ``states[i]`` is row ``i``'s state, or None for an unconstrained row, whose logits are not
    touched. ``V`` may exceed the tokenizer's vocabulary (a padded output layer): the extra columns
    are masked. With an ``llguidance.LLExecutor`` the rows' masks are computed on its threads.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [B, V] with B = len(states) = {len(states)}, got {tuple(logits.shape)}")
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    live: list[ConstraintState] = [states[i] for i in rows]  # type: ignore[misc]
    info = live[0].constraint.info
    if any(s.constraint.info is not info for s in live):
        raise ValueError("all constrained rows of a batch must share one tokenizer")
    bitmask = allocate_bitmask(len(rows), info)
    if executor is not None:
        executor.unsafe_compute_mask_ptr([(s.matcher, k) for k, s in enumerate(live) if not s.matcher.is_error()],
                                         bitmask.data_ptr(), info.mask_words * 4, len(rows))
        for k, s in enumerate(live):
            s._after_fill(bitmask[k])  # also: an error state allows EOS only
    else:
        for k, s in enumerate(live):
            s.fill_mask(bitmask, k)
    V = logits.shape[1]
    n = min(V, info.vocab_size)
    blocked = _unpack(bitmask.to(logits.device, non_blocking=True), False)[:, :n]
    # In place, row views only: an unconstrained row is never read or written.
    if len(rows) == logits.shape[0]:
        logits[:, :n].masked_fill_(blocked, float("-inf"))
        logits[:, n:] = float("-inf")  # columns past the tokenizer's vocabulary (a padded head)
    else:
        for k, i in enumerate(rows):
            logits[i, :n].masked_fill_(blocked[k], float("-inf"))
            logits[i, n:] = float("-inf")
