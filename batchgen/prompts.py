"""Prompt formats: Llama-2-chat conversations and instruction-template presets.

Pure text and token-id logic (no ray, no pyarrow, no torch), shared by the tokenizer, the pipeline
and the CLI.

Chat. A conversation is an OpenAI-style list of ``{"role", "content"}`` messages: an optional
``system`` message first, then ``user`` and ``assistant`` alternating, ending with ``user``. It is
rendered exactly as Meta's ``Llama.chat_completion`` (llama/generation.py) renders a dialog:

* the system message is folded into the first user turn as ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}``
  (the raw texts are concatenated; only the merged turn as a whole is stripped);
* every answered turn is the text ``[INST] {user.strip()} [/INST] {answer.strip()} `` encoded on its
  own with BOS and EOS;
* the final user turn is ``[INST] {user.strip()} [/INST]`` with BOS and no EOS;
* the pieces' token ids are concatenated (never the texts: SentencePiece would tokenise the joins
  differently).

Meta's reference refuses any content holding ``[INST]``, ``[/INST]``, ``<<SYS>>`` or ``<</SYS>>`` (it
answers with an error instead of generating); here such a conversation raises :class:`PromptError`
naming the marker, so that a row can never forge turns of its own.

Presets. ``input.template`` may name a preset instead of spelling out a template: see
:data:`PRESETS` and :func:`render_preset`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

# Llama-2-chat markers, exactly as in Meta's llama/generation.py.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
#: What Meta's reference refuses inside any message (its SPECIAL_TAGS).
CHAT_MARKERS: tuple[str, ...] = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES: tuple[str, ...] = ("system", "user", "assistant")

Message = Mapping[str, Any]
#: What a preset renders: plain prompt text, or a conversation for the chat format.
Rendered = Union[str, list[dict[str, str]]]


class PromptError(ValueError):
    """A conversation or prompt that cannot be rendered; the message names the turn and the problem."""


class _Encoder(Protocol):
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


# --------------------------------------------------------------------------------------- chat

def find_marker(text: str) -> Optional[str]:
    """The first Llama-2-chat marker (of :data:`CHAT_MARKERS`) that ``text`` contains, or None."""
    hits = [(text.find(m), m) for m in CHAT_MARKERS if m in text]
    return min(hits)[1] if hits else None


def check_no_marker(text: str, where: str) -> None:
    """Raise :class:`PromptError` when ``text`` (described by ``where``) holds a chat marker."""
    marker = find_marker(text)
    if marker is not None:
        raise PromptError(f"{where} contains the Llama-2-chat marker {marker!r}, which chat prompts may not "
                          "hold (Meta's reference refuses it too)")


def chat_turns(messages: Sequence[Message]) -> list[str]:
    """Validate a conversation; return the contents of its user/assistant turns, system folded in.

    The result alternates user, assistant, ..., user (odd length). Every problem raises
    :class:`PromptError` naming the message index: not a list, empty, a message that is not a
    ``{role, content}`` mapping, an unknown role, a non-string or empty (whitespace-only) content,
    a chat marker inside a content, roles out of order, or a conversation that ends with
    ``assistant``.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise PromptError("messages is empty: a chat needs at least one user message")
    roles: list[str] = []
    contents: list[str] = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PromptError(f"messages[{k}] must be a dict with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role is None or content is None:
            raise PromptError(f"messages[{k}].{'role' if role is None else 'content'} is null")
        if role not in ROLES:
            raise PromptError(f"messages[{k}].role is {role!r}: unknown role (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise PromptError(f"messages[{k}].content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise PromptError(f"messages[{k}].content is empty ({role} message)")
        check_no_marker(content, f"messages[{k}].content ({role})")
        roles.append(role)
        contents.append(content)
    offset = 0
    if roles[0] == "system":
        if len(roles) < 2 or roles[1] != "user":
            raise PromptError("messages[1]: a system message must be followed by a user message")
        # Meta concatenates the raw system text; only the merged turn as a whole is stripped later.
        contents = [B_SYS + contents[0] + E_SYS + contents[1]] + contents[2:]
        roles, offset = roles[1:], 1
    for k, role in enumerate(roles):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise PromptError(
                f"messages[{k + offset}].role is {role!r}, expected {expected!r}: roles must be an optional "
                "'system' first, then 'user' and 'assistant' alternating, ending with 'user'"
            )
    if roles[-1] != "user":
        raise PromptError(f"messages[{len(messages) - 1}]: the last message must be from 'user', not 'assistant'")
    return contents


def chat_segments(messages: Sequence[Message]) -> list[tuple[str, bool, bool]]:
    """The conversation as Meta encodes it: ``(text, bos, eos)`` pieces, each encoded on its own."""
    turns = chat_turns(messages)
    segments = [(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", True, True)
                for user, answer in zip(turns[:-1:2], turns[1::2])]
    segments.append((f"{B_INST} {turns[-1].strip()} {E_INST}", True, False))
    return segments


def encode_chat(tokenizer: _Encoder, messages: Sequence[Message]) -> list[int]:
    """Token ids of a Llama-2-chat conversation, exactly as Meta's ``chat_completion`` builds them.

    ``tokenizer`` is anything with Meta's ``encode(text, bos, eos)`` (:class:`batchgen.tokenizer.Tokenizer`).

    Raises:
        PromptError: a malformed conversation (see :func:`chat_turns`).
    """
    ids: list[int] = []
    for text, bos, eos in chat_segments(messages):
        ids += tokenizer.encode(text, bos=bos, eos=eos)
    return ids


def render_chat_text(messages: Sequence[Message]) -> str:
    """The conversation's rendering as readable text, with ``<s>``/``</s>`` where BOS/EOS ids go.

    For showing and for substring checks only: encode with :func:`encode_chat`, never this text.
    """
    return "".join(("<s>" if bos else "") + text + ("</s>" if eos else "")
                   for text, bos, eos in chat_segments(messages))


def single_turn(user: str, system: Optional[str] = None) -> list[dict[str, str]]:
    """The conversation of one user message, with ``system`` first when given."""
    head = [] if system is None else [{"role": "system", "content": system}]
    return head + [{"role": "user", "content": user}]


# --------------------------------------------------------------------------------------- presets

# The Stanford Alpaca instruction format, as tatsu-lab/stanford_alpaca's train.py (PROMPT_DICT) defines it.
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def render_alpaca(instruction: str, input: Optional[str] = None) -> str:
    """The Alpaca prompt: the with-input form, or the no-input form when ``input`` is None or ``""``.

    As Alpaca's own code decides (``example.get("input", "") != ""``): only an empty input picks the
    no-input form; a whitespace-only input is still an input. Cells are inserted verbatim (no
    ``str.format`` of row text, so braces in a cell are plain characters).
    """
    if input is None or input == "":
        return ALPACA_NO_INPUT.replace("{instruction}", instruction)
    head, _, tail = ALPACA_INPUT.partition("{instruction}")
    middle, _, end = tail.partition("{input}")
    return head + instruction + middle + input + end


@dataclass(frozen=True)
class Preset:
    """A named prompt format; its *slots* are filled from columns (``input.template_columns``).

    ``columns`` maps every slot to its default column (None: the slot is unused unless mapped);
    ``required`` slots must have a non-empty cell in every row, optional ones may be null.
    """

    name: str
    description: str
    columns: Mapping[str, Optional[str]]
    required: tuple[str, ...]
    chat: bool = False  # renders a conversation (the chat rules apply)
    optional: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "optional", tuple(s for s in self.columns if s not in self.required))


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("alpaca", "Stanford Alpaca: the with-input form, or the no-input form where input is null or ''",
               {"instruction": "instruction", "input": "input"}, required=("instruction",)),
        Preset("llama-2-chat", "one Llama-2-chat user turn, with an optional system message per row "
                               "(else input.system)",
               {"prompt": "prompt", "system": None}, required=("prompt",), chat=True),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        PromptError: unknown name; the message lists the known presets.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise PromptError(f"unknown template preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def render_preset(name: str, values: Mapping[str, Optional[str]], system: Optional[str] = None) -> Rendered:
    """Render one row with preset ``name``: Alpaca text, or a one-turn conversation for ``llama-2-chat``.

    ``values`` maps slots to cell texts (None or missing: null or unmapped). ``system`` is the
    default system message of chat presets.

    Raises:
        PromptError: a required slot is null or empty, or (chat presets) a cell holds a chat marker.
    """
    preset = get_preset(name)
    for slot in preset.required:
        value = values.get(slot)
        if value is None or not value.strip():
            raise PromptError(f"the preset's {slot!r} is {'null' if value is None else 'empty'}")
    if name == "alpaca":
        return render_alpaca(values["instruction"], values.get("input"))  # type: ignore[arg-type]
    row_system = values.get("system")
    messages = single_turn(values["prompt"],  # type: ignore[arg-type]
                           row_system if row_system is not None and row_system.strip() else system)
    chat_turns(messages)  # markers, empty system
    return messages


def parse_template(template: str) -> list[tuple[str, str | None]]:
    """Split a prompt template into ``(literal_text, column_or_None)`` parts.

    Only plain ``{column}`` placeholders are accepted (``{{``/``}}`` are literal braces); attribute
    or index access, positional fields, ``!r`` conversions and format specs are rejected, because
    rendering is a plain concatenation and must never reach into Python objects.

    Raises:
        ValueError: with a message naming the offending placeholder.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # unbalanced braces
        raise ValueError(f"malformed template: {exc} (write literal braces as '{{{{' and '}}}}')") from None
    parts: list[tuple[str, str | None]] = []
    pending = ""  # Formatter splits literal text at every '{{', so join the pieces back up
    for literal, field, spec, conversion in parsed:
        pending += literal
        if field is None:
            continue
        shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not field.isidentifier():
            raise ValueError(f"placeholder {shown} is not a plain column name; use {{column}} with a "
                             "column whose name is a Python identifier")
        if conversion or spec:
            raise ValueError(f"placeholder {shown} has a conversion or format spec; only {{{field}}} is allowed")
        parts.append((pending, field))
        pending = ""
    if pending:
        parts.append((pending, None))
    if not any(field for _, field in parts):
        raise ValueError("template has no {column} placeholders, so every row would get the same prompt")
    return parts
