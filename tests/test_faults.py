"""Fault injection, 50 seeds: kill -9 and SIGSTOP of agent, server, pcscd and the card
during transmits, held transactions and status-change waits (see tests/faults.py)."""

from __future__ import annotations

import pytest
from faults import Campaign, summary

SEEDS = range(50)
_outcomes = []


@pytest.fixture(scope="module")
def campaign(pcscd, tmp_path_factory, targets, request):
    c = Campaign(targets.get("pcscd"), str(tmp_path_factory.mktemp("faults")))
    yield c
    c.close()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter and _outcomes:
        reporter.write_line("\nfault injection, by fault:\n" + summary(_outcomes))


@pytest.mark.parametrize("seed", SEEDS)
def test_a_fault_never_hangs_an_application_nor_leaks_on_the_host(campaign, seed):
    outcome = campaign.run(seed)
    _outcomes.append(outcome)
    assert not outcome.problems, (
        f"seed {seed}: {outcome.how} {outcome.victim} at {outcome.at} s "
        f"({outcome.length} s):\n" + "\n".join(outcome.problems))
