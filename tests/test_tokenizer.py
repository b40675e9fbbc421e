"""Tests of batchgen.tokenizer against the real LLaMA SentencePiece model in ../shared."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from batchgen.tokenizer import IncrementalDecoder, StopStringMatcher, Tokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "llama" / "tokenizer.model"

BYTE = {b: 3 + b for b in range(256)}  # LLaMA's byte-fallback pieces <0x00>..<0xFF> are ids 3..258
A, SP_A, SP_B, SPACE = 29874, 263, 289, 29871  # pieces "a", "▁a", "▁b", "▁"

TEXTS = [
    "Hello world",
    "Grüße aus Köln: Ärger, Öl, Übermaß und ß.",
    "我们在北京吃了烤鸭，味道很好。",
    "東京でラーメンを食べました。カタカナとひらがな",
    "مرحبا بالعالم، كيف حالك؟",
    "Привет, мир! Съешь же ещё этих мягких булок.",
    "emoji 😀 family 👩‍👩‍👧 flag 🇩🇪 thumbs 👍🏽 end",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u093f",
    "  two leading spaces, trailing   ",
    "multiple   inner    spaces",
    "new\nlines\n\n\nand\ttabs\t\tand \r\n windows",
    " ",
    "\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip(f"real LLaMA tokenizer not found at {LLAMA_TOKENIZER} (../shared is absent)")
    return Tokenizer(LLAMA_TOKENIZER)


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> tuple[list[str], str]:
    """Chunks returned by add() for each id, and the final text after finish()."""
    dec = IncrementalDecoder(tok, prompt_ids)
    chunks = [dec.add(i) for i in ids]
    chunks.append(dec.finish())
    assert dec.text == "".join(chunks)
    return chunks, dec.text


# ---------------------------------------------------------------------------------------- basics


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, -1)


def test_known_ids_and_pieces(tok: Tokenizer) -> None:
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("Hello world", bos=False) == [15043, 3186]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 15043, BYTE[0xE2])] == ["<unk>", "<s>", "</s>", "▁Hello", "<0xE2>"]
    assert tok.decode([1, 15043, 3186, 2]) == "Hello world"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_round_trip_texts_exercise_byte_fallback(tok: Tokenizer) -> None:
    # The emoji text must go through byte pieces, or the round trips above would not cover them.
    ids = tok.encode(TEXTS[6], bos=False)
    assert sum(1 for i in ids if 3 <= i <= 258) >= 8


def test_bad_ids_are_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"ids\[1\] 32000 is outside the vocabulary"):
        tok.decode([15043, 32000])
    with pytest.raises(ValueError, match="-1 is outside"):
        tok.id_to_piece(-1)
    with pytest.raises(TypeError, match="integer"):
        tok.decode([1.0])
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ chat format


def test_chat_system_and_user(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": "  What is 2+2? \n"},
    ]
    ids = tok.encode_chat(messages)
    # Meta strips the merged turn as a whole, so the system text's trailing space stays inside.
    expected = tok.encode("[INST] <<SYS>>\nBe brief. \n<</SYS>>\n\n  What is 2+2? [/INST]", bos=True, eos=False)
    assert ids == expected
    assert ids[0] == 1 and 2 not in ids
    assert ids[1:4] == tok.encode("[INST]", bos=False) == [518, 25580, 29962]
    assert tok.decode(ids) == "[INST] <<SYS>>\nBe brief. \n<</SYS>>\n\n  What is 2+2? [/INST]"
    assert tok.encode_chat_prompt("  What is 2+2? \n", system="Be brief. ") == ids


def test_chat_multi_turn(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another? "},
    ]
    expected = (
        tok.encode("[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! ", bos=True, eos=True)
        + tok.encode("[INST] Name a colour. [/INST] Blue. ", bos=True, eos=True)
        + tok.encode("[INST] Another? [/INST]", bos=True, eos=False)
    )
    ids = tok.encode_chat(messages)
    assert ids == expected
    assert ids.count(1) == 3 and ids.count(2) == 2 and ids[-1] != 2
    # Without a system message the first turn is plain.
    assert tok.encode_chat(messages[1:])[:8] == tok.encode("[INST] Hi [/INST] Hello! ", bos=True)[:8]
    assert tok.encode_chat_prompt("Hi") == tok.encode("[INST] Hi [/INST]")


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "empty"),
        ([{"role": "system", "content": "s"}], "followed by a user"),
        ([{"role": "assistant", "content": "a"}], r"messages\[0\].role is 'assistant', expected 'user'"),
        ([{"role": "user", "content": "u"}, {"role": "user", "content": "u"}], r"messages\[1\].role is 'user'"),
        ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "last message must be from 'user'"),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "system", "content": "s"}],
            r"messages\[2\].role is 'system', expected 'assistant'",
        ),
        ([{"role": "user"}], r"messages\[0\] must be a dict with 'role' and 'content'"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
    ],
)
def test_chat_rejects_bad_dialogs(tok: Tokenizer, messages: list[dict], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        tok.encode_chat(messages)


# --------------------------------------------------------------------------- incremental decoding


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_decode_and_never_emits_half_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    chunks, final = stream(tok, ids)
    assert final == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("text", [TEXTS[2], TEXTS[3], TEXTS[6], "👩‍👩‍👧👩‍👩‍👧 🇯🇵"])
def test_every_prefix_of_emoji_and_cjk_streams_to_its_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=False)
    full = tok.decode(ids)
    for k in range(len(ids) + 1):
        dec = IncrementalDecoder(tok)
        for i in ids[:k]:
            dec.add(i)
        # Before finish() only whole characters are out, so the text is a prefix of the full decode.
        assert "\ufffd" not in dec.text and full.startswith(dec.text), k
        dec.finish()
        assert dec.text == tok.decode(ids[:k]), k


def test_multibyte_character_is_held_until_complete(tok: Tokenizer) -> None:
    dec = IncrementalDecoder(tok)
    assert [dec.add(i) for i in (SP_A, BYTE[0xE2], BYTE[0x80], BYTE[0x94], SP_B)] == ["a", "", "", "—", " b"]
    # Generation cut off mid-character: finish() gives what decode() gives, one U+FFFD per byte.
    dec = IncrementalDecoder(tok)
    assert [dec.add(i) for i in (BYTE[0xF0], BYTE[0x9F])] == ["", ""]
    assert dec.finish() == "\ufffd\ufffd" == tok.decode([BYTE[0xF0], BYTE[0x9F]])
    with pytest.raises(RuntimeError, match="after finish"):
        dec.add(SP_A)


@pytest.mark.parametrize(
    "ids",
    [
        [SP_B],  # the first piece's "▁" is dropped ...
        [1, 2, SP_B],  # ... also after control tokens, which are not visible text
        [SP_A, 2, SP_B],  # but not after visible text, even with a control token in between
        [SP_A, 2, 2, 1, SP_B],
        [BYTE[0xE2], SP_B],  # a byte piece is visible text
        [0, SP_B],  # so is <unk>
        [SPACE, SPACE, SP_A],
        [BYTE[0xE2], 2, BYTE[0x80], BYTE[0x94]],  # a control token ends a byte run
    ],
)
def test_leading_space_and_control_token_rules(tok: Tokenizer, ids: list[int]) -> None:
    assert stream(tok, ids)[1] == tok.decode(ids)


def test_random_id_sequences_stream_to_their_decode(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    byte_ids = list(range(3, 259))
    for n in range(3000):
        choosers = [
            lambda: rng.choice(byte_ids),  # any byte, so mostly invalid UTF-8
            lambda: rng.randrange(0, 3),  # <unk>, <s>, </s>
            lambda: rng.randrange(tok.vocab_size),
            lambda: rng.choice([BYTE[0xE2], BYTE[0x80], BYTE[0x94], BYTE[0xF0], BYTE[0x9F], SPACE, SP_B, A]),
        ]
        ids = [rng.choice(choosers)() for _ in range(rng.randint(1, 16))]
        if n % 3 == 0:
            rng.shuffle(byte_ids)
            ids = byte_ids[:16] + ids  # byte pieces in a random order
        assert stream(tok, ids)[1] == tok.decode(ids), ids


def test_prompt_context_keeps_the_continuation_space(tok: Tokenizer) -> None:
    prompt = tok.encode_chat_prompt("Say hello")
    completion = tok.encode("Hello there", bos=False)
    assert stream(tok, completion)[1] == "Hello there"
    assert stream(tok, completion, prompt_ids=prompt)[1] == " Hello there"
    assert stream(tok, completion, prompt_ids=[1])[1] == "Hello there"  # BOS alone is no visible text
    # A prompt that ends mid-character: its unfinished bytes are decoded with the completion.
    assert stream(tok, [BYTE[0x94], SP_B], prompt_ids=[SP_A, BYTE[0xE2], BYTE[0x80]])[1] == "— b"


def test_random_sequences_with_prompt_context(tok: Tokenizer) -> None:
    rng = random.Random(99)
    pool = [BYTE[0xE2], BYTE[0x80], BYTE[0x94], BYTE[0xF0], BYTE[0x9F], 1, 2, 0, SPACE, SP_A, SP_B, A]
    for _ in range(2000):
        prompt = [rng.choice(pool) for _ in range(rng.randint(1, 5))]
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
        whole = tok.decode(prompt + ids)
        # The prompt text the completion continues: all of it, or all but an unfinished character.
        bases = [tok.decode(prompt[:j]) for j in range(len(prompt) - 3, len(prompt) + 1) if j >= 0]
        out = stream(tok, ids, prompt_ids=prompt)[1]
        assert any(whole == base + out for base in bases), (prompt, ids, out)


class _CountingDecoder:
    """The SentencePiece processor, recording how many ids each ``decode`` call is given."""

    def __init__(self, sp: object) -> None:
        self._sp, self.sizes = sp, []

    def decode(self, ids: list[int]) -> str:
        self.sizes.append(len(ids))
        return self._sp.decode(ids)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sp, name)


def test_streaming_decodes_a_bounded_window_per_token(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Re-decoding everything per token takes ~50 s on 45k ids (measured); a bounded window
    # ~0.3 s. What is checked is the window, not the time: speed belongs in the bench.
    ids = tok.encode(" ".join(TEXTS) * 240, bos=False)
    assert len(ids) > 45000
    counting = _CountingDecoder(tok._sp)
    monkeypatch.setattr(tok, "_sp", counting)
    final = stream(tok, ids)[1]
    monkeypatch.undo()
    assert counting.sizes and max(counting.sizes) <= 8, max(counting.sizes)
    assert final == tok.decode(ids)


def test_bad_token_id_is_rejected(tok: Tokenizer) -> None:
    dec = IncrementalDecoder(tok)
    with pytest.raises(ValueError, match="token id 40000 is outside the vocabulary"):
        dec.add(40000)


# ----------------------------------------------------------------------------------- stop strings


def test_stop_string_spanning_tokens_truncates_before_it(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is 4.\n\nUser: and 5?", bos=False)
    dec, stop = IncrementalDecoder(tok), StopStringMatcher(["\n\nUser:", "never"])
    chunks, cut = [], None
    for i in ids:
        chunk = dec.add(i)
        chunks.append(chunk)
        cut = stop.feed(chunk)
        if cut is not None:
            break
    assert not any("\n\nUser:" in c for c in chunks)  # the stop string really spans several tokens
    assert cut == len("The answer is 4.")
    assert stop.text == "The answer is 4." and stop.stop == "\n\nUser:" and stop.stopped
    with pytest.raises(RuntimeError, match="after stop string"):
        stop.feed("more")


def first_stop_cut(text: str, stops: list[str]) -> str:
    """Reference: read ``text`` one character at a time and cut at the first stop string completed."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(len(s) for s in done)]
    return text


def test_stop_strings_match_a_character_by_character_search() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        matcher, at = StopStringMatcher(stops), 0
        while at < len(text) and not matcher.stopped:
            step = rng.randint(0, 4)
            matcher.feed(text[at:at + step])
            at += step
        assert matcher.text == first_stop_cut(text, stops), (stops, text)


def test_stop_safe_text_holds_back_a_possible_stop_prefix() -> None:
    m = StopStringMatcher(["</end>"])
    assert m.feed("result </e") is None
    assert m.text == "result </e" and m.safe_text == "result "
    assert m.feed("nd> tail") == len("result ")
    assert m.safe_text == m.text == "result "


def test_stop_strings_are_validated() -> None:
    with pytest.raises(ValueError, match=r"stop\[1\] must be a non-empty string"):
        StopStringMatcher(["ok", ""])
    with pytest.raises(TypeError, match="list of strings"):
        StopStringMatcher("###")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- files


def test_missing_tokenizer_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=f"tokenizer file not found: {missing}"):
        Tokenizer(missing)


def test_file_that_is_not_a_sentencepiece_model(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_text('{"this": "is json"}')
    with pytest.raises(ValueError, match=f"{bad} is not a SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="is not a file"):
        Tokenizer(tmp_path)


def test_load_tokenizer(tmp_path: Path) -> None:
    assert load_tokenizer(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_tokenizer(tmp_path / "absent")
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip(f"real LLaMA tokenizer not found at {LLAMA_TOKENIZER} (../shared is absent)")
    shutil.copy(LLAMA_TOKENIZER, tmp_path / "tokenizer.model")
    loaded = load_tokenizer(tmp_path)
    assert loaded is not None and loaded.encode("Hello world") == [1, 15043, 3186]
