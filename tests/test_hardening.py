"""Adversarial load against a live daemon (loopback and Unix sockets only,
bounded, seeded), each attack beside a healthy guest->subscriber stream:
bad headers at every byte, handshake floods with forged sessions and wrong
roles, slowloris, headers claiming 16 MiB then held, 2,000 concurrent
connect/close cycles, RPC floods with unanswered ids, a guest ignoring
heartbeats, subscribers that never read, handlers that vanish, processes
SIGKILLed mid-frame, and several guests streaming into one session.

Each test asserts what must hold (reliability.Env.finish): the daemon stays
up and answers; every bad peer got its Error and was closed within its
timeout; the healthy stream lost no byte; RSS within RSS_BOUND_MIB; fds,
connections, asyncio tasks and pending RPCs back to where they were. No
timing assertions: throughput is a figure of the full run
(``python tests/reliability.py``)."""

from __future__ import annotations

import pytest
import reliability

SCENARIOS = [name for name in reliability.SCENARIOS if name != "protocol_fuzz"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_attack(tmp_path, name):
    res = reliability.run_campaign(tmp_path, [name], reliability.QUICK)
    assert not res["failures"], "\n".join(res["failures"][:10]) + f"\n(daemon log: {res['log']})"
    summary = res["summary"]
    assert summary["alive"] and summary["responsive"] and summary["exit_code"] == 0
    assert summary["healthy"]["lossless"]
    assert "error" not in res["scenarios"][name], res["scenarios"][name]
