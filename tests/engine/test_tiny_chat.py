"""The default model ``tiny-chat``: shipped in the package, small, served like any Llama, and readable.

Readability is measured against ``data/english_words.txt`` (wamerican's dictionary words that occur in the
training text, shipped here so the test needs no Debian package): at least 90 % of the words of 20
completions must be dictionary words. The random ``tiny`` preset must fail the same check, so it measures
something.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.models import DEFAULT_MODEL, PRESETS, resolve_model, resolve_tokenizer
from pdserve.engine.presets import chat_corpus
from tests.engine.helpers import assert_idle, hf_greedy

WORDS_FILE = Path(__file__).parent / "data" / "english_words.txt"
MAX_WEIGHTS_BYTES = 25 * 1024 * 1024
PLAIN_PROMPTS = [
    "Hello from pdserve",
    "Once upon a time",
    "The king said",
    "In the morning",
    "And the people",
    "The meaning of life is",
    "My friend, listen",
    "The house of",
    "He went into the city and",
    "Tell me a story about a man who",
]
CHAT_PROMPTS = [
    "Hello",
    "Who are you?",
    "What is wisdom?",
    "Tell me about the sea.",
    "What should I do today?",
    "What is the capital of France?",
    "Give me some advice about money.",
    "Why is the sky blue?",
    "Tell me about Moses.",
    "What does the book of Psalms say about joy?",
]
READ = SamplingParams(max_tokens=48, temperature=0)


@pytest.fixture(scope="module")
def chat_llm():
    return LLM("tiny-chat", num_blocks=256)


@pytest.fixture(scope="module")
def dictionary() -> set[str]:
    lines = WORDS_FILE.read_text().splitlines()
    return {w for w in lines if w and not w.startswith("#")}


def chat_prompt(question: str) -> str:
    return chat_corpus.render_chat([("user", question)], add_generation_prompt=True)


def words_of(text: str) -> list[str]:
    """Whitespace-separated tokens that hold a letter, lower-cased, outer punctuation and 's stripped."""
    out = []
    for token in text.split():
        w = token.strip(string.punctuation + "“”‘’").lower()
        if not any(c.isalpha() for c in w):
            continue
        out.append(w[:-2] if w.endswith("'s") else w)
    return out


def dictionary_share(texts: list[str], dictionary: set[str]) -> tuple[float, int]:
    words = words_of(" ".join(texts))
    known = sum(all(p in dictionary for p in w.split("-")) and bool(re.fullmatch(r"[a-z-]+", w)) for w in words)
    return known / max(1, len(words)), len(words)


def test_is_the_default_and_ships_in_the_package():
    from pdserve.engine.config import EngineConfig
    from pdserve.router.server import RouterConfig

    assert DEFAULT_MODEL == "tiny-chat" and PRESETS["tiny-chat"].shipped
    assert EngineConfig().model == DEFAULT_MODEL and RouterConfig().model == DEFAULT_MODEL
    path, dummy = resolve_model("tiny-chat")
    assert not dummy and Path(path) == Path(__file__).resolve().parents[2] / "engine" / "presets" / "tiny-chat"
    assert resolve_tokenizer("tiny-chat") == path  # the router's torch-free path: no build, the same files
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert (Path(path) / name).is_file(), name


def test_weights_are_small_half_precision_llama():
    import json

    from safetensors import safe_open

    path = Path(resolve_model("tiny-chat")[0])
    assert (path / "model.safetensors").stat().st_size <= MAX_WEIGHTS_BYTES
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        num_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert dtypes == {"F16"}, dtypes
    assert 1_000_000 < num_params < 13_000_000, num_params


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_engine_loads_it_natively_in_float32_on_cpu(chat_llm):
    runner = chat_llm.engine.runner
    assert runner.model_impl == "native"
    assert runner.fingerprint.dtype == "float32" and runner.fingerprint.model_id == "tiny-chat"


def test_chat_template_renders_like_the_training_data():
    from transformers import AutoTokenizer

    from pdserve.router.chat import ChatTemplate

    path = resolve_tokenizer("tiny-chat")
    hf = AutoTokenizer.from_pretrained(path)
    router = ChatTemplate.load(path)
    assert router is not None
    messages = [("system", "Answer briefly."), ("user", "Who is Moses?"), ("assistant", "A prophet."),
                ("user", "Tell me more.")]
    as_dicts = [{"role": r, "content": c} for r, c in messages]
    want = chat_corpus.render_chat(messages, add_generation_prompt=True)
    assert want == ("<s><|system|>\nAnswer briefly.</s>\n<|user|>\nWho is Moses?</s>\n<|assistant|>\nA prophet.</s>\n"
                    "<|user|>\nTell me more.</s>\n<|assistant|>\n")
    assert hf.apply_chat_template(as_dicts, tokenize=False, add_generation_prompt=True) == want
    assert router.render(as_dicts) == want
    assert hf.apply_chat_template(as_dicts[:2], tokenize=False) == chat_corpus.render_chat(messages[:2])
    ids = hf.apply_chat_template(as_dicts, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == hf.encode(want, add_special_tokens=False)
    assert ids[0] == hf.bos_token_id == 1 and hf.eos_token_id == 2
    with pytest.raises(Exception, match="role"):
        router.render([{"role": "wizard", "content": "hi"}])


def test_router_resolves_and_renders_it_without_torch():
    import subprocess
    import sys

    code = ("import sys; from pdserve.engine.models import resolve_tokenizer; "
            "from pdserve.engine.tokenizer import load_light_tokenizer; from pdserve.router.chat import ChatTemplate; "
            "p = resolve_tokenizer('tiny-chat'); ids = load_light_tokenizer(p).encode("
            "ChatTemplate.load(p).render([{'role': 'user', 'content': 'Hi'}]), add_special_tokens=False); "
            "print(ids[0], ids[1], ids[-2], 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "4", "5", "False", "False"]  # <s> <|user|> ... <|assistant|> \n


def test_router_tokenizer_matches_hf():
    from transformers import AutoTokenizer

    from pdserve.engine.tokenizer import LightTokenizer, load_light_tokenizer

    path = resolve_tokenizer("tiny-chat")
    light = load_light_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(path)
    assert isinstance(light, LightTokenizer) and len(light) == len(hf) == 4096
    for text in [*PLAIN_PROMPTS, chat_prompt("Who are you?"), "ünïcödé ✓", "a\nb\tc", ""]:
        for special in (True, False):
            assert light.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)


def test_greedy_parity_with_hf_generate(chat_llm):
    tok = chat_llm.tokenizer
    prompts = [tok.encode(p) for p in PLAIN_PROMPTS[:4]] + [tok.encode(chat_prompt(q)) for q in CHAT_PROMPTS[:4]]
    prompts.append(list(range(3, 300, 3)))
    expected = hf_greedy(chat_llm.engine.runner.model_path, prompts, 24)
    outs = chat_llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    for i, (o, want) in enumerate(zip(outs, expected, strict=True)):
        assert o.token_ids == want, (i, o.token_ids, want)
    assert_idle(chat_llm.engine)


def test_answers_in_readable_english(chat_llm, dictionary):
    prompts = PLAIN_PROMPTS + [chat_prompt(q) for q in CHAT_PROMPTS]
    outs = chat_llm.generate(prompts, READ)
    texts = [o.text for o in outs]
    share, num_words = dictionary_share(texts, dictionary)
    report = "\n".join(f"{p!r} -> {t!r}" for p, t in zip(prompts, texts, strict=True))
    assert num_words >= 20 * 8, report
    assert share >= 0.90, f"{share:.1%} dictionary words\n{report}"
    # every completion says something (a plain prompt is continued, not ended at once); greedy decoding of so
    # small a model loops within an answer ("and the land of Egypt, and the land of Egypt"), but the 20 differ
    assert all(len(words_of(t)) >= 5 for t in texts), report
    assert len(set(words_of(" ".join(texts)))) >= 50, report
    # a chat answer is an answer: it ends its turn (eos) rather than writing the next user turn
    assert all("<|user|>" not in t for t in texts)
    assert_idle(chat_llm.engine)


def test_sampled_answers_are_readable_and_varied(chat_llm, dictionary):
    prompts = PLAIN_PROMPTS + [chat_prompt(q) for q in CHAT_PROMPTS]
    outs = chat_llm.generate(prompts, [SamplingParams(max_tokens=48, temperature=0.7, seed=1 + i) for i in range(20)])
    texts = [o.text for o in outs]
    share, _ = dictionary_share(texts, dictionary)
    report = "\n".join(f"{p!r} -> {t!r}" for p, t in zip(prompts, texts, strict=True))
    assert share >= 0.90, f"{share:.1%} dictionary words\n{report}"
    assert len(set(words_of(" ".join(texts)))) >= 150, report
    assert_idle(chat_llm.engine)


def test_a_random_model_fails_the_readability_check(dictionary):
    llm = LLM("tiny", num_blocks=256)
    outs = llm.generate(PLAIN_PROMPTS + [chat_prompt(q) for q in CHAT_PROMPTS], READ)
    share, _ = dictionary_share([o.text for o in outs], dictionary)
    assert share < 0.5, share
