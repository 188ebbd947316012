"""train.py end to end on a tiny random Gemma and real Gutenberg text.

Most tests run train.py as a subprocess, as a user would. The data is tokenized with a 1,024-piece
SentencePiece model trained on Gutenberg text, because the Gemma tokenizer's 262,144-way LM head
would make each step ~30x slower. The model, data pipeline and training loop are the real ones.
"""

import hashlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import read_log
from configurator import ConfigError, configure
from model import (Gemma, GemmaConfig, MemoryLoss, gemma3_layer_types, list_checkpoints, load_checkpoint,
                   newest_checkpoint, save_checkpoint)

ROOT = Path(__file__).resolve().parent.parent
NPROC = 2


@pytest.fixture(scope='session')
def ragged_data(small_data, tmp_path_factory):
    """--dataset=FOLDER of Gutenberg passages of 40-170 characters, so most 64-token windows are padded.

    Windows then carry different numbers of scored tokens and memory pairs, which is what tells a
    token-weighted average over micro-batches and ranks from a mean of per-micro-batch means."""
    import json

    import data
    words = data.prepare(verbose=False).text('train', 0).split(' ')
    lengths = [60, 150, 90, 170, 120, 40, 130, 80, 160, 100, 50, 140]  # characters, cycled
    root = tmp_path_factory.mktemp('ragged')
    docs, i = [], 0
    for n in range(60):
        doc = []
        while len(' '.join(doc)) < lengths[n % len(lengths)]:
            doc.append(words[i])
            i += 1
        docs.append(' '.join(doc))
    for split, part in (('train', docs[:40]), ('val', docs[40:50]), ('test', docs[50:])):
        lines = [json.dumps({'text': doc, 'title': f'{split} passage {k}'}) for k, doc in enumerate(part)]
        (root / f'{split}.jsonl').write_text('\n'.join(lines) + '\n')
    return [f'--dataset={root}']


def run_train(args, small_data, out_dir, nproc=0, env=None, expect_rc=0, config='config/tiny.py'):
    """Run train.py (under torchrun when nproc > 0) and return the CompletedProcess."""
    launcher = [sys.executable]
    if nproc:
        launcher += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    cmd = launcher + ['train.py'] + ([config] if config else []) + [f'--out_dir={out_dir}'] + small_data + args
    run_env = {**os.environ, 'OMP_NUM_THREADS': '1' if nproc else os.environ.get('OMP_NUM_THREADS', '2'),
               **(env or {})}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=run_env)
    assert result.returncode == expect_rc, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_tensors_close(a, b, atol, where=''):
    """Compare nested dicts/lists of tensors: equal structure, values within atol (0 = bitwise)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_tensors_close(a[key], b[key], atol, f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_close(x, y, atol, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        if atol == 0:
            assert torch.equal(a, b), where
        else:
            assert torch.allclose(a.double(), b.double(), atol=atol, rtol=0), \
                f"{where}: max diff {(a.double() - b.double()).abs().max().item():.3g}"
    else:
        assert a == b, where


def tiny_gemma(vocab_size=64):
    config = GemmaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                         sliding_window=8, layer_types=gemma3_layer_types(2, 2), rope_local_base=1e4,
                         rope_global_base=1e6, rms_norm_eps=1e-6, max_position_embeddings=128, bos_token_id=2,
                         eos_token_id=1, pad_token_id=0)
    return Gemma(config)


def fake_checkpoint(model, it):
    """A checkpoint dict in train.py's layout with a real model's weights, for the checkpoint-file tests."""
    return {'model': model.state_dict(), 'model_config': model.config.to_dict(), 'config': {'block_size': 32},
            'iter': it, 'memory': None, 'optimizer': {}, 'best_val_loss': 1.0}

# -----------------------------------------------------------------------------
# settings


def resolve(argv):
    """Apply argv to a fresh copy of train.py's settings, as `python train.py ARGV` does."""
    scope = dict(vars(train))
    return configure(scope, argv, types=train.CONFIG_TYPES)


def test_settings_from_config_and_flags():
    config = resolve(['config/tiny.py', '--memory-layer=3', '--learning_rate=1', '--no_wandb_log'])
    assert config['block_size'] == 64  # from the config file
    assert config['memory_layer'] == 3 and isinstance(config['memory_layer'], int)
    assert config['learning_rate'] == 1.0 and isinstance(config['learning_rate'], float)
    assert config['wandb_log'] is False


def test_settings_memory_layer_list():
    config = resolve(['--memory_layer=[6, 12]', '--memory_layer_weights=[1.0, 0.5]'])
    assert config['memory_layer'] == [6, 12]
    assert config['memory_layer_weights'] == [1.0, 0.5]
    assert resolve(['--memory_layer=6,12'])['memory_layer'] == [6, 12]


def test_settings_off_flags():
    config = resolve(['--no_memory_loss', '--no-memory-norm', '--wandb_log'])
    assert config['memory_loss'] is None
    assert config['memory_norm'] is None
    assert config['wandb_log'] is True
    assert resolve(['config/baseline.py'])['memory_loss'] is None


@pytest.mark.parametrize('argv, message', [
    (['--memory_layers=6'], '--memory_layer'),           # a typo names the closest setting
    (['--block_size=big'], 'block_size'),
    (['--memory_layer=[6, "x"]'], 'memory_layer'),
    (['config/missing.py'], 'not found'),
])
def test_settings_reject_bad_input(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(argv)


@pytest.mark.parametrize('changes, message', [
    ({'gradient_accumulation_steps': 3}, 'not divisible by WORLD_SIZE=2'),
    ({'memory_offset': 63}, 'memory_offset=63'),
    ({'memory_layer_weights': [1.0, 2.0]}, 'memory_layer_weights'),
    ({'memory_loss': 'cosine'}, 'memory_loss'),
    ({'xent_weight': 0.0, 'memory_weight': 0.0}, 'nothing would be trained'),
    ({'optimizer': 'sgd'}, 'optimizer'),
])
def test_check_settings_rejects(changes, message):
    config = {**resolve(['config/tiny.py']), **changes}
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.check_settings(config, world_size=2)


def test_check_settings_splits_accumulation():
    config = {**resolve(['config/tiny.py']), 'gradient_accumulation_steps': 8}
    assert train.check_settings(config, world_size=4) == 2


def test_fp16_rejected():
    with pytest.raises(ValueError, match='float16'):
        train.pick_dtype('float16', 'cpu')
    assert train.pick_dtype('float32', 'cuda') == (torch.float32, 'requested')


def test_lr_schedule():
    factors = [train.lr_factor(it, warmup=10, decay_iters=110, min_ratio=0.1) for it in range(130)]
    assert factors[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))  # linear warmup
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)                       # cosine midpoint
    assert all(a >= b for a, b in zip(factors[10:110], factors[11:111]))
    assert factors[110] == factors[129] == 0.1
    assert train.lr_factor(50, 10, 110, 0.1, decay=False) == 1.0


def test_teacher_temperature_warmup():
    assert train.dino_teacher_temperature(0, 0.04, 0.07, 10) == pytest.approx(0.04)
    assert train.dino_teacher_temperature(5, 0.04, 0.07, 10) == pytest.approx(0.055)
    assert train.dino_teacher_temperature(10, 0.04, 0.07, 10) == 0.07
    assert train.dino_teacher_temperature(0, 0.04, 0.07, 0) == 0.07


@pytest.mark.parametrize('name, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA A100 80GB PCIe', 312e12), ('NVIDIA L4', 121e12),
    ('NVIDIA GeForce GTX 1080', None),
])
def test_gpu_peak_lookup(name, peak):
    assert train.gpu_peak_flops(name) == peak


def test_collapse_warnings(capsys):
    memory = MemoryLoss('dino', [2], hidden_size=8, offset=4,
                        dino={'hidden_dim': 8, 'bottleneck_dim': 4, 'num_prototypes': 64})
    config = {'dino_prototypes': 64, 'dino_teacher_temp_warmup_iters': 5}
    train.warn_collapse(10, {'mem_l2': 2.0, 'teacher_entropy_l2': 0.01}, memory, config)
    assert 'teacher entropy 0.0100 < 0.05' in capsys.readouterr().out
    train.warn_collapse(10, {'mem_l2': math.log(64) + 0.001, 'teacher_entropy_l2': 3.0}, memory, config)
    assert 'sits at ln K' in capsys.readouterr().out
    train.warn_collapse(10, {'mem_l2': 2.0, 'teacher_entropy_l2': 3.0}, memory, config)
    train.warn_collapse(2, {'mem_l2': math.log(64), 'teacher_entropy_l2': 3.0}, memory, config)  # warmup
    assert capsys.readouterr().out == ''

# -----------------------------------------------------------------------------
# checkpoint files


def test_save_rotation_keeps_newest(tmp_path):
    model = tiny_gemma()
    for it in (1, 2, 3, 4):
        save_checkpoint(fake_checkpoint(model, it), tmp_path, it, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ['ckpt_000003.pt', 'ckpt_000004.pt']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt_000003.pt', 'ckpt_000004.pt']


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    model = tiny_gemma()
    save_checkpoint(fake_checkpoint(model, 1), tmp_path, 1, keep_last=1)
    before = hashlib.sha256((tmp_path / 'ckpt_000001.pt').read_bytes()).hexdigest()

    def save_half(obj, f):
        f.write(b'PK\x03\x04' + b'\0' * 1000)  # the start of a zip, then the disk fills up
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', save_half)
    with pytest.raises(OSError, match='No space left'):
        save_checkpoint(fake_checkpoint(model, 2), tmp_path, 2, keep_last=1)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt_000001.pt']  # no temp file, nothing rotated
    assert hashlib.sha256((tmp_path / 'ckpt_000001.pt').read_bytes()).hexdigest() == before
    loaded, ckpt = load_checkpoint(tmp_path)
    assert ckpt['iter'] == 1
    assert torch.equal(loaded.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)


def test_corrupt_newest_skipped(tmp_path):
    model = tiny_gemma()
    save_checkpoint(fake_checkpoint(model, 1), tmp_path, 1)
    save_checkpoint(fake_checkpoint(model, 2), tmp_path, 2)
    path = tmp_path / 'ckpt_000002.pt'
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # a crash mid-copy
    with pytest.warns(UserWarning, match='ckpt_000002.pt'):
        _, ckpt = load_checkpoint(tmp_path)
    assert ckpt['iter'] == 1


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no readable'):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match='not found'):
        load_checkpoint(tmp_path / 'missing')

# -----------------------------------------------------------------------------
# a complete tiny run: log format, checkpoint contents, rotation


RUN_ARGS = ['--max_iters=6', '--lr_decay_iters=6', '--ckpt_interval=1', '--keep_last=2', '--eval_interval=2']
LOG_LINE = re.compile(r'^iter (\d+) \| loss [\d.]+ \| xent [\d.]+ \| mem [\d.]+ \| lr [\d.e+-]+ \| '
                      r'grad norm [\d.]+ \| dt \d+ ms \| tok/s [\d,]+ \| mfu n/a$')


@pytest.fixture(scope='module')
def full_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('full_run')
    result = run_train(RUN_ARGS, small_data, out)
    return out, result


def test_run_prints_step_lines(full_run):
    out, result = full_run
    lines = [line for line in result.stdout.splitlines() if LOG_LINE.match(line)]
    assert [int(LOG_LINE.match(line).group(1)) for line in lines] == [0, 1, 2, 3, 4, 5]
    assert 'dtype float32 (requested)' in result.stdout
    assert 'tokens per optimizer step: 2 batch x 64 block x 2 micro-steps x 1 ranks = 256' in result.stdout
    assert "memory_layer = 2" in result.stdout  # the resolved config is printed


def test_run_log_file(full_run):
    out, _ = full_run
    log = read_log(out)
    for it in range(6):
        for key in ('loss', 'xent', 'mem', 'mem_l2', 'lr', 'grad_norm', 'dt_ms', 'tok_per_s', 'teacher_entropy_l2',
                    'student_entropy_l2', 'kl_l2', 'prototypes_used_l2'):
            assert key in log[it], (it, key)
        assert log[it]['loss'] == pytest.approx(log[it]['xent'] + 0.1 * log[it]['mem'], rel=1e-6)
    for it in (0, 2, 4, 6):
        assert {'val_xent', 'val_mem', 'val_loss'} <= log[it].keys()
    assert log[5]['xent'] < log[0]['xent']  # a random model learns unigram statistics fast at LR 1e-3


def test_run_rotates_checkpoints(full_run):
    out, _ = full_run
    assert [p.name for p in list_checkpoints(out)] == ['ckpt_000005.pt', 'ckpt_000006.pt']
    assert not list(out.glob('*.tmp*'))


def test_checkpoint_contents(full_run):
    out, _ = full_run
    ckpt = load(out / 'ckpt_000006.pt')  # weights_only=True: plain types and tensors only
    assert ckpt['iter'] == 6
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    config = GemmaConfig.from_dict(ckpt['model_config'])
    assert ckpt['model'].keys() == Gemma(config).state_dict().keys()
    assert ckpt['config']['memory_layer'] == 2
    assert ckpt['config']['tokenizer'].endswith('tokenizer')  # the resolved source, for evaluation scripts
    memory = MemoryLoss.from_settings(ckpt['memory_settings'])
    memory.load_state_dict(ckpt['memory'])
    assert {'losses.2.center', 'norms.2.mean', 'norms.2.var', 'losses.2.head.prototypes',
            'losses.2.teacher_head.prototypes'} <= ckpt['memory'].keys()
    assert ckpt['optimizer']['state']
    assert {'python', 'numpy', 'torch'} <= ckpt['rng'].keys()
    assert ckpt['data']['next_step'] == 6
    assert ckpt['data']['seed'] == 1337
    assert math.isfinite(ckpt['best_val_loss'])


def test_load_checkpoint_model(full_run):
    out, _ = full_run
    model, ckpt = load_checkpoint(out)
    assert ckpt['iter'] == 6
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt['model'][name]), name
    x = torch.tensor([[2, 100, 200, 300]])
    logits, _, _ = model(x)
    assert logits.shape == (1, 4, 1024)

# -----------------------------------------------------------------------------
# exactness: resume, accumulation, data parallelism


def test_resume_is_bit_identical(full_run, small_data, tmp_path):
    uninterrupted, _ = full_run
    env = {'WANDB_MODE': 'offline'}
    first = run_train(RUN_ARGS[1:] + ['--max_iters=3', '--wandb_log'], small_data, tmp_path, env=env)
    resumed = run_train(RUN_ARGS + ['--init_from=resume', '--wandb_log'], small_data, tmp_path, env=env)
    assert 'resuming from' in resumed.stdout
    assert '(iteration 3)' in resumed.stdout
    assert "max_iters 3 -> 6" in resumed.stdout  # the changed setting is reported

    a, b = load(uninterrupted / 'ckpt_000006.pt'), load(tmp_path / 'ckpt_000006.pt')
    for key in ('model', 'memory', 'optimizer'):
        assert_tensors_close(a[key], b[key], atol=0, where=key)
    log_a, log_b = read_log(uninterrupted), read_log(tmp_path)
    for it in range(6):
        for key in ('loss', 'xent', 'mem', 'grad_norm', 'teacher_entropy_l2'):
            assert log_a[it][key] == log_b[it][key], (it, key)

    # wandb: the resumed run continues the same run id
    runs = sorted(p.name for p in (tmp_path / 'wandb').glob('offline-run-*'))
    assert len(runs) == 2, runs
    assert len({name.rsplit('-', 1)[1] for name in runs}) == 1
    assert load(tmp_path / 'ckpt_000006.pt')['wandb_run_id'] == runs[0].rsplit('-', 1)[1]


@pytest.mark.parametrize('memory_loss', ['l1', 'dino'])
def test_accumulation_matches_one_batch(memory_loss, small_data, ragged_data, tmp_path):
    """4 micro-batches of 1 window give the gradient, statistics and logged losses of 1 micro-batch of 4."""
    common = [f'--memory_loss={memory_loss}', '--max_iters=1', '--grad_clip=0', '--ckpt_interval=1',
              '--eval_interval=100', '--memory_layer_weights=[1.0]', '--log_windows'] + ragged_data
    run_train(common + ['--batch_size=4', '--gradient_accumulation_steps=1'], small_data, tmp_path / 'one')
    run_train(common + ['--batch_size=1', '--gradient_accumulation_steps=4'], small_data, tmp_path / 'four')
    assert_ragged(tmp_path / 'one', small_data)
    a, b = load(tmp_path / 'one' / 'ckpt_000001.pt'), load(tmp_path / 'four' / 'ckpt_000001.pt')
    # after one AdamW step exp_avg = (1 - beta1) * gradient, so it carries the gradient itself. The
    # tolerance is 1e-6 of the tensor's largest entry (at least 1e-6): a DINO bias gradient of ~20
    # carries float32 rounding of ~2e-6 from the other summation order.
    for i, state in a['optimizer']['state'].items():
        grad_a = state['exp_avg'] / (1 - 0.9)
        grad_b = b['optimizer']['state'][i]['exp_avg'] / (1 - 0.9)
        scale = max(1.0, grad_a.abs().max().item())
        assert (grad_a - grad_b).abs().max().item() <= 1e-6 * scale, f"parameter {i}"
    assert_tensors_close(a['memory'], b['memory'], atol=1e-6, where='memory')  # center, EMA teacher, mean/var
    log_a, log_b = read_log(tmp_path / 'one'), read_log(tmp_path / 'four')
    for key in ('loss', 'xent', 'mem', 'mem_l2'):
        assert log_a[0][key] == pytest.approx(log_b[0][key], abs=1e-6), key
    if memory_loss == 'l1':
        assert log_a[0]['mem_raw'] == pytest.approx(log_b[0]['mem_raw'], rel=1e-6)


def assert_ragged(out_dir, small_data):
    """Check that the run's first step mixed windows with different numbers of scored tokens."""
    import data
    prepared = data.DataFolder(ckpt_data_folder(out_dir))
    lengths = [r['length'] for r in prepared.records('train')]
    windows = read_windows(Path(out_dir) / 'windows_rank0.txt')[0]
    scored = {min(64, lengths[doc] - start) for doc, start in windows}
    assert len(scored) > 1, f"every window of step 0 has {scored} scored tokens; the test needs padded windows"


def ckpt_data_folder(out_dir):
    return load(list_checkpoints(out_dir)[-1])['data']['folder']


def read_windows(path):
    """Return {iter: set of (doc, start)} from a windows_rank*.txt file."""
    windows = {}
    for line in Path(path).read_text().splitlines():
        it, _, doc, start = map(int, line.split())
        windows.setdefault(it, set()).add((doc, start))
    return windows


def test_torchrun_matches_one_process(small_data, ragged_data, tmp_path):
    common = ['--batch_size=1', '--gradient_accumulation_steps=4', '--max_iters=3', '--ckpt_interval=3',
              '--eval_interval=3', '--log_windows', '--memory_layer=[1, 2]', '--memory_layer_weights=[1.0, 0.5]']
    common += ragged_data
    ddp = run_train(common, small_data, tmp_path / 'ddp', nproc=NPROC)
    single = run_train(common, small_data, tmp_path / 'single')
    assert_ragged(tmp_path / 'single', small_data)
    assert 'world size 2' in ddp.stdout
    assert f'replica check: parameters and buffers identical on all {NPROC} ranks' in ddp.stdout

    a, b = load(tmp_path / 'single' / 'ckpt_000003.pt'), load(tmp_path / 'ddp' / 'ckpt_000003.pt')
    assert_tensors_close(a['model'], b['model'], atol=1e-5, where='model')
    assert_tensors_close(a['memory'], b['memory'], atol=1e-5, where='memory')
    log_a, log_b = read_log(tmp_path / 'single'), read_log(tmp_path / 'ddp')
    for it in range(3):
        for key in ('loss', 'xent', 'mem', 'mem_l1', 'mem_l2'):
            assert log_a[it][key] == pytest.approx(log_b[it][key], abs=1e-5), (it, key)
        assert log_b[it]['mem'] == pytest.approx(log_b[it]['mem_l1'] + 0.5 * log_b[it]['mem_l2'], rel=1e-6)
    assert log_a[3]['val_xent'] == pytest.approx(log_b[3]['val_xent'], abs=1e-5)

    rank0 = read_windows(tmp_path / 'ddp' / 'windows_rank0.txt')
    rank1 = read_windows(tmp_path / 'ddp' / 'windows_rank1.txt')
    one = read_windows(tmp_path / 'single' / 'windows_rank0.txt')
    for it in range(3):
        assert len(rank0[it]) == len(rank1[it]) == 2
        assert not rank0[it] & rank1[it], f"iteration {it}: a window seen by both ranks"
        assert rank0[it] | rank1[it] == one[it]  # the same global batch as the single process


@pytest.mark.parametrize('args', [['--memory_weight=0'], ['--xent_weight=0']], ids=['head-unused', 'blocks-unused'])
def test_torchrun_parameters_without_gradient(args, small_data, tmp_path):
    # memory_weight=0: the DINO head gets no gradient; xent off: blocks after memory layer 2 get none
    result = run_train(['--batch_size=1', '--gradient_accumulation_steps=2', '--max_iters=3', '--ckpt_interval=3',
                        '--eval_interval=3'] + args, small_data, tmp_path, nproc=NPROC)
    assert f'replica check: parameters and buffers identical on all {NPROC} ranks' in result.stdout
    log = read_log(tmp_path)
    assert all(math.isfinite(log[it]['loss']) for it in range(3))
    if args == ['--xent_weight=0']:
        assert 'xent off' in result.stdout
        assert 'xent' not in log[0]
    else:
        assert log[0]['loss'] == log[0]['xent']  # the memory loss is logged but not trained on
        assert 'mem' in log[0]

# -----------------------------------------------------------------------------
# failures and the other configs


def test_nan_stops_without_saving(small_data, tmp_path):
    result = run_train(['--max_iters=6', '--ckpt_interval=2', '--eval_interval=100'], small_data, tmp_path,
                       env={train.NAN_TEST_ENV: '3'}, expect_rc=2)
    assert 'loss is not finite at iteration 3' in result.stderr
    assert 'ckpt_000002.pt' in result.stderr  # the message names the last good checkpoint
    assert 'Traceback' not in result.stderr
    assert [p.name for p in tmp_path.glob('ckpt_*')] == ['ckpt_000002.pt']
    _, ckpt = newest_checkpoint(tmp_path)
    assert ckpt['iter'] == 2
    assert all(math.isfinite(v.float().sum().item()) for v in ckpt['model'].values())
    assert max(read_log(tmp_path)) == 2  # nothing logged for the failed step


def test_cli_without_memory_loss(small_data, tmp_path):
    # train.py's own defaults with tiny sizes: memory_layer=6 is ignored once the memory loss is off
    result = run_train(['--memory_layer=6', '--no_memory_loss', '--init_from=scratch', '--model_preset=custom',
                        '--batch_size=1', '--block_size=32', '--gradient_accumulation_steps=1', '--max_iters=2',
                        '--eval_iters=1', '--device=cpu', '--dtype=float32', '--optimizer=adafactor'],
                       small_data, tmp_path, config=None)
    assert 'mem off' in result.stdout
    log = read_log(tmp_path)
    assert 'xent' in log[1]
    assert 'mem' not in log[1]
    assert math.isfinite(log[1]['loss'])


TINY_SIZES = ['--init_from=scratch', '--model_preset=custom', '--num_hidden_layers=4', '--hidden_size=32',
              '--intermediate_size=64', '--head_dim=16', '--sliding_window=32', '--sliding_window_pattern=2',
              '--dataset=gutenberg', '--batch_size=1', '--block_size=64', '--gradient_accumulation_steps=1',
              '--memory_layer=2', '--memory_offset=16', '--dino_prototypes=64', '--dino_hidden_dim=64',
              '--dino_bottleneck_dim=16', '--max_iters=2', '--eval_iters=1', '--no_wandb_log', '--no_compile',
              '--device=cpu']


@pytest.mark.parametrize('config', ['config/mem_dino.py', 'config/mem_l1.py', 'config/baseline.py'])
def test_gpu_configs_run_tiny(config, small_data, tmp_path):
    result = run_train(TINY_SIZES, small_data, tmp_path, config=config)
    assert re.search(r'dtype (bfloat16|float32) \(auto: ', result.stdout)  # chosen once, with the reason
    log = read_log(tmp_path)
    assert math.isfinite(log[1]['loss'])
    assert ('mem' in log[1]) == (config != 'config/baseline.py')
    assert (tmp_path / 'ckpt_000002.pt').is_file()


@pytest.mark.parametrize('args, message', [
    (['--dtype=float16'], 'float16'),
    (['--memory_layers=2'], 'unknown setting --memory_layers'),
])
def test_cli_errors_are_one_line(args, message, small_data, tmp_path):
    result = run_train(args, small_data, tmp_path, expect_rc=2)
    assert message in result.stderr
    assert 'Traceback' not in result.stderr
    assert not list(tmp_path.glob('ckpt_*'))


def test_help_lists_settings():
    result = subprocess.run([sys.executable, 'train.py', '--help'], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for key in ('memory_layer', 'memory_offset', 'memory_norm', 'dino_teacher', 'gradient_accumulation_steps'):
        assert f'--{key}=' in result.stdout
    assert 'hidden-state index' in result.stdout  # comments become help text
