"""Chat messages at the router's edge: the model's template rendered as transformers renders it, then
tokenized; a bad role, too many or too large messages, or a model with no template is INVALID_ARGUMENT."""

from __future__ import annotations

import json

import pytest

from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.tokenizer import build_byte_tokenizer, load_light_tokenizer
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.chat import MAX_MESSAGES, ChatTemplate, read_chat_template
from pdserve.router.request import RequestParser
from pdserve.router.token_text import TokenTexts

CHATML = (
    "{% for message in messages %}\n"
    "    {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "    {{ '<|im_start|>assistant\\n' }}\n"
    "{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}{% endfor %}"
)
TOJSON = "{% for m in messages %}{{ m | tojson }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi <b>there</b> & café"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def model_dir(tmp_path, template=None, where="config"):
    build_byte_tokenizer(tmp_path, vocab_size=320)
    if template is not None and where == "config":
        cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
    return tmp_path


def msgs(conv):
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in conv]


@pytest.mark.parametrize("template", [CHATML, TOJSON], ids=["chatml", "tojson"])
def test_rendering_and_tokens_match_transformers(tmp_path, template):
    from transformers import AutoTokenizer

    path = model_dir(tmp_path, template)
    hf = AutoTokenizer.from_pretrained(str(path))
    want_text = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    want_ids = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
    chat = ChatTemplate.load(path)
    assert chat.render(CONVERSATION) == want_text
    parser = RequestParser(load_light_tokenizer(str(path)), seed=0, chat=chat, model="m")
    req = parser.parse(pb.GenerateRequest(messages=msgs(CONVERSATION)))
    assert list(req.token_ids) == list(want_ids)


def test_special_tokens_and_raise_exception_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = model_dir(tmp_path, LLAMA2, where="jinja")
    conv = CONVERSATION[1:]
    hf = AutoTokenizer.from_pretrained(str(path))
    want = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    parser = RequestParser(load_light_tokenizer(str(path)), seed=0, chat=ChatTemplate.load(path))
    assert list(parser.parse(pb.GenerateRequest(messages=msgs(conv))).token_ids) == list(want)
    assert want[0] == 1  # the template's own <s>: nothing added twice
    with pytest.raises(InvalidRequestError, match="messages: .*roles must alternate"):
        parser.parse(pb.GenerateRequest(messages=msgs(CONVERSATION)))  # starts with system


def test_template_sources(tmp_path):
    assert read_chat_template(model_dir(tmp_path / "none"))[0] is None
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert read_chat_template(model_dir(tmp_path / "named", named))[0] == "D"
    src, specials = read_chat_template(model_dir(tmp_path / "file", CHATML, where="jinja"))
    assert src == CHATML and specials["bos_token"] == "<s>" and specials["eos_token"] == "</s>"
    assert ChatTemplate.load(model_dir(tmp_path / "broken", "{% for %}")) is None  # logged, chat refused


def parser_for(tmp_path, template=CHATML):
    path = model_dir(tmp_path, template)
    return RequestParser(load_light_tokenizer(str(path)), seed=0, chat=ChatTemplate.load(path), model="tiny-chat")


BAD = {
    "bad role": (dict(messages=[pb.ChatMessage(role="robot", content="x")]), "messages[0].role: 'robot' is not one of"),
    "empty role": (dict(messages=[pb.ChatMessage(role="user", content="a"), pb.ChatMessage(content="b")]),
                   "messages[1].role"),
    "nothing": (dict(), "prompt: set exactly one of prompt, token_ids or messages (prompt is empty, and no"),
    "prompt and messages": (dict(prompt="hi", messages=[pb.ChatMessage(role="user", content="x")]),
                            "prompt: set exactly one of prompt, token_ids or messages (prompt and messages"),
    "ids and messages": (dict(token_ids=[5], messages=[pb.ChatMessage(role="user", content="x")]),
                         "messages: set exactly one"),
    "too many": (dict(messages=[pb.ChatMessage(role="user", content="x")] * (MAX_MESSAGES + 1)),
                 f"messages: at most {MAX_MESSAGES} messages"),
    "too large": (dict(messages=[pb.ChatMessage(role="user", content="x" * (3 << 20))] * 2),
                  "messages: contents longer than 4194304 characters"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_messages_name_the_field(tmp_path, case):
    fields, message = BAD[case]
    with pytest.raises(InvalidRequestError) as err:
        parser_for(tmp_path).parse(pb.GenerateRequest(**fields))
    assert message in str(err.value)


def test_no_template_and_wrong_model(tmp_path):
    path = model_dir(tmp_path)
    parser = RequestParser(load_light_tokenizer(str(path)), seed=0, chat=None, model="tiny")
    with pytest.raises(InvalidRequestError, match="messages: model 'tiny' has no chat template"):
        parser.parse(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]))
    with pytest.raises(KeyError, match="model: 'gpt-4' is not served here"):
        parser.parse(pb.GenerateRequest(prompt="hi", model="gpt-4"))
    assert parser.parse(pb.GenerateRequest(prompt="hi", model="tiny")).token_ids


def test_token_texts_fill_every_logprob(tmp_path):
    texts = TokenTexts(load_light_tokenizer(str(model_dir(tmp_path))))
    resp = pb.GenerateResponse(logprobs=[pb.TokenLogprob(token_id=2, logprob=-0.1, top={2: -0.1, 3 + ord("a"): -2})])
    texts.fill(resp)
    assert dict(resp.logprobs[0].token_text) == {2: "</s>", 3 + ord("a"): "a"}
