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
