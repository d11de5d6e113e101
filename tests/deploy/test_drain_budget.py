"""Each pod's drain fits the time Kubernetes gives it, and the CLI hands the drain timeout to the process.

Kubernetes sends SIGTERM after the preStop sleep and SIGKILL at terminationGracePeriodSeconds; a process that
gives up on its in-flight streams long before that (the router used to stop after a fixed 5 s, workers after
30 s while the runbook promised 120 s) cuts streams the pod still had time to finish.
"""

from __future__ import annotations

import pytest

from pdserve import cli
from pdserve.deploy.validate import build, trees

MARGIN_S = 10  # at most this much of the grace period may go unused (SIGKILL must not race the drain)


def _deployments(tree):
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in build(tree) if d["kind"] == "Deployment"]


@pytest.mark.parametrize("tree", trees(), ids=lambda p: p.name)
def test_every_pod_drains_within_its_grace_and_uses_it(tree):
    for name, spec in _deployments(tree):
        c = spec["containers"][0]
        args = [a.replace("$(POD_IP)", "10.0.0.1") for a in c["args"]]
        drain_s = cli.build_parser().parse_args(args).drain_timeout_s
        pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep", (tree.name, name, pre_stop)
        budget = spec["terminationGracePeriodSeconds"] - int(pre_stop[1])
        assert 0 < drain_s < budget, (tree.name, name, drain_s, budget)
        assert drain_s >= budget - MARGIN_S, (tree.name, name, drain_s, budget)


def test_the_router_strategy_keeps_every_replica_up_during_a_roll():
    """The runbook's certificate rotation relies on maxUnavailable 0 for the router too."""
    for tree in trees():
        (spec,) = [d["spec"] for d in build(tree) if d["kind"] == "Deployment" and d["metadata"]["name"] == "pdserve-router"]
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, tree.name


def test_drain_timeout_reaches_the_router_config(monkeypatch):
    from pdserve.router import server

    seen = []

    async def fake_serve(cfg):
        seen.append(cfg)

    monkeypatch.setattr(server, "serve", fake_serve)
    assert cli.main(["router", "--drain-timeout-s", "20", "--decode", "127.0.0.1:1"]) == 0
    assert seen[0].drain_timeout_s == 20.0
    assert cli.main(["router", "--decode", "127.0.0.1:1"]) == 0
    assert seen[1].drain_timeout_s == 5.0  # the default: what the router always waited


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_drain_timeout_reaches_the_worker_options(monkeypatch, role):
    import importlib

    module = importlib.import_module(f"pdserve.{role}.server")
    seen = []

    async def fake_serve(engine, transfer, addr, **options):
        seen.append(options)

    monkeypatch.setattr(module, "serve", fake_serve)
    assert cli.main([role, "--drain-timeout-s", "110"]) == 0
    assert seen[0]["grace_s"] == 110.0
    assert cli.main([role]) == 0
    assert seen[1]["grace_s"] == 30.0


@pytest.mark.parametrize("value", ["-1", "nan", "x"])
def test_a_bad_drain_timeout_is_one_line_and_status_2(value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["router", "--drain-timeout-s", value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--drain-timeout-s" in err[-1]

