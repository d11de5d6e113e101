"""The refusal to start on a non-loopback --host without PDSERVE_CLUSTER_SECRET says what that process exposes:
a router has no KV port (it said "its internal RPCs and KV port" for every role)."""

from __future__ import annotations

import pytest

from pdserve.deploy.cli_checks import UsageError, check_cluster_secret


@pytest.mark.parametrize("role,says,not_says", [
    ("router", "Admin.Register", "KV port"),
    ("decode worker", "KV port", "Admin.Register"),
    ("prefill worker", "KV port", "Admin.Register"),
])
def test_the_refusal_names_what_this_role_exposes(role, says, not_says):
    with pytest.raises(UsageError) as e:
        check_cluster_secret(role, "0.0.0.0", None)
    message = str(e.value)
    assert message.startswith("--host 0.0.0.0: PDSERVE_CLUSTER_SECRET is not set")
    assert says in message and not_says not in message and "\n" not in message
