"""bench.py --quick runs end to end and reports every measurement (its speed is never asserted)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_quick_reports_all_sections(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick", f"--out={out}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {r["variant"] for r in report["train"]} == {"ours", "ours+dino", "transformers"}
    assert all(r["step_s"] > 0 for r in report["train"])
    assert all(r["peak_bytes"] >= r["rest_bytes"] > 0 for r in report["train"])
    assert report["nihs"][0]["length"] == 256
    assert report["perplexity"]["tokens"] == 512
    assert report["prep"]["cache_hit_fraction"] > 0
    for name in ("step_ratio_128", "memory_ratio_128", "step_memory_ratio_128", "dino_overhead", "nihs_speedup_256",
                 "prep_ratio"):
        assert name in report["ratios"], name
    assert "goals" in result.stdout


def test_bench_runs_only_the_chosen_sections(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--benchmarks=['prep']", f"--out={out}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["train"] == []
    assert report["nihs"] == []
    assert report["perplexity"] is None
    assert report["prep"]["prep_ratio"] > 0


def test_bench_rejects_unknown_section():
    result = subprocess.run([sys.executable, "bench.py", "--benchmarks=['train', 'speed']"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "benchmarks=['speed'] is unknown" in result.stderr
