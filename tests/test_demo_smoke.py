"""Smoke tests (no timing assertions): the demo and the benchmark suite on a tiny random Llama."""

import json

from gaugecompile.cli import main


def test_demo_random_llama(capsys):
    rc = main(["demo", "--random", "llama", "--new-tokens", "3", "--window", "16", "--stream-steps", "3"])
    out = capsys.readouterr().out
    assert "scenario" in out and "2 chat (greedy)" in out
    assert "TOKENS DIFFER" not in out
    assert rc == 0, out


def test_bench_quick_subset(tmp_path, capsys):
    rc = main(["bench", "--quick", "--only", "1", "5", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0, results
    assert set(results) >= {"machine", "versions", "date", "scenarios"}
    assert results["scenarios"]["5_memory"]["rows"][0]["ratio"] > 1  # beams share their prompt blocks
    assert (tmp_path / "reorganisation.png").is_file()
