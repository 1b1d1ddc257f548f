"""The benchmark harness's own bookkeeping (``benchmarks.harness``), shared with the process tests."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.harness import scratch_dir


def test_benchmark_scratch_dir_is_removed_after_a_clean_run_and_kept_after_a_failed_one(capsys):
    with scratch_dir("continua-test-") as ok:
        (ok / "agent.log").write_text("fine")
    assert not ok.exists()
    with pytest.raises(RuntimeError), scratch_dir("continua-test-") as bad:
        (bad / "agent.log").write_text("the reason")
        raise RuntimeError("run failed")
    try:
        assert (bad / "agent.log").read_text() == "the reason"
        assert str(bad) in capsys.readouterr().err
    finally:
        shutil.rmtree(bad)


def test_unauthenticated_flood_counts_only_requests_that_left_the_client(tmp_path):
    """Nothing listens on the port: each DEALER queues its send HWM (1,000) and the rest is
    ``zmq.Again``, which must be counted as not sent rather than as sent and refused."""
    from types import SimpleNamespace

    from benchmarks.harness import free_port, make_keys
    from benchmarks.reliability import unauth_flood

    setup = SimpleNamespace(kdir=make_keys(tmp_path), control_ep=f"tcp://127.0.0.1:{free_port()}")
    res = unauth_flood(setup, tmp_path, requests=9_000)
    assert res["tried"] == 9_000 and res["replies"] == 0
    assert res["sent"] == 8 * 1_000 and res["not_sent"] == 1_000
