"""export.py: the Hugging Face folder loads in transformers, lm-eval's CLI and model.py with the same numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import export
from export import export_hf
from model import Gemma, save_checkpoint
from test_downstream import tiny_dir, write_local_tasks  # noqa: F401 (tiny_dir is a fixture)
from test_perplexity import tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def tokenizer():
    from data import Tokenizer
    return Tokenizer.from_source('gemma3-270m-gguf')


def leftovers(folder):
    """Temporary or moved-aside folders that an export left next to its target."""
    return sorted(p.name for p in Path(folder).iterdir() if '.tmp-' in p.name or '.old-' in p.name)


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0] if isinstance(model, Gemma) else model(idx).logits

# -----------------------------------------------------------------------------
# a tiny model


def test_tiny_export_loads_in_transformers(tmp_path, tokenizer):
    model = tiny_model()
    folder, checks = export_hf(model, tokenizer, tmp_path / 'hf')
    assert checks['max_logit_diff'] <= 1e-4
    assert sorted(p.name for p in folder.iterdir()) == [
        'config.json', 'generation_config.json', 'model.safetensors', 'special_tokens_map.json',
        'tokenizer.model', 'tokenizer_config.json']
    assert leftovers(tmp_path) == []
    assert (folder / 'tokenizer.model').read_bytes() == tokenizer.model_bytes
    with safe_open(folder / 'model.safetensors', 'pt') as f:
        names = set(f.keys())
    assert 'model.embed_tokens.weight' in names
    assert 'lm_head.weight' not in names  # the head is tied, as save_pretrained leaves it out
    assert names == {'model.' + k for k in model.state_dict()}

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == 'Gemma3ForCausalLM'
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(3, 262_144, (2, 40))  # longer than the sliding window of 8
    torch.testing.assert_close(logits_of(hf, idx), logits_of(model, idx), atol=1e-4, rtol=0)

    reloaded = Gemma.from_pretrained(folder)
    assert reloaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_bf16_export_rounds_weights_once(tmp_path, tokenizer):
    model = tiny_model()
    folder, _ = export_hf(model, tokenizer, tmp_path / 'hf', dtype=torch.bfloat16)
    assert json.loads((folder / 'config.json').read_text())['dtype'] == 'bfloat16'
    with safe_open(folder / 'model.safetensors', 'pt') as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    reloaded = Gemma.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16).float()), name
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    idx = torch.randint(3, 262_144, (1, 30))
    torch.testing.assert_close(logits_of(hf, idx), logits_of(reloaded, idx), atol=1e-4, rtol=0)


def test_existing_folder_kept_unless_overwrite(tmp_path, tokenizer):
    target = tmp_path / 'hf'
    target.mkdir()
    (target / 'old.txt').write_text('previous export')
    with pytest.raises(FileExistsError, match='--overwrite'):
        export_hf(tiny_model(), tokenizer, target)
    assert (target / 'old.txt').is_file()
    export_hf(tiny_model(), tokenizer, target, overwrite=True, verify=False)
    assert not (target / 'old.txt').exists()
    assert (target / 'model.safetensors').is_file()
    assert leftovers(tmp_path) == []


def test_failed_check_leaves_no_folder(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(export, 'LOGITS_TOLERANCE', -1.0)  # no difference can pass: the check must fail
    with pytest.raises(ValueError, match="transformers' logits differ"):
        export_hf(tiny_model(), tokenizer, tmp_path / 'hf')
    assert list(tmp_path.iterdir()) == []


def test_vocab_mismatch_rejected(tmp_path, tokenizer):
    from model import GemmaConfig
    small = Gemma(GemmaConfig.from_dict({**tiny_model().config.to_dict(), 'vocab_size': 300}))
    with pytest.raises(ValueError, match='262144 pieces but the model has vocab_size=300'):
        export_hf(small, tokenizer, tmp_path / 'hf')
    assert list(tmp_path.iterdir()) == []

# -----------------------------------------------------------------------------
# the real 270M


def test_real_270m_export_roundtrip(real_model, tokenizer, tmp_path):
    # verify=False: this test makes the same checks itself, on real text and with the real weights
    folder, checks = export_hf(real_model, tokenizer, tmp_path / 'hf', verify=False)
    assert checks is None

    import data
    gutenberg = data.prepare(dataset='gutenberg', verbose=False)
    text = gutenberg.text('test', 0)[:6000]
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    assert hf_tokenizer(text).input_ids == ids
    assert hf_tokenizer.decode(ids[1:]) == text

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    idx = torch.tensor([ids[:160]])
    torch.testing.assert_close(logits_of(hf, idx), logits_of(real_model, idx), atol=1e-4, rtol=0)

    reloaded = Gemma.from_pretrained(folder)
    assert reloaded.config == real_model.config
    expected = real_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

# -----------------------------------------------------------------------------
# command lines: ours, then lm-eval's on the exported folder


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_cli_exports_checkpoint(tmp_path):
    """A train.py checkpoint exported from the command line loads in transformers with the same logits."""
    model = tiny_model(seed=5)
    train_config = {'init_from': 'gemma3-270m-gguf', 'tokenizer': 'gemma3-270m-gguf', 'block_size': 64}
    save_checkpoint({'model': model.state_dict(), 'model_config': model.config.to_dict(), 'config': train_config,
                     'iter': 20}, tmp_path / 'run', 20)
    out = tmp_path / 'hf'
    result = run('export.py', f'--ckpt={tmp_path / "run"}', f'--out={out}')
    assert result.returncode == 0, result.stderr
    assert 'verified' in result.stdout
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = torch.randint(3, 262_144, (1, 24))
    torch.testing.assert_close(logits_of(hf, idx), logits_of(model, idx), atol=1e-4, rtol=0)


def test_cli_errors_print_one_line(tmp_path, tiny_dir):
    out = tmp_path / 'hf'
    out.mkdir()
    result = run('export.py', f'--init_from={tiny_dir}', f'--out={out}')
    assert result.returncode == 2
    assert 'exists; pass --overwrite' in result.stderr
    assert 'Traceback' not in result.stderr
    result = run('export.py', f'--init_from={tiny_dir}')
    assert result.returncode == 2
    assert '--out is required' in result.stderr
    result = run('export.py', f'--init_from={tiny_dir}', f'--out={tmp_path / "other"}', '--dtype=float16')
    assert result.returncode == 2
    assert "dtype='float16' is invalid" in result.stderr


def test_lm_eval_cli_runs_exported_folder(tmp_path, tiny_dir, tokenizer):
    """lm-eval's own command line on the export gives the numbers GemmaLM gives on the same weights."""
    from downstream import GemmaLM, run_tasks
    model = Gemma.from_pretrained(tiny_dir)
    folder, _ = export_hf(model, tokenizer, tmp_path / 'hf', verify=False)
    task_dir = write_local_tasks(tmp_path)
    result = run('-m', 'lm_eval', '--model', 'hf', '--model_args', f'pretrained={folder},dtype=float32',
                 '--tasks', 'arc_challenge_local', '--include_path', str(task_dir), '--limit', '3',
                 '--device', 'cpu', '--batch_size', '4', '--output_path', str(tmp_path / 'lm_eval_out'), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / 'lm_eval_out').rglob('results_*.json')
    theirs = json.loads(results_file.read_text())['results']['arc_challenge_local']
    ours = run_tasks(GemmaLM(model, tokenizer), ['arc_challenge_local'], limit=3, task_dir=str(task_dir))
    for metric in ('acc', 'acc_norm'):
        assert ours['tasks']['arc_challenge_local'][metric] == theirs[f'{metric},none']
