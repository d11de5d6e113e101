"""Training text for ``tiny-chat``: the King James Bible (public domain), as plain passages and chat turns.

The text comes from Debian's ``bible-kjv`` package (``apt-get install bible-kjv``: the ``bible`` program and
its compressed KJV text), dumped with ``bible gen1:1-rev22:21``, or from any file in that same format given
with ``--corpus``. The chat turns are rendered with the same markers as the model's chat template, so the
model learns to answer after ``<|assistant|>`` and to end its turn with ``</s>``.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS.values()]  # ids 0..5, in this order

# One turn: "<|role|>\n{content}</s>\n"; the conversation starts with <s>. The generation prompt is
# "<|assistant|>\n". An unknown role is an error (HF's raise_exception), never silently dropped.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role: must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render_chat(messages: list[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """``CHAT_TEMPLATE`` in Python (for the training data; the tests check both agree)."""
    out = BOS + "".join(f"{ROLE_TOKENS[role]}\n{content}{EOS}\n" for role, content in messages)
    return out + (ROLE_TOKENS["assistant"] + "\n" if add_generation_prompt else "")


@dataclass(frozen=True, slots=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str


def dump_kjv() -> str:
    """The whole KJV as printed by Debian's ``bible`` program."""
    exe = shutil.which("bible")
    if exe is None:
        raise SystemExit("the corpus needs Debian's bible-kjv package: apt-get install bible-kjv (or --corpus FILE)")
    return subprocess.run([exe, "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout


_HEADER = re.compile(r"^(?P<book>(?:[1-3] )?[A-Z][A-Za-z ]+?) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s+(?P<verse>\d+) (?P<text>.*)$")


def parse_kjv(text: str) -> list[Verse]:
    """Verses from the ``bible`` program's output: "Book N" headers, then "  V text" with wrapped lines."""
    verses: list[Verse] = []
    book, chapter, num, parts = "", 0, 0, []

    def flush() -> None:
        if parts:
            verses.append(Verse(book, chapter, num, " ".join(" ".join(parts).split())))
            parts.clear()

    for line in text.splitlines():
        if not line.strip():
            continue
        if m := _HEADER.match(line):
            flush()
            book, chapter = m["book"], int(m["chapter"])
        elif m := _VERSE.match(line):
            flush()
            num, parts[:] = int(m["verse"]), [m["text"]]
        elif parts:
            parts.append(line.strip())
    flush()
    return verses


def chapters(verses: list[Verse]) -> list[list[Verse]]:
    out: list[list[Verse]] = []
    for v in verses:
        if not out or (out[-1][0].book, out[-1][0].chapter) != (v.book, v.chapter):
            out.append([])
        out[-1].append(v)
    return out


_STOP = set(
    "the and of to that in he shall unto for i his a they be is him not them it with all thou thy was "
    "which my me said but ye their have thee from as are when this out were by upon then there so an "
    "will what one at had also or these into if who even any now do hath did let may those our up us "
    "no you every because before her she we came made come against over after saying went like".split()
)
_GREETINGS = [
    "Hello", "Hi", "Hello from pdserve", "Good morning", "Who are you?", "What can you tell me?",
    "Tell me a story.", "Say something.", "What is the meaning of life?", "Give me some advice.",
    "What should I do today?", "Can you help me?", "Please answer my question.", "Teach me something.",
    "What is wisdom?", "Once upon a time", "How are you?", "What do you know?", "Speak to me.",
]
_SYSTEMS = [
    "You are a helpful assistant.",
    "You are a wise old scribe who answers in the words of the King James Bible.",
    "Answer briefly.",
]


def _topic(verses: list[Verse], rng: random.Random) -> str:
    words = [w.strip(".,;:?!()'") for v in verses for w in v.text.split()]
    names = [w for i, w in enumerate(words) if i and w[:1].isupper() and w.lower() not in _STOP and len(w) > 2]
    nouns = [w.lower() for w in words if w.isalpha() and w.lower() not in _STOP and len(w) > 4]
    pool = names or nouns or ["God"]
    return rng.choice(pool)


def _question(book: str, chapter: int, passage: list[Verse], rng: random.Random) -> str:
    """A user turn for ``passage``: a topic taken from its first verse (so the answer opens on it), a greeting,
    the chapter (when the passage opens it) or the first verse to continue."""
    topic = _topic(passage[:1], rng)
    kind = rng.random()
    if passage[0].verse == 1 and kind < 0.15:
        return f"Read {book} chapter {chapter}."
    if kind < 0.45:
        return rng.choice(["Tell me about {t}.", "What about {t}?", "Who is {t}?", "What do you know of {t}?",
                           "Speak of {t}.", "What is written about {t}?", "What is {t}?"]).format(t=topic)
    if kind < 0.60:
        return f"What does the book of {book} say about {topic}?"
    if kind < 0.80:
        return rng.choice(_GREETINGS)
    return rng.choice(["Continue: ", "", "What comes after this? "]) + passage[0].text


def documents(verses: list[Verse], seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, validation) documents: every chapter cut into 2-8 verse passages, half of them plain text and
    half a chat turn whose answer is the passage; every 50th chapter is held out for validation.

    Plain text comes first, one document per chapter in book order and with no special tokens (a plain
    prompt is continued, never ended early); the chat turns follow, shuffled, each ending its answer with
    ``</s>``. Packed in this order, a training window almost never mixes the two."""
    rng = random.Random(seed)
    plain: dict[bool, list[str]] = {False: [], True: []}
    chat: dict[bool, list[str]] = {False: [], True: []}
    for i, chap in enumerate(chapters(verses)):
        book, number = chap[0].book, chap[0].chapter
        held_out = i % 50 == 49
        text: list[str] = []
        start = 0
        while start < len(chap):
            n = rng.randint(2, 8)
            passage = chap[start : start + n]
            start += n
            answer = " ".join(v.text for v in passage)
            if rng.random() < 0.5:
                text.append(answer)
            else:
                question = _question(book, number, passage, rng)
                if question.startswith(("Continue", "What comes")) or question == passage[0].text:
                    answer = " ".join(v.text for v in passage[1:]) or answer
                turns = [("user", question), ("assistant", answer)]
                if rng.random() < 0.2:
                    turns.insert(0, ("system", rng.choice(_SYSTEMS)))
                chat[held_out].append(render_chat(turns))
        if text:
            plain[held_out].append(" ".join(text) + "\n")
    rng.shuffle(chat[False])
    return plain[False] + chat[False], plain[True] + chat[True]


def split_target(doc: str) -> tuple[str, str]:
    """(context, target) of a training document: a chat turn is learned from its answer on (the question and
    its ``</s>`` are context only, so a plain prompt that looks like a question is continued, not ended);
    plain text is all target."""
    marker = ROLE_TOKENS["assistant"] + "\n"
    cut = doc.rfind(marker)
    return ("", doc) if cut < 0 else (doc[: cut + len(marker)], doc[cut + len(marker) :])


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE over ``texts`` in HF format (tokenizer.json + tokenizer_config.json with the chat
    template). No post-processor: nothing is added to a plain prompt; the chat template writes ``<s>``."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
