"""``pdserve up --http-port 0`` with router API keys and a rate limit: the gateway's URL is printed, the
``Authorization: Bearer KEY`` the openai client sends is the router's key (401 without it, 403 acting for
another tenant through ``user``, 429 with Retry-After past the tenant's rate), and SIGTERM stops it all."""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request

import openai
import pytest

from tests.deploy.test_launcher import Up, _wait_gone
from tests.gateway.conftest import chat_model_dir


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"key-a": "alice", "key-b": "bob"}))
    u = Up("--http-port", "0", "--prefill", "0", "--decode", "1", "--metrics-port", "0",
           "--model", chat_model_dir(root), "--api-keys", str(keys), "--tenant-rate", "bob=0.01:1")
    try:
        u.wait_ready()
        m = re.search(r"^pdserve up: OpenAI-compatible API at (http://127\.0\.0\.1:\d+/v1)$", "".join(u.lines), re.M)
        assert m, "".join(u.lines)
        u.url = m.group(1)
        yield u
    finally:
        u.close()


def client(up, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.url, api_key=key, max_retries=0, timeout=60)


def test_the_router_keys_apply_through_the_gateway(up):
    good = client(up, "key-a")
    model = good.models.list().data[0].id
    out = good.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, user="alice")
    assert out.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError) as err:
        client(up, "wrong-key").completions.create(model=model, prompt="Hello", max_tokens=3)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    req = urllib.request.Request(up.url + "/completions", data=json.dumps({"prompt": "Hello"}).encode(),
                                 headers={"Content-Type": "application/json"})  # no Authorization at all
    with pytest.raises(urllib.error.HTTPError) as no_key:
        urllib.request.urlopen(req, timeout=30)
    assert no_key.value.code == 401 and json.loads(no_key.value.read())["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client(up, "wrong-key").models.list()
    with pytest.raises(openai.PermissionDeniedError, match="tenant"):
        good.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                     user="bob")


def test_a_rate_limited_tenant_gets_429_with_retry_after(up):
    bob = client(up, "key-b")
    model = bob.models.list().data[0].id
    bob.completions.create(model=model, prompt="Hello", max_tokens=2)  # the burst of one
    with pytest.raises(openai.RateLimitError) as err:
        bob.completions.create(model=model, prompt="Hello", max_tokens=2)
    assert err.value.status_code == 429 and int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.body["type"] == "rate_limit_error"


def test_sigterm_stops_the_gateway_with_the_cluster(up):
    up.popen.send_signal(signal.SIGTERM)
    assert up.popen.wait(60) == 0
    assert _wait_gone(list(up.pids.values()), 15) == []
    with pytest.raises(openai.APIConnectionError):
        client(up, "key-a").models.list()
