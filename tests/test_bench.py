"""bench.py --quick runs end to end and reports every measurement (its speed is never asserted)."""

import json
import subprocess
import sys

import pytest

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
    assert "goals: not judged in a --quick run" in result.stdout


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


def test_bench_reports_failed_worker(tmp_path):
    # a worker that dies before reporting must stop the run, not leave the parent waiting on its queue
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--benchmarks=['train']",
                             f"--init_from={tmp_path / 'missing.gguf'}", f"--out={tmp_path / 'bench.json'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "worker exited with code 1 before reporting" in result.stderr
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("arg, message", [
    ("--repeats=0", "repeats=0, warmup=1 is invalid"),
    ("--benchmarks=[]", "benchmarks=[] runs nothing"),
    ("--blocks=[1]", "blocks=[1] is invalid"),
    ("--out=/nonexistent-folder/bench.json", "folder /nonexistent-folder not found"),
])
def test_bench_rejects_bad_settings(arg, message):
    result = subprocess.run([sys.executable, "bench.py", arg], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr
