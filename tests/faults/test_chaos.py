"""The chaos harness's short scenario, for real: the Procfile's dynos under load while
PostgreSQL, RabbitMQ and Redis fail (through proxies), RabbitMQ raises a memory alarm (on a node of the
run's own), the web dynos' publisher I/O threads die and the worker is SIGKILLed.

What is asserted comes from the database itself (bench/chaos.py's audit): no
acknowledged write lost, none applied twice, none applied out of acceptance order
per notification; and that the faults did happen: backends were terminated, every
web breaker opened on the database outage, writes were queued and the worker
applied them, the worker was killed mid-drain and came back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import ChaosConfig, run_chaos


@pytest.mark.timeout(300)  # the scenario's load is 79 s; start-up, drain and audit come on top
def test_short_chaos_scenario_loses_nothing(tmp_path: Path) -> None:
    result = run_chaos(ChaosConfig(scenario="short", modes=("brownout",), out_dir=tmp_path, progress=False, plot=False))
    run = result.brownout
    audit = run.audit
    print(result.markdown)

    assert audit["acknowledged"] > 1000
    assert audit["lost"] == 0, f"acknowledged writes missing from the database: {audit['lost_keys'][:10]}"
    assert audit["present"] == audit["acknowledged"]
    assert audit["duplicated"] == 0
    assert audit["phantoms"] == 0
    assert audit["command_id_mismatches"] == 0  # the audit derives command ids as the service does
    assert audit["reordered"] == 0
    assert audit["toggled_entities"] > 0  # the writes whose order shows were there

    faults = {fault.kind: fault for fault in run.faults}
    assert set(faults) == {
        "ssl_kills", "db_outage", "rabbit_outage", "rabbit_alarm", "publisher_kill", "redis_outage", "worker_kill"
    }  # fmt: skip
    assert sum(faults["ssl_kills"].details["killed_per_round"]) > 0, "no backend was terminated"
    outage = next(t for t in run.timings if t["kind"] == "db_outage")
    assert faults["db_outage"].details["via"].startswith("proxy")
    assert outage["open_all"] is not None, "a web breaker never opened: the database outage did not happen"
    assert outage["closed_all"] is not None, "a web breaker never closed again after the outage"

    assert audit["acknowledged_queued"] > 0, "no write was queued"
    assert audit["applied_via_queue"] > 0, "the worker applied nothing"
    assert run.drained_after_load is not None, "the backlog did not drain"

    assert faults["rabbit_alarm"].details["via"].startswith("rabbitmqctl"), faults["rabbit_alarm"].details
    assert all(faults["publisher_kill"].details["restarted"].values()), faults["publisher_kill"].details

    kill = faults["worker_kill"].details
    assert kill.get("killed_at") is not None, "the worker was not killed"
    assert kill["mid_drain"], f"the worker was not killed mid-drain: {kill}"
    assert kill["worker_alive"] and kill["ready_at"] is not None, "the worker did not come back"
