"""End to end on the real 270M and Gutenberg text: the chain `make demo` runs, shortened."""

import json
import math
import subprocess
import sys

from conftest import ROOT


def run_script(args, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_demo_pipeline_with_dino(tmp_path):
    out = tmp_path / "demo"
    stdout = run_script(["demo.py", f"--out_dir={out}", "--lengths=256", "--depths=50", "--n=2",
                         "--ppl_tokens=256", "--max_iters=2"])
    report = json.loads((out / "report.json").read_text())
    assert "before (pretrained 270M) vs after" in stdout
    assert [(r["length"], r["depth"]) for r in report["nihs"]["rows"]] == [(256, 50), (256, "adjacent"),
                                                                           (256, "none")]
    for label in ("baseline", "tuned"):
        assert report["perplexity"][label]["tokens"] == 256
        assert 1.0 < report["perplexity"][label]["token_perplexity"] < 200.0
    assert math.isfinite(report["train"]["mem"]["last"][1])
    assert (out / "ckpt_000002.pt").is_file()
    assert (out / "nihs_tuned" / "heatmap.png").is_file()


def test_train_l1_then_evaluate_checkpoint(tmp_path):
    out = tmp_path / "l1"
    run_script(["train.py", "config/demo_cpu.py", f"--out_dir={out}", "--memory_loss=l1", "--max_iters=1",
                "--eval_iters=1", "--eval_interval=1", "--ckpt_interval=1"])
    log = (out / "log.txt").read_text().split("\n")
    assert any(line.split()[1:2] == ["mem"] for line in log if line)
    stdout = run_script(["perplexity.py", f"--ckpt={out}", "--max_tokens=128", f"--out_json={out}/ppl.json"])
    assert "token perplexity" in stdout
    result = json.loads((out / "ppl.json").read_text())
    assert result["tokens"] == 128


def test_demo_refuses_foreign_out_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("a researcher's file")
    result = subprocess.run([sys.executable, "demo.py", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "not written by demo.py" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "a researcher's file"
