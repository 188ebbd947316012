"""Fault injection: killed runs, failed saves, dead ranks, corrupt data, bad input and non-finite losses.

Each test makes a fault happen the way it happens in a real run: SIGKILL, a file-size limit, a cut
or altered file, a bad argument. The repo must then recover exactly, or stop with a one-line error
that names the value and the fix. FAULTS.md lists the fault classes and their tests.

Crashes use train.py's test-only hook TRAIN_TEST_FAULT_AT=POINT:ITER[:RANK[:hang]], which makes a
rank SIGKILL itself (or hang) at a named point. Training runs are tiny random models on CPU with
the 1,024-piece tokenizer of the small_data fixture, one thread each so that runs compare bitwise.
"""

import hashlib
import json
import os
import pickle
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from conftest import read_log
from model import Gemma, GemmaConfig, gemma3_layer_types, list_checkpoints, newest_checkpoint
from train import FAULT_TEST_ENV, NAN_TEST_ENV

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / 'config' / 'tiny.py')
RUN_ARGS = ['--max_iters=8', '--ckpt_interval=2', '--eval_interval=2']
# Nothing may reach the network: the hub is offline and its endpoint is a loopback address.
OFFLINE_ENV = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'HF_ENDPOINT': 'http://127.0.0.1:9',
               'WANDB_MODE': 'offline', 'OMP_NUM_THREADS': '1'}

# -----------------------------------------------------------------------------
# helpers


def run(cmd, env=None, timeout=300):
    """Run cmd in its own process group from the repo root; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **OFFLINE_ENV, **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers are in the same group
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} still ran after {timeout} s\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_train(args, small_data, out_dir, env=None, expect_rc=0, nproc=0, prefix=(), timeout=300):
    """Run `python train.py config/tiny.py ARGS` (under torchrun when nproc > 0); check the exit status."""
    launcher = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
                                   if nproc else [])
    cmd = list(prefix) + launcher + ['train.py', TINY, f'--out_dir={out_dir}'] + small_data + args
    result = run(cmd, env, timeout)
    if expect_rc is not None:
        assert result.returncode == expect_rc, \
            f"exit {result.returncode}, expected {expect_rc}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def error_line(stderr):
    """Return the one line of an `error: ...` exit; fail if stderr has a traceback or more lines."""
    assert 'Traceback' not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith('error: '), lines[0]
    return lines[0]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_state(a, b, where):
    """Check that two checkpoints hold bitwise equal model, memory-loss and optimizer states."""
    for key in ('model', 'memory', 'optimizer', 'best_val_loss', 'iter'):
        assert_bitwise_equal(a[key], b[key], f"{where}:{key}")


def assert_bitwise_equal(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(*folders):
    """Return {path: (size, mtime_ns)} for every file under the given folders (empty folders do not count)."""
    found = {}
    for folder in folders:
        for path in Path(folder).rglob('*'):
            if not path.is_dir():
                stat = path.stat()
                found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


def cut(path, fraction=0.5):
    """Cut a file to a fraction of its size, as a write that died halfway leaves it."""
    size = Path(path).stat().st_size
    with open(path, 'r+b') as f:
        f.truncate(int(size * fraction))


@pytest.fixture(scope='module')
def reference(small_data, tmp_path_factory):
    """An uninterrupted run of RUN_ARGS that keeps every checkpoint (2, 4, 6 and 8)."""
    out = tmp_path_factory.mktemp('reference')
    run_train(RUN_ARGS + ['--keep_last=10'], small_data, out)
    assert [p.name for p in list_checkpoints(out)] == [f'ckpt_00000{i}.pt' for i in (2, 4, 6, 8)]
    return out

# -----------------------------------------------------------------------------
# crashes: SIGKILL at named points, then --init_from=resume


# (fault, what else breaks before the next resume, iteration the next resume must start from)
CRASHES = [
    ('backward:3', None, 2),              # gradients of a step half accumulated
    ('ckpt_synced:4', 'cut temp', 2),     # temp file then cut in half, as a kill inside torch.save leaves it
    ('eval:4', None, 2),                  # after the evaluation, before the save
    ('ckpt_synced:4', None, 2),           # the temp file complete, not yet renamed
    ('ckpt_renamed:4', 'cut newest', 2),  # renamed, ckpt 2 not yet deleted; then ckpt 4 is cut short
    ('step:5', None, 4),                  # optimizer stepped, memory-loss statistics not yet updated
    ('log:5', None, 4),                   # the step's log lines written
    ('ckpt_saved:6', None, 6),            # saved and rotated
    ('eval:6', None, 6),                  # the first evaluation of a resumed run
    ('ckpt_renamed:8', None, 8),          # the final checkpoint renamed, ckpt 6 not yet deleted
]


def test_killed_runs_resume_bit_identical(small_data, reference, tmp_path):
    """Kill one run at 10 points in turn; every resume continues exactly as the uninterrupted run."""
    args = RUN_ARGS + ['--keep_last=1']
    init, resume_from, previous_damage = [], None, None  # the first run starts from scratch, later runs resume
    for fault, damage, next_resume in CRASHES:
        result = run_train(args + init, small_data, tmp_path, env={FAULT_TEST_ENV: fault}, expect_rc=-signal.SIGKILL)
        point, it = fault.split(':')
        assert f"test fault: rank 0 is killed at {point}, iteration {it}" in result.stdout
        if resume_from is not None:
            assert f"ckpt_{resume_from:06d}.pt (iteration {resume_from})" in result.stdout, fault
        if previous_damage == 'cut newest':
            assert re.search(r"skipping checkpoint: \S*ckpt_000004\.pt could not be read", result.stderr), result.stderr
        for path in list_checkpoints(tmp_path):  # what each resumed run saved equals the uninterrupted run's
            assert_same_state(load(path), load(reference / path.name), f"{fault} {path.name}")

        if damage == 'cut temp':
            temps = list(tmp_path.glob('ckpt_000004.pt.tmp*'))
            assert len(temps) == 1, temps
            cut(temps[0])
        elif damage == 'cut newest':
            cut(tmp_path / 'ckpt_000004.pt')
        init, resume_from, previous_damage = ['--init_from=resume'], next_resume, damage

    # the last resume finds the final checkpoint and only evaluates
    final = run_train(args + init, small_data, tmp_path)
    assert "ckpt_000008.pt (iteration 8)" in final.stdout
    assert "done: 0 iterations" in final.stdout
    assert_same_state(load(tmp_path / 'ckpt_000008.pt'), load(reference / 'ckpt_000008.pt'), 'final')
    assert [p.name for p in list_checkpoints(tmp_path)] == ['ckpt_000006.pt', 'ckpt_000008.pt']
    assert not list(tmp_path.glob('*.tmp*')), "temporary files of killed saves are left behind"
    log, reference_log = read_log(tmp_path), read_log(reference)
    for it in range(8):
        for key in ('loss', 'xent', 'mem', 'grad_norm'):
            assert log[it][key] == reference_log[it][key], (it, key)
    for it in range(0, 9, 2):  # evaluations, including those that ran right after a resume
        for key in ('val_xent', 'val_mem', 'val_loss'):
            assert log[it][key] == reference_log[it][key], (it, key)


def test_kill_before_first_checkpoint(small_data, tmp_path):
    """With no checkpoint yet, a resume stops with a one-line error and changes nothing in out_dir."""
    run_train(RUN_ARGS, small_data, tmp_path, env={FAULT_TEST_ENV: 'step:0'}, expect_rc=-signal.SIGKILL)
    assert not list_checkpoints(tmp_path)
    before = snapshot(tmp_path)
    result = run_train(RUN_ARGS + ['--init_from=resume'], small_data, tmp_path, expect_rc=2)
    line = error_line(result.stderr)
    assert f"no readable ckpt_*.pt in {tmp_path} (0 found)" in line
    assert "train with out_dir=" in line
    assert snapshot(tmp_path) == before


def test_failed_save_keeps_previous_checkpoint(small_data, reference, tmp_path):
    """A write that fails mid-checkpoint (file-size limit) stops the run; the previous checkpoint is kept."""
    run_train(RUN_ARGS, small_data, tmp_path, env={FAULT_TEST_ENV: 'step:3'}, expect_rc=-signal.SIGKILL)
    previous = tmp_path / 'ckpt_000002.pt'
    digest = sha256(previous)
    # RLIMIT_FSIZE makes write() fail with EFBIG once a file passes half a checkpoint: the same OSError
    # path as a full disk (ENOSPC), without filling one. Python ignores SIGXFSZ, so the write raises.
    limit_kib = previous.stat().st_size // 2048
    result = run_train(RUN_ARGS + ['--init_from=resume'], small_data, tmp_path, expect_rc=2,
                       prefix=['bash', '-c', f'ulimit -f {limit_kib} && exec "$@"', 'bash'])
    line = error_line(result.stderr)
    assert "saving the checkpoint of iteration 4" in line
    assert "File too large" in line
    assert f"the last checkpoint {previous} is intact" in line
    assert "--init_from=resume" in line

    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt_000002.pt', 'log.txt']  # no temp file
    assert sha256(previous) == digest
    path, ckpt = newest_checkpoint(tmp_path)
    assert path == previous
    assert_same_state(ckpt, load(reference / 'ckpt_000002.pt'), 'kept')

# -----------------------------------------------------------------------------
# distributed: a rank that dies or hangs ends the job


def test_torchrun_dead_rank_stops_job(small_data, tmp_path):
    start = time.monotonic()
    result = run_train(RUN_ARGS, small_data, tmp_path, env={FAULT_TEST_ENV: 'step:1:1'}, nproc=2,
                       expect_rc=None, timeout=240)
    seconds = time.monotonic() - start
    assert result.returncode != 0
    assert seconds < 120, f"the job took {seconds:.0f} s to stop"
    assert "test fault: rank 1 is killed at step, iteration 1" in result.stdout
    # torchrun's summary names the rank that failed first and its signal
    root_cause = result.stderr.split('Root Cause')[-1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*-9", root_cause), result.stderr[-3000:]
    assert 'SIGKILL' in root_cause


def test_torchrun_hung_rank_times_out(small_data, tmp_path):
    """A rank that hangs (alive, never reaching the collective) ends the job after ddp_timeout_minutes."""
    start = time.monotonic()
    result = run_train(RUN_ARGS + ['--ddp_timeout_minutes=0.1'], small_data, tmp_path,
                       env={FAULT_TEST_ENV: 'step:1:1:hang'}, nproc=2, expect_rc=None, timeout=240)
    seconds = time.monotonic() - start
    assert result.returncode != 0
    assert seconds < 120, f"the job took {seconds:.0f} s to stop"
    assert "test fault: rank 1 hangs at step, iteration 1" in result.stdout
    assert re.search(r"Timed out waiting 6000ms", result.stderr), result.stderr[-3000:]
    root_cause = result.stderr.split('Root Cause')[-1]
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*exitcode\s*:\s*1", root_cause), result.stderr[-3000:]

# -----------------------------------------------------------------------------
# non-finite losses


def test_non_finite_loss_stops_run(small_data, reference, tmp_path):
    """A NaN loss (injected) and an Inf loss (an overflowing weight) each stop the run in their step."""
    result = run_train(RUN_ARGS + ['--keep_last=10'], small_data, tmp_path, env={NAN_TEST_ENV: '3'}, expect_rc=2)
    line = error_line(result.stderr)
    assert "loss is not finite at iteration 3 (loss nan" in line
    assert f"the last checkpoint is {tmp_path / 'ckpt_000002.pt'}" in line
    assert [p.name for p in list_checkpoints(tmp_path)] == ['ckpt_000002.pt']
    assert not list(tmp_path.glob('*.tmp*'))
    assert_same_state(load(tmp_path / 'ckpt_000002.pt'), load(reference / 'ckpt_000002.pt'), 'nan')
    assert max(read_log(tmp_path)) == 2  # nothing logged for the failed step

    # xent_weight 1e38 times a cross-entropy of ~7 overflows float32: the loss of iteration 2 is Inf
    digest = sha256(tmp_path / 'ckpt_000002.pt')
    log_lines = len((tmp_path / 'log.txt').read_text().splitlines())
    result = run_train(RUN_ARGS + ['--keep_last=10', '--init_from=resume', '--xent_weight=1e38'], small_data,
                       tmp_path, expect_rc=2)
    line = error_line(result.stderr)
    assert "loss is not finite at iteration 2 (loss inf" in line
    assert [p.name for p in list_checkpoints(tmp_path)] == ['ckpt_000002.pt']
    assert sha256(tmp_path / 'ckpt_000002.pt') == digest
    added = (tmp_path / 'log.txt').read_text().splitlines()[log_lines:]
    assert added and all(entry.startswith('2 val_') for entry in added), added  # the evaluation only

# -----------------------------------------------------------------------------
# corrupt or stale prepared data


@pytest.fixture(scope='module')
def passages(small_data, tmp_path_factory):
    """A --dataset folder of 12 Gutenberg passages (train/val/test .jsonl) and the small tokenizer folder."""
    words = data.prepare(verbose=False).text('train', 1).split()
    root = tmp_path_factory.mktemp('passages')
    for split, first in (('train', 0), ('val', 8), ('test', 10)):
        lines = [json.dumps({'text': ' '.join(words[200 * k:200 * k + 200]), 'title': f'passage {k}'})
                 for k in range(first, first + (8 if split == 'train' else 2))]
        (root / f'{split}.jsonl').write_text('\n'.join(lines) + '\n')
    tokenizer = small_data[0].split('=', 1)[1]
    return root, tokenizer


def prepare_passages(passages, data_dir, tokenizer=None):
    root, small_tokenizer = passages
    return data.prepare(dataset=str(root), tokenizer=tokenizer or small_tokenizer, data_dir=str(data_dir),
                        verbose=False)


def assert_rebuilt(passages, data_dir, folder, capsys, *fragments, tokenizer=None):
    """Prepare again: a warning naming the damage, then a folder whose files all match a clean build."""
    rebuilt = prepare_passages(passages, data_dir, tokenizer)
    warning = capsys.readouterr().err
    assert warning.startswith('warning: '), warning
    assert 'rebuilding it' in warning
    for fragment in fragments:
        assert fragment in warning, (fragment, warning)
    assert rebuilt.path == folder
    for name, shard in {**rebuilt.index['shards'], **rebuilt.index['text_files']}.items():
        assert sha256(folder / name) == shard['sha256'], name
    assert sorted(p.name for p in folder.glob('*.bin')) == sorted(rebuilt.index['shards'])
    return rebuilt


def test_truncated_shard_rebuilt(passages, tmp_path, capsys):
    folder = prepare_passages(passages, tmp_path).path
    shard = folder / 'train_0000.bin'
    cut(shard)
    with pytest.raises(data.CorruptDataError, match=re.escape(f"shard {shard} has")) as error:
        data.DataFolder(folder)
    assert f"delete {folder} and run data.py again" in str(error.value)
    assert_rebuilt(passages, tmp_path, folder, capsys, str(shard), 'truncated')


def test_flipped_bytes_rebuilt_by_new_process(passages, tmp_path):
    """Bit rot keeps a shard's size and mtime; the next process hashes the shard and rebuilds the folder."""
    root, tokenizer = passages
    folder = prepare_passages(passages, tmp_path).path
    shard = folder / 'val_0000.bin'
    digest, stat = sha256(shard), shard.stat()
    with open(shard, 'r+b') as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run([sys.executable, 'data.py', f'--dataset={root}', f'--tokenizer={tokenizer}', f'--data_dir={tmp_path}'])
    assert result.returncode == 0, result.stderr
    assert f"warning: shard {shard} does not match the sha256 in its index" in result.stderr
    assert "rebuilding it" in result.stderr
    assert sha256(shard) == digest


def test_unlisted_shard_rebuilt(passages, tmp_path, capsys):
    """A shard file the index does not list (a mixed-up folder) is detected and the folder rebuilt."""
    folder = prepare_passages(passages, tmp_path).path
    shutil.copy(folder / 'train_0000.bin', folder / 'train_0001.bin')
    assert_rebuilt(passages, tmp_path, folder, capsys, str(folder / 'train_0001.bin'), 'not in the index')
    assert not (folder / 'train_0001.bin').exists()


def test_missing_shard_rebuilt(passages, tmp_path, capsys):
    folder = prepare_passages(passages, tmp_path).path
    (folder / 'test_0000.bin').unlink()
    assert_rebuilt(passages, tmp_path, folder, capsys, f"shard missing: {folder / 'test_0000.bin'}")


def test_other_tokenizer_cache_rebuilt(passages, small_data, tmp_path, capsys):
    """A folder whose index or tokenizer.model comes from another tokenizer is rebuilt for the requested one."""
    import sentencepiece as spm
    other = tmp_path / 'other_tokenizer'
    other.mkdir()
    texts = [json.loads(line)['text'] for line in (passages[0] / 'train.jsonl').read_text().splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(other / 'tokenizer'),
                                   vocab_size=512, model_type='bpe', bos_id=2, eos_id=1, pad_id=0, unk_id=3,
                                   byte_fallback=True, num_threads=1, minloglevel=2)
    mine = prepare_passages(passages, tmp_path / 'data').path
    theirs = prepare_passages(passages, tmp_path / 'data', tokenizer=str(other)).path
    assert mine != theirs

    # the other tokenizer's folder copied under this tokenizer's name
    shutil.rmtree(mine)
    shutil.copytree(theirs, mine)
    rebuilt = assert_rebuilt(passages, tmp_path / 'data', mine, capsys, str(mine / 'index.pkl'),
                             'was built with another tokenizer')
    assert rebuilt.vocab_size == 1024

    # only tokenizer.model swapped
    shutil.copy(theirs / 'tokenizer.model', mine / 'tokenizer.model')
    assert_rebuilt(passages, tmp_path / 'data', mine, capsys, str(mine / 'tokenizer.model'),
                   'is not the tokenizer of the index')


class MakeFolder:
    """Pickles as a call of os.mkdir(path): unpickling with plain pickle would create the folder."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_index_pickle_with_code_rejected(passages, tmp_path, capsys):
    folder = prepare_passages(passages, tmp_path).path
    marker = tmp_path / 'executed'
    index = data.read_index(folder / 'index.pkl')
    index['created'] = MakeFolder(str(marker))
    (folder / 'index.pkl').write_bytes(pickle.dumps(index, protocol=4))

    with pytest.raises(data.CorruptDataError, match='posix.mkdir, which is not allowed'):
        data.DataFolder(folder)
    assert_rebuilt(passages, tmp_path, folder, capsys, str(folder / 'index.pkl'), 'not allowed in an index file')
    assert not marker.exists(), "the index's code ran"

# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, no partial files


@pytest.fixture(scope='module')
def bad_inputs(small_data, reference, tmp_path_factory):
    """Files for the bad-input table: folders, damaged weights, a non-Gemma GGUF, a checkpoint folder."""
    from gguf import GGUFWriter
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp('bad_inputs')
    paths = {'tok': small_data[0].split('=', 1)[1], 'data': small_data[1].split('=', 1)[1],
             'ckpt': str(reference), 'missing': str(root / 'missing'), 'empty': str(root / 'empty')}
    (root / 'empty').mkdir()

    latin1 = root / 'latin1'
    (latin1 / 'train').mkdir(parents=True)
    (latin1 / 'train' / 'play.txt').write_bytes('Ophelia: Good my lord, how does your honour?'.encode() +
                                                ' caf\xe9 '.encode('latin-1') + b'for this many a day?\n')
    paths['latin1'] = str(latin1)
    paths['latin1_file'] = str(latin1 / 'train' / 'play.txt')

    bad_jsonl = root / 'bad_jsonl'
    bad_jsonl.mkdir()
    (bad_jsonl / 'train.jsonl').write_text('{"text": "To be, or not to be"}\n{"text": oops}\n')
    paths['bad_jsonl'] = str(bad_jsonl / 'train.jsonl')

    llama = root / 'llama.gguf'
    writer = GGUFWriter(str(llama), 'llama')
    writer.add_block_count(1)
    writer.add_tensor('token_embd.weight', np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    paths['llama_gguf'] = str(llama)
    (root / 'garbage.gguf').write_bytes(b'not a gguf file at all' * 10)
    paths['garbage_gguf'] = str(root / 'garbage.gguf')

    # a weights folder with one tensor missing
    config = GemmaConfig(vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                         sliding_window=8, layer_types=gemma3_layer_types(2, 2), rope_local_base=1e4,
                         rope_global_base=1e6, rms_norm_eps=1e-6, max_position_embeddings=128, bos_token_id=2,
                         eos_token_id=1, pad_token_id=0)
    holey = root / 'holey'
    holey.mkdir()
    (holey / 'config.json').write_text(json.dumps(config.to_hf_dict()))
    weights = {f'model.{k}': v for k, v in Gemma(config).state_dict().items() if k != 'layers.1.mlp.up_proj.weight'}
    save_file(weights, holey / 'model.safetensors')
    shutil.copy(paths['tok'] + '/tokenizer.model', holey / 'tokenizer.model')
    paths['holey'] = str(holey)

    cut_only = root / 'cut_only'
    cut_only.mkdir()
    shutil.copy(reference / 'ckpt_000002.pt', cut_only / 'ckpt_000002.pt')
    cut(cut_only / 'ckpt_000002.pt')
    paths['cut_only'] = str(cut_only)
    paths['existing'] = str(root / 'empty')
    return paths


TRAIN = [TINY, '--out_dir={out}', '--tokenizer={tok}', '--data_dir={data}']
DATA = ['--tokenizer={tok}', '--data_dir={out}/data']
EVAL = ['--data_dir={data}', '--device=cpu']

# (script, arguments, extra environment, fragments the error line must contain: the value, then the fix)
BAD_INPUT = [
    # train.py
    ('train.py', TRAIN + ['--memory_layers=2'], {}, ['--memory_layers', 'did you mean --memory_layer']),
    ('train.py', TRAIN + ['--block_size=big'], {}, ["'big'", 'expected int']),
    ('train.py', TRAIN + ['--memory_layer=5'], {}, ['memory_layer=5', 'valid indices are 0..4']),
    ('train.py', TRAIN + ['--memory_layer=-1'], {}, ['memory_layer=-1', 'valid indices are 0..4']),
    ('train.py', TRAIN + ['--memory_offset=64'], {}, ['memory_offset=64', 'lower memory_offset']),
    ('train.py', TRAIN + ['--memory_offset=0'], {}, ['memory_offset=0', '1 <= memory_offset']),
    ('train.py', TRAIN + ['--memory_weight=-0.5'], {}, ['memory_weight=-0.5', 'use a weight >= 0']),
    ('train.py', TRAIN + ['--dtype=float16'], {}, ['float16', 'use bfloat16 or float32']),
    ('train.py', TRAIN + ['--gradient_accumulation_steps=3'], {'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '2'},
     ['gradient_accumulation_steps=3', 'WORLD_SIZE=2', 'pick a multiple']),
    ('train.py', TRAIN + ['--batch_size=0'], {}, ['batch_size=0', 'positive integer']),
    ('train.py', TRAIN + ['--keep_last=0'], {}, ['keep_last=0', 'positive integer']),
    ('train.py', TRAIN + ['--ddp_timeout_minutes=0'], {}, ['ddp_timeout_minutes=0', 'positive number']),
    ('train.py', TRAIN + ['--optimizer=sgd'], {}, ["optimizer='sgd'", 'use adamw or adafactor']),
    ('train.py', TRAIN + ['--memory_loss=cosine'], {}, ["memory_loss='cosine'", 'use l1 or dino']),
    ('train.py', TRAIN + ['--xent_weight=0', '--memory_weight=0'], {}, ['nothing would be trained', 'set xent_weight']),
    ('train.py', TRAIN + ['{missing}.py'], {}, ['{missing}.py', 'pass an existing .py file']),
    ('train.py', TRAIN + ['--dataset={missing}'], {}, ['{missing}', 'pass an existing folder']),
    ('train.py', TRAIN + ['--dataset={empty}'], {}, ['{empty}', 'add documents']),
    ('train.py', TRAIN + ['--dataset={latin1}'], {}, ['{latin1_file}: invalid UTF-8 at byte offset 48',
                                                      'encoding_errors']),
    ('train.py', TRAIN + ['--tokenizer={empty}'], {}, ['{empty}/tokenizer.model', 'pass a folder that contains']),
    ('train.py', TRAIN + ['--init_from=resume'], {}, ['checkpoint not found: {out}', 'the out_dir of a training run']),
    ('train.py', TRAIN + ['--init_from={missing}.gguf'], {}, ['{missing}.gguf', 'pass an existing .gguf path']),
    ('train.py', TRAIN + ['--init_from=google/gemma-3-270m'], {}, ["'google/gemma-3-270m'", 'pass its local folder']),
    ('train.py', TRAIN + ['--init_from={llama_gguf}'], {}, ["general.architecture='llama'", 'pass a gemma3 export']),
    ('train.py', TRAIN + ['--init_from={garbage_gguf}'], {}, ['{garbage_gguf} could not be read as a GGUF file',
                                                               'pass a valid .gguf']),
    ('train.py', TRAIN + ['--init_from={holey}'], {}, ['{holey}', 'layers.1.mlp.up_proj.weight', 'export them again']),
    ('train.py', TRAIN + ['--eval_iters=0'], {}, ['eval_iters=0', 'or None']),
    # data.py
    ('data.py', DATA + ['--dataset={missing}'], {}, ['{missing}', 'pass an existing folder']),
    ('data.py', DATA + ['--dataset={empty}'], {}, ['{empty}', 'add documents']),
    ('data.py', DATA + ['--dataset={latin1}'], {}, ['{latin1_file}: invalid UTF-8', 'encoding_errors']),
    ('data.py', DATA + ['--dataset={bad_jsonl}'], {}, ['{bad_jsonl} line 2: invalid JSON', 'each line must be']),
    ('data.py', DATA + ['--dataset=gutenbergg'], {}, ["'gutenbergg'", 'pass one of gutenberg']),
    ('data.py', DATA + ['--dataset=pg19', '--pg19_repo={empty}'], {}, ['{empty}', 'name the']),
    ('data.py', DATA + ['--val_fraction=1.5'], {}, ['val_fraction', '1.5']),
    ('data.py', DATA + ['--encoding_errors=ignore'], {}, ["'ignore'", "'strict' or 'replace'"]),
    ('data.py', DATA + ['--max_docs=0'], {}, ['max_docs', 'positive int']),
    ('data.py', ['--tokenizer=google/gemma-3-270m', '--data_dir={out}/data'], {},
     ["'google/gemma-3-270m'", 'pass its local folder']),
    # perplexity.py
    ('perplexity.py', EVAL + ['--ckpt={empty}'], {}, ['no readable ckpt_*.pt in {empty}', 'train with out_dir=']),
    ('perplexity.py', EVAL + ['--ckpt={missing}'], {}, ['checkpoint not found: {missing}', 'pass a ckpt_*.pt file']),
    ('perplexity.py', EVAL + ['--ckpt={cut_only}'], {}, ['{cut_only} (1 found)', 'pass a checkpoint file']),
    ('perplexity.py', EVAL + ['--ckpt={ckpt}', '--window=100000'], {}, ['window=100000', '32768']),
    ('perplexity.py', EVAL + ['--ckpt={ckpt}', '--stride=-1'], {}, ['stride=-1', 'positive int']),
    ('perplexity.py', EVAL + ['--ckpt={ckpt}', '--split=dev'], {}, ["'dev'", 'use one of train, val, test']),
    ('perplexity.py', EVAL + ['--dtype=float16'], {}, ["'float16'", 'use auto, float32 or bfloat16']),
    ('perplexity.py', EVAL + ['--init_from={holey}'], {}, ['{holey}', 'export them again']),
    # downstream.py
    ('downstream.py', ['--tasks=,'], {}, ['tasks is empty', 'pass --tasks=']),
    ('downstream.py', ['--limit=-1'], {}, ['limit=-1', 'positive int']),
    ('downstream.py', ['--ckpt={empty}'], {}, ['no readable ckpt_*.pt in {empty}', 'train with out_dir=']),
    ('downstream.py', ['--ckpt={ckpt}', '--task_dir={missing}', '--device=cpu'], {},
     ['task_dir not found: {missing}', 'pass a folder']),
    # export.py
    ('export.py', ['--ckpt={ckpt}'], {}, ['--out is required', 'pass the folder']),
    ('export.py', ['--ckpt={ckpt}', '--out={existing}'], {}, ['{existing} exists', '--overwrite']),
    ('export.py', ['--ckpt={ckpt}', '--out={out}/hf', '--dtype=float16'], {}, ["'float16'", 'use float32 or bfloat16']),
    ('export.py', ['--ckpt={empty}', '--out={out}/hf'], {}, ['no readable ckpt_*.pt in {empty}', 'train with']),
    ('export.py', ['--init_from={llama_gguf}', '--out={out}/hf'], {}, ["general.architecture='llama'", 'gemma3']),
    # nihs.py
    ('nihs.py', ['--ckpt={ckpt}', '--lengths=100000', '--device=cpu'], {}, ['length 100000', 'up to 32768']),
    ('nihs.py', ['--needle=fish'], {}, ["'fish'", '--needle=uuid']),
    ('nihs.py', ['--depths=0,150'], {}, ['[0, 150]', 'integer percents in 0..100']),
    ('nihs.py', ['--ckpt={empty}', '--device=cpu'], {}, ['no readable ckpt_*.pt in {empty}', 'train with out_dir=']),
    ('nihs.py', ['--ckpt={ckpt}', '--dtype=float16', '--device=cpu'], {}, ['float16', 'use bfloat16 or float32']),
    ('nihs.py', ['--ckpt={ckpt}', '--split=train', '--device=cpu'], {}, ["training text", '--split=test']),
    ('nihs.py', ['--compare', 'a.json'], {}, ['--compare needs two results', '--compare a.json b.json']),
    ('nihs.py', ['--compare={missing}/a.json,{missing}/b.json'], {}, ['{missing}/a.json', 'results.json written']),
]


def case_id(case):
    script, args, _, _ = case
    return f"{script.removesuffix('.py')}:{' '.join(a for a in args if a not in TRAIN + DATA + EVAL)}"


@pytest.mark.filterwarnings('ignore:skipping checkpoint')  # the cut checkpoint case warns before its error
@pytest.mark.parametrize('case', BAD_INPUT, ids=[case_id(c) for c in BAD_INPUT])
def test_bad_input_one_line_error(case, bad_inputs, tmp_path, monkeypatch, capsys):
    """Run the script's __main__ in this process (as `python SCRIPT ARGS` would) and check its exit."""
    import huggingface_hub.constants
    assert huggingface_hub.constants.HF_HUB_OFFLINE, "the hub cases must not reach the network"
    script, args, env, fragments = case
    if '--device=cuda' in args and torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    paths = {**bad_inputs, 'out': str(tmp_path / 'out')}
    argv = [a.format(**paths) for a in args]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # scripts write default outputs under ./out
    monkeypatch.setattr(sys, 'argv', [script] + argv)
    watched = [tmp_path, paths['ckpt'], paths['data'], bad_inputs['empty']]
    before = snapshot(*watched)

    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name='__main__')
    assert exit_info.value.code == 2
    line = error_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment.format(**paths) in line, (fragment, line)
    assert snapshot(*watched) == before, "the failed run left files behind"
