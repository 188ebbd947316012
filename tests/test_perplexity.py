"""perplexity.py: the window plan, metrics, errors, the CLI, and the real 270M against transformers."""

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import data
from model import Gemma, GemmaConfig, gemma3_layer_types, save_checkpoint
from perplexity import EvalDocument, Window, document_from_text, evaluate_perplexity, make_batch, plan_windows

ROOT = Path(__file__).resolve().parent.parent
BOS = 2


def tiny_model(seed=0, window=8, max_positions=4096):
    """A random 3-layer Gemma with the real vocabulary size, so real token ids fit; norms randomized."""
    torch.manual_seed(seed)
    config = GemmaConfig(vocab_size=262_144, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                         sliding_window=window, layer_types=gemma3_layer_types(3, pattern=3),
                         rope_local_base=10_000.0, rope_global_base=1_000_000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=max_positions, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = Gemma(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.normal_(0.0, 0.3)
    return model


def transformers_copy(model):
    """transformers' Gemma3ForCausalLM holding the same weights: the independent reference."""
    ref = Gemma3ForCausalLM(Gemma3TextConfig(**model.config.to_hf_dict()))
    missing, unexpected = ref.load_state_dict({'model.' + k: v for k, v in model.state_dict().items()}, strict=False)
    assert missing == ['lm_head.weight']  # the head is tied to the embedding
    assert not unexpected
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    return ref.eval()


@torch.no_grad()
def reference_nll(ref, doc, window, stride):
    """Summed NLL of a document with transformers' full logits, one window at a time.

    Written from the definition: window k contains BOS + doc[begin : begin + window - 1] with
    begin = k * stride, except that the window that reaches the end is moved back to contain
    `window` tokens. Each target is scored in the first window that contains it.
    """
    doc = [int(t) for t in doc]
    total, scored_end, count = 0.0, 0, 0
    for begin in range(0, len(doc), stride):
        end = min(begin + window, len(doc))
        if end == len(doc):
            begin = max(0, end - window)
        logits = ref(torch.tensor([[BOS] + doc[begin:end - 1]])).logits[0]
        rows = torch.arange(scored_end, end)  # input position j - begin predicts doc[j]
        logp = torch.log_softmax(logits[rows - begin].double(), dim=-1)
        total -= logp[torch.arange(len(rows)), torch.tensor(doc[scored_end:end])].sum().item()
        count += len(rows)
        scored_end = end
        if end == len(doc):
            break
    assert count == len(doc)
    return total

# -----------------------------------------------------------------------------
# the window plan


@pytest.mark.parametrize('window', [1, 2, 5, 16, 64])
def test_every_target_scored_once(window):
    for length in (1, 2, 3, 7, 16, 17, 50, 129):
        for stride in sorted({s for s in (1, 2, window // 2, window - 1, window) if 1 <= s <= window}):
            plans = plan_windows(length, window, stride)
            counts = Counter(j for start, end, first in plans for j in range(first, end))
            assert sorted(counts) == list(range(length)), (length, window, stride)
            assert set(counts.values()) == {1}, (length, window, stride)
            for start, end, first in plans:
                assert 0 <= start <= first < end <= length
                assert end - start <= window  # BOS + (end - start - 1) document tokens
                # each scored target has window - stride earlier tokens as context, or all of them near the start
                assert first - start >= min(first, window - stride), (length, window, stride, start, first)


def test_last_window_is_full_length():
    plans = plan_windows(1000, 600, 200)
    assert plans == [(0, 600, 0), (200, 800, 600), (400, 1000, 800)]
    assert plan_windows(650, 600, 200) == [(0, 600, 0), (50, 650, 600)]  # moved back: 550 tokens of context


def test_batch_starts_with_bos_and_masks_context():
    doc = torch.arange(100, 120)
    x, y = make_batch([Window(0, 5, 15, 9), Window(0, 0, 3, 0)], [doc], bos_id=BOS, pad_id=0, device='cpu')
    assert x.shape == y.shape == (2, 10)
    assert x[0].tolist() == [BOS] + list(range(105, 114))
    assert y[0].tolist() == [-1] * 4 + list(range(109, 115))
    assert x[1].tolist() == [BOS, 100, 101] + [0] * 7
    assert y[1].tolist() == [100, 101, 102] + [-1] * 7


@pytest.fixture(scope='module')
def local_docs(tmp_path_factory):
    """A folder of made-up documents in train/val/test subfolders, prepared by data.py."""
    root = tmp_path_factory.mktemp('local')
    words = 'the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial buffoons'.split()
    rng = np.random.default_rng(0)
    for split in ('train', 'val', 'test'):
        (root / 'docs' / split).mkdir(parents=True)
        for i, n in enumerate((300, 37, 120)):
            (root / 'docs' / split / f'{i}.txt').write_text(' '.join(rng.choice(words, size=n)) + '\n')
    folder = data.prepare(dataset=str(root / 'docs'), data_dir=str(root / 'prepared'), verbose=False)
    return root, folder


def test_windows_match_data_loader_eval_batches(local_docs):
    """Same inputs and targets as data.py's evaluation windows."""
    _, folder = local_docs
    docs = [torch.from_numpy(folder.document('test', i)) for i in range(folder.num_documents('test'))]
    for window, stride in ((64, 64), (64, 16), (100, 33)):
        windows = [Window(d, *p) for d, doc in enumerate(docs) for p in plan_windows(len(doc), window, stride)]
        batches = list(data.Loader(folder, 'test', batch_size=1, block_size=window).eval_batches(stride))
        assert len(batches) == len(windows)
        for w, batch in zip(windows, batches):
            x, y = make_batch([w], docs, BOS, folder.pad_id, 'cpu')
            n = x.shape[1]  # the Loader pads every window to block_size
            assert torch.equal(x[0], batch.x[0, :n])
            assert torch.equal(y[0], batch.y[0, :n])
            assert (batch.y[0, n:] == -1).all()

# -----------------------------------------------------------------------------
# evaluation on a tiny random model


def test_full_window_equals_unwindowed():
    model = tiny_model()
    ref = transformers_copy(model)
    docs = [torch.randint(3, 262_144, (n,)) for n in (40, 17, 2)]
    result = evaluate_perplexity(model, docs, window=64, stride=16, batch_size=3)
    assert result['windows'] == 3  # one window per document, because each document fits in the window
    for doc, entry in zip(docs, result['per_document']):
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.cat((torch.tensor([BOS]), doc))[None]).logits[0].double(), -1)
        expected = -logp[torch.arange(len(doc)), doc].sum().item()  # position j predicts doc[j]
        assert entry['tokens'] == len(doc)
        assert entry['nll'] == pytest.approx(expected, rel=1e-5)
    assert result['tokens'] == 59
    assert result['nll'] == pytest.approx(sum(e['nll'] for e in result['per_document']), rel=1e-12)


def test_strided_windows_equal_reference():
    model = tiny_model(window=8)
    ref = transformers_copy(model)
    doc = torch.randint(3, 262_144, (60,))
    for window, stride, length in ((32, 32, 60), (32, 8, 60), (20, 7, 60), (3, 1, 12)):
        result = evaluate_perplexity(model, [doc[:length]], window=window, stride=stride, batch_size=4)
        assert result['tokens'] == length
        expected = reference_nll(ref, doc[:length], window, stride)
        assert result['nll'] == pytest.approx(expected, rel=1e-5), (window, stride)


def test_padding_and_batch_size_do_not_change_results():
    model = tiny_model()
    docs = [torch.randint(3, 262_144, (n,)) for n in (70, 5, 33, 2, 64)]
    one = evaluate_perplexity(model, docs, window=32, stride=10, batch_size=1)
    many = evaluate_perplexity(model, docs, window=32, stride=10, batch_size=7)
    for a, b in zip(one['per_document'], many['per_document']):
        assert a['nll'] == pytest.approx(b['nll'], rel=1e-5)


def test_metrics_from_summed_nll():
    model = tiny_model()
    tok_docs = [EvalDocument(torch.randint(3, 262_144, (n,)), f'doc{n}', words=w, num_bytes=b)
                for n, w, b in ((50, 30, 170), (9, 4, 25))]
    result = evaluate_perplexity(model, tok_docs, window=16, stride=8)
    nll = result['nll']
    assert result['tokens'] == 59
    assert result['words'] == 34
    assert result['bytes'] == 195
    assert result['token_perplexity'] == pytest.approx(math.exp(nll / 59))
    assert result['word_perplexity'] == pytest.approx(math.exp(nll / 34))
    assert result['byte_perplexity'] == pytest.approx(math.exp(nll / 195))
    assert result['bits_per_byte'] == pytest.approx(nll / 195 / math.log(2))
    mean_of_means = sum(d['nll'] / d['tokens'] for d in result['per_document']) / 2
    assert math.log(result['token_perplexity']) != pytest.approx(mean_of_means)  # totals, not averaged means
    assert [d['title'] for d in result['per_document']] == ['doc50', 'doc9']
    plain = evaluate_perplexity(model, [d.ids for d in tok_docs], window=16, stride=8)
    assert 'word_perplexity' not in plain
    assert plain['nll'] == pytest.approx(nll)


def test_empty_inputs_rejected_with_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match='no documents to evaluate'):
        evaluate_perplexity(model, [], window=16)
    with pytest.raises(ValueError, match=r"document 'blank' has 0 token\(s\)"):
        evaluate_perplexity(model, [EvalDocument([5, 6]), EvalDocument([], 'blank')], window=16)
    with pytest.raises(ValueError, match=r'document #1 has 0 token\(s\)'):
        evaluate_perplexity(model, [[5, 6], []], window=16)
    with pytest.raises(ValueError, match=r'stride=17 is invalid.*window=16'):
        evaluate_perplexity(model, [[5, 6]], window=16, stride=17)
    with pytest.raises(ValueError, match=r'window=5000 is invalid.*\[1, 4096\]'):
        evaluate_perplexity(model, [[5, 6]], window=5000)


def test_one_token_document_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"document 'short' has 1 token\(s\); rolling perplexity needs at least 2"):
        evaluate_perplexity(model, [EvalDocument([5, 6, 7]), EvalDocument([1234], 'short')], window=16)


def test_two_token_document_is_scored_from_bos():
    model = tiny_model()
    ref = transformers_copy(model)
    result = evaluate_perplexity(model, [[1234, 99]], window=16)
    with torch.no_grad():
        logprobs = torch.log_softmax(ref(torch.tensor([[BOS, 1234]])).logits[0].double(), -1)
    expected = -(logprobs[0, 1234] + logprobs[1, 99]).item()
    assert result['tokens'] == 2
    assert result['windows'] == 1
    assert result['nll'] == pytest.approx(expected, rel=1e-5)

# -----------------------------------------------------------------------------
# the real 270M on real Gutenberg text


@pytest.fixture(scope='module')
def gutenberg_test():
    return data.prepare(dataset='gutenberg', verbose=False)


def test_real_270m_matches_transformers(real_model, gutenberg_test):
    """Rolling NLL on two real test-split excerpts equals transformers' Gemma 3 on the same weights."""
    ref = transformers_copy(real_model)
    tokenizer = gutenberg_test.tokenizer
    texts = [tokenizer.decode(gutenberg_test.document('test', i)[:n]) for i, n in ((0, 600), (1, 120))]
    docs = [document_from_text(tokenizer, text, f'excerpt {i}') for i, text in enumerate(texts)]
    assert [len(d.ids) for d in docs] == [600, 120]
    # a window above the 512-token sliding window, so the global layers carry the longest context
    result = evaluate_perplexity(real_model, docs, window=520, stride=260, batch_size=2)
    assert result['windows'] == 3
    for doc, entry in zip(docs, result['per_document']):
        expected = reference_nll(ref, doc.ids, 520, 260)
        assert entry['nll'] == pytest.approx(expected, rel=1e-4)
    assert result['words'] == sum(len(t.split()) for t in texts)
    assert result['bytes'] == sum(len(t.encode('utf-8')) for t in texts)
    # Measured token perplexity ~30-40 on early-modern English; a broken forward gives thousands.
    assert 10 < result['token_perplexity'] < 100


# -----------------------------------------------------------------------------
# the command line


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'perplexity.py'), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_bad_input_prints_one_line(tmp_path):
    result = run_cli('--stride=-3')
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0
    assert 'Traceback' not in result.stderr
    assert 'stride=-3 is invalid' in result.stderr
    result = run_cli('--ckpt=' + str(tmp_path / 'missing'))
    assert result.returncode == 2
    assert 'checkpoint not found' in result.stderr
    assert 'Traceback' not in result.stderr


def test_cli_scores_split_and_writes_json(tmp_path, local_docs):
    """End to end on a tiny model saved by transformers, with the real tokenizer beside it."""
    root, folder = local_docs
    model = tiny_model()
    model_dir = tmp_path / 'tiny'
    transformers_copy(model).save_pretrained(model_dir)
    shutil.copy(folder.path / 'tokenizer.model', model_dir / 'tokenizer.model')
    out = tmp_path / 'result.json'
    common = [f'--init_from={model_dir}', f'--dataset={root / "docs"}', f'--data_dir={root / "prepared"}',
              '--window=64', '--stride=16', '--batch_size=3', f'--out_json={out}']
    result = run_cli(*common)
    assert result.returncode == 0, result.stderr
    assert 'token perplexity' in result.stdout
    assert 'bits per byte' in result.stdout
    report = json.loads(out.read_text())
    assert report['split'] == 'test'
    assert report['window'] == 64
    assert report['stride'] == 16
    assert report['tokens'] == folder.num_tokens('test')
    records = folder.records('test')
    assert report['words'] == sum(r['words'] for r in records)
    assert report['bytes'] == sum(r['bytes'] for r in records)
    docs = [folder.document('test', i) for i in range(len(records))]
    expected = evaluate_perplexity(Gemma.from_pretrained(model_dir), docs, window=64, stride=16)
    assert report['nll'] == pytest.approx(expected['nll'], rel=1e-6)

    # --max_tokens cuts the first document; its word and byte counts then come from the decoded prefix
    assert len(docs[0]) > 100
    result = run_cli(*common, '--max_tokens=100')
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report['tokens'] == 100
    assert report['documents'] == 1
    cut_text = folder.tokenizer.decode(docs[0][:100])
    assert report['words'] == len(cut_text.split())
    assert report['bytes'] == len(cut_text.encode('utf-8'))


def test_cli_unknown_split_and_empty_split(tmp_path, local_docs):
    root, _ = local_docs
    result = run_cli(f'--dataset={root / "docs"}', f'--data_dir={root / "prepared"}', '--split=dev', '--window=64')
    assert result.returncode == 2
    assert "unknown split 'dev'" in result.stderr
    assert 'Traceback' not in result.stderr
    empty = tmp_path / 'empty'
    for split in ('train', 'val'):
        (empty / split).mkdir(parents=True)
        (empty / split / 'a.txt').write_text('some text here')
    (empty / 'test').mkdir()
    (empty / 'test' / 'blank.txt').write_text('')
    result = run_cli(f'--dataset={empty}', f'--data_dir={tmp_path / "prepared"}', '--window=64')
    assert result.returncode == 2
    assert "split 'test'" in result.stderr
    assert 'no documents' in result.stderr
    assert 'Traceback' not in result.stderr


def test_cli_checkpoint_window_and_output(tmp_path, local_docs):
    """A train.py checkpoint: the window defaults to its block_size, the result lands in its folder."""
    root, folder = local_docs
    model = tiny_model(seed=3)
    train_config = {'init_from': 'gemma3-270m-gguf', 'tokenizer': 'gemma3-270m-gguf', 'block_size': 48}
    out_dir = tmp_path / 'run'
    save_checkpoint({'model': model.state_dict(), 'model_config': model.config.to_dict(), 'config': train_config,
                     'iter': 7}, out_dir, 7)
    result = run_cli(f'--ckpt={out_dir}', f'--dataset={root / "docs"}', f'--data_dir={root / "prepared"}')
    assert result.returncode == 0, result.stderr
    report = json.loads((out_dir / 'perplexity-docs-test.json').read_text())
    assert report['window'] == 48
    assert report['stride'] == 24
    docs = [folder.document('test', i) for i in range(folder.num_documents('test'))]
    expected = evaluate_perplexity(model, docs, window=48, stride=24)
    assert report['nll'] == pytest.approx(expected['nll'], rel=1e-6)
    assert report['tokens'] == expected['tokens']
