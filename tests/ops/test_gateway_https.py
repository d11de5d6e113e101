"""The gateway's HTTP side over TLS (--https-cert/--https-key): clients verify it, plain HTTP gets nowhere,
and a bad certificate is one line before anything binds."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest

from pdserve.cli import build_parser
from pdserve.deploy.cli_checks import UsageError
from pdserve.deploy.cli_gateway import config_from
from pdserve.router.gateway.server import GatewayConfig, serve


def test_https_answers_verified_clients_and_refuses_plain_http(certs):
    cfg = GatewayConfig(router="127.0.0.1:1", port=0, https_cert=str(certs / "server.crt"),
                        https_key=str(certs / "server.key"), timeout_s=2.0)

    async def go():
        ready, stop = asyncio.get_running_loop().create_future(), asyncio.Event()
        task = asyncio.create_task(serve(cfg, ready, stop))
        url = await asyncio.wait_for(ready, 30)
        assert url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/models", ssl=trusted) as resp:  # no router behind it: 503, over TLS
                    assert resp.status == 503 and (await resp.json())["error"]["message"]
                with pytest.raises(aiohttp.ClientError):  # a client that does not trust the CA
                    async with s.get(url + "/models", ssl=ssl.create_default_context()):
                        pass
                with pytest.raises(aiohttp.ClientError):  # plain HTTP on the TLS port
                    async with s.get(url.replace("https://", "http://") + "/models") as resp:
                        await resp.read()
        finally:
            stop.set()
            await task

    asyncio.run(go())


@pytest.mark.parametrize("flags, message", [
    (["--https-cert", "CERT"], "give both"),
    (["--https-cert", "CERT", "--https-key", "CERT"], "cannot load"),  # a certificate is not its key
])
def test_bad_https_flags_are_one_usage_line(certs, flags, message):
    flags = [f.replace("CERT", str(certs / "server.crt")) for f in flags]
    a = build_parser().parse_args(["gateway", "--port", "0", *flags])
    with pytest.raises(UsageError, match=f"--https-cert/--https-key: .*{message}"):
        config_from(a, None)
