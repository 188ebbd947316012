"""
Rolling (sliding-window) perplexity of a checkpoint or a pretrained Gemma 3 on whole held-out documents.

    python perplexity.py --ckpt=out/                              # newest checkpoint in out/, gutenberg test split
    python perplexity.py --init_from=gemma3-270m-gguf --max_tokens=20000
    python perplexity.py --ckpt=out/ --dataset=wikitext103 --window=2048 --stride=512
    python perplexity.py --help                                   # every setting with its default

Windows. A document d_0 .. d_{n-1} is scored as BOS followed by the document, so every document token
is a target exactly once, and d_0 is predicted from BOS alone. A window is one model input of at most
`window` tokens: x = [BOS] + d[s : s+W-1] with targets y = d[s : s+W]. Window k starts at
s = k * stride, except that the window that reaches the document's end is moved back to contain
`window` tokens when the document is long enough. Each window scores only the targets that no
earlier window scored, and the targets before them serve as context. So every scored token is
conditioned on at least window - stride earlier document tokens, or on all of them near the
document's start. With stride = window the windows are disjoint, and each window's first target is
predicted from BOS alone. These are the evaluation windows of data.py's Loader.eval_windows.

Metrics, summed over all documents (never an average of per-window means):
    token perplexity = exp(NLL / tokens)
    word perplexity  = exp(NLL / words), words separated by whitespace in the original text
    byte perplexity  = exp(NLL / bytes), UTF-8 bytes of the original text
    bits per byte    = NLL / bytes / ln 2
as lm-evaluation-harness reports them for wikitext (word_perplexity, byte_perplexity, bits_per_byte)
and Rae et al. 2020 (PG-19) report word-level perplexity.

Other scripts use the Python API:

    result = evaluate_perplexity(model, documents, window=1024, stride=512)   # -> dict of metrics
    model, tokenizer, info = load_model(ckpt='out/', init_from='', device='cpu', dtype=torch.float32)
"""

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from configurator import configure, exit_on_error
from model import GGUF_ALIAS, IGNORE_INDEX, Gemma, chunked_cross_entropy, load_checkpoint

# -----------------------------------------------------------------------------
# settings: `python perplexity.py --key=value` overrides any of these (see configurator.py)
ckpt = ''                      # checkpoint file, or a folder of ckpt_*.pt (the newest valid one); '' = use init_from
init_from = GGUF_ALIAS         # weights when ckpt is '': hub id, HF folder, .gguf file or the GGUF alias
dataset = 'gutenberg'          # data.py source: gutenberg | wikitext103 | pg19 | path to a folder or file of documents
split = 'test'                 # train | val | test
data_dir = ''                  # folder of prepared datasets ('' = data.py's default under the cache folder)
window = 0                     # tokens per model input, BOS included (0 = the checkpoint's block_size, 1024 for a plain model)
stride = 0                     # tokens between window starts; each window scores about this many (0 = window // 2)
max_docs = None                # evaluate the first max_docs documents of the split (None = all)
max_tokens = None              # stop after this many scored tokens, cutting the last document (None = all)
batch_size = 4                 # windows per forward pass
device = 'auto'                # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
dtype = 'auto'                 # auto (bfloat16 on a GPU that supports it, else float32) | float32 | bfloat16
out_json = ''                  # result file ('' = perplexity-{dataset}-{split}.json in the checkpoint's folder, else in out/)

DEFAULT_WINDOW = 1024  # window of a plain pretrained model: Gemma 3 was trained on far longer inputs than this


class EvalDocument(NamedTuple):
    ids: object          # token ids of the document, without BOS (list, array or 1-D tensor)
    title: str = ''
    words: int = None    # whitespace-separated words of the original text (None: no word perplexity)
    num_bytes: int = None  # UTF-8 bytes of the original text (None: no byte perplexity)


def document_from_text(tokenizer, text, title=''):
    """Tokenize `text` (no BOS) and count its words and UTF-8 bytes for the word and byte metrics."""
    return EvalDocument(tokenizer.encode(text), title, len(text.split()), len(text.encode('utf-8')))

# -----------------------------------------------------------------------------
# windows


class Window(NamedTuple):
    doc: int     # index of the document
    start: int   # offset in the document of the first target; the input is [BOS] + doc[start : end - 1]
    end: int     # offset after the last target
    first: int   # offset of the first scored target; targets in [start, first) are context only


def plan_windows(length, window, stride):
    """Return (start, end, first_scored) per window of one document, covering every target once.

    Window k starts at k * stride. The window that reaches the document's end is moved back to
    contain `window` tokens when the document is long enough.
    """
    plans, scored_end, begin = [], 0, 0
    while scored_end < length:
        end = min(begin + window, length)
        start = max(0, end - window) if end == length else begin
        plans.append((start, end, scored_end))
        scored_end = end
        begin += stride
    return plans


def make_batch(windows, documents, bos_id, pad_id, device):
    """Return (x, y) of shape (B, T): x = [BOS] + doc[start : end-1] then padding, y = the scored targets."""
    T = max(w.end - w.start for w in windows)
    x = torch.full((len(windows), T), pad_id, dtype=torch.long)
    y = torch.full((len(windows), T), IGNORE_INDEX, dtype=torch.long)
    for i, w in enumerate(windows):
        tokens = documents[w.doc][w.start:w.end]
        n = w.end - w.start
        x[i, 0] = bos_id
        x[i, 1:n] = tokens[:n - 1]
        y[i, w.first - w.start:n] = tokens[w.first - w.start:]
    return x.to(device), y.to(device)

# -----------------------------------------------------------------------------
# evaluation


def check_documents(documents):
    """Return the documents as EvalDocuments with int64 id tensors; raise ValueError for an empty one."""
    if len(documents) == 0:
        raise ValueError("no documents to evaluate: the split or the list is empty; pick another split or "
                         "dataset, or raise max_docs")
    checked = []
    for i, doc in enumerate(documents):
        doc = doc if isinstance(doc, EvalDocument) else EvalDocument(doc)
        ids = torch.as_tensor(doc.ids, dtype=torch.long).flatten()
        if ids.numel() < 2:
            name = f"{doc.title!r}" if doc.title else f"#{i}"
            raise ValueError(f"document {name} has {ids.numel()} token(s); rolling perplexity needs at least 2 "
                             f"(data.py skips such documents with min_doc_tokens=2), so drop it before evaluating")
        checked.append(doc._replace(ids=ids))
    return checked


def check_window(window, max_positions):
    """Raise ValueError unless window is an int in [1, max_positions]."""
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= max_positions:
        raise ValueError(f"window={window!r} is invalid: expected an int in [1, {max_positions}] "
                         f"(the model's max_position_embeddings)")


def check_stride(stride, window):
    """Raise ValueError unless stride is an int in [1, window]."""
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride={stride!r} is invalid: expected an int in [1, window={window}], because a "
                         f"stride above the window would skip tokens")


@torch.no_grad()
def window_nll(model, x, y):
    """Return the summed NLL (float64) and the scored-token count of each row of a batch."""
    n_layer = model.config.num_hidden_layers
    _, _, hidden = model(x, hidden_layers=(n_layer,), return_logits=False)  # final-norm output, no logits
    h = hidden[n_layer]
    sums, counts = [], []
    for b in range(x.shape[0]):
        scored = y[b] != IGNORE_INDEX
        count = int(scored.sum())
        # Only scored rows go through the 262,144-way LM head, and the loss is their mean. The weight is
        # detached because chunked_cross_entropy builds gradients whenever an input requires them,
        # even under no_grad.
        mean = chunked_cross_entropy(h[b][scored], model.lm_head_weight.detach(), y[b][scored], model.loss_chunk)
        sums.append(mean.double().item() * count)
        counts.append(count)
    return sums, counts


def evaluate_perplexity(model, documents, window, stride=None, batch_size=4, progress=False):
    """Score every token of every document once with rolling windows; return totals and metrics.

    documents: EvalDocuments, or plain sequences of token ids (without BOS; then no word or byte
        metrics). Word and byte metrics need `words` and `num_bytes` on every document.
    window: tokens per model input, BOS included. stride: tokens between window starts (default
        window // 2). See the module docstring for the exact definition.
    Returns a dict with tokens, nll (nats, summed), token_perplexity, and when counts are given
    words, word_perplexity, bytes, byte_perplexity and bits_per_byte, plus one entry per document.
    """
    check_window(window, model.config.max_position_embeddings)
    stride = stride or max(1, window // 2)
    check_stride(stride, window)
    docs = check_documents(documents)
    cfg = model.config
    device = next(model.parameters()).device
    windows = [Window(d, *plan) for d, doc in enumerate(docs) for plan in plan_windows(len(doc.ids), window, stride)]

    nll = [0.0] * len(docs)
    scored = [0] * len(docs)
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(d.ids) for d in docs), unit='tok', disable=not progress, file=sys.stdout,
               desc='perplexity')
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        x, y = make_batch(batch, [d.ids for d in docs], cfg.bos_token_id, cfg.pad_token_id, device)
        sums, counts = window_nll(model, x, y)
        for w, s, c in zip(batch, sums, counts):
            nll[w.doc] += s
            scored[w.doc] += c
        bar.update(sum(counts))
        bar.set_postfix(ppl=f"{math.exp(sum(nll) / max(1, sum(scored))):.3f}")
    bar.close()
    model.train(was_training)

    for doc, count in zip(docs, scored):  # the window plan covers each target once, so this cannot fire
        assert count == len(doc.ids), f"scored {count} of {len(doc.ids)} tokens of {doc.title!r}"
    per_document = [summarize(n, len(d.ids), d.words, d.num_bytes, title=d.title) for d, n in zip(docs, nll)]
    has_counts = all(d.words is not None and d.num_bytes is not None for d in docs)
    total = summarize(sum(nll), sum(scored), sum(d.words for d in docs) if has_counts else None,
                      sum(d.num_bytes for d in docs) if has_counts else None)
    return {**total, 'documents': len(docs), 'windows': len(windows), 'window': window, 'stride': stride,
            'per_document': per_document}


def summarize(nll, tokens, words=None, num_bytes=None, title=None):
    """Return the metrics of a summed NLL (nats) over `tokens` targets, `words` words and `num_bytes` bytes."""
    result = {'title': title} if title is not None else {}
    result.update(tokens=tokens, nll=nll, token_perplexity=math.exp(nll / tokens))
    if words is not None and num_bytes is not None:
        result.update(words=words, word_perplexity=math.exp(nll / words) if words else None,
                      bytes=num_bytes, byte_perplexity=math.exp(nll / num_bytes),
                      bits_per_byte=nll / num_bytes / math.log(2))
    return result

# -----------------------------------------------------------------------------
# loading a model: a training checkpoint or pretrained weights


def pick_device(name):
    """Return the torch device name for a --device setting."""
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available; pass --device=cpu")
    if name != 'cpu' and not name.startswith('cuda'):
        raise ValueError(f"device={name!r} is invalid; use auto, cpu, cuda or cuda:N")
    return name


def pick_dtype(name, device):
    """Return (torch dtype, reason); float16 is never chosen because Gemma 3 activations overflow it."""
    if name == 'auto':
        if str(device).startswith('cuda') and torch.cuda.is_bf16_supported():
            return torch.bfloat16, 'auto: bfloat16 on a GPU that supports it'
        return torch.float32, f"auto: float32 on {device}"
    if name not in ('float32', 'bfloat16'):
        raise ValueError(f"dtype={name!r} is invalid; use auto, float32 or bfloat16 (float16 overflows on Gemma 3)")
    return getattr(torch, name), 'requested'


def load_model(ckpt='', init_from=GGUF_ALIAS, device='cpu', dtype=torch.float32):
    """Return (model in eval mode without gradients, tokenizer, info) for a checkpoint or pretrained weights.

    ckpt is a train.py checkpoint file or out_dir (its newest readable checkpoint); with ckpt='' the
    weights come from init_from. info contains
    'name' (for file names), 'source', 'folder' (the checkpoint's folder, else None),
    'tokenizer_source' and 'block_size' (the training block size of a checkpoint, else None).
    """
    from data import Tokenizer
    if ckpt:
        model, checkpoint = load_checkpoint(ckpt, dtype)
        train_config = checkpoint['config']
        folder = Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent
        tokenizer_source = train_config.get('tokenizer') or train_config.get('init_from')
        info = {'name': folder.resolve().name, 'source': f"{ckpt} (iter {checkpoint['iter']})", 'folder': folder,
                'tokenizer_source': tokenizer_source, 'block_size': train_config.get('block_size')}
    else:
        try:
            model = Gemma.from_pretrained(init_from, dtype)
        except RuntimeError as e:  # the hub is unreachable
            raise ValueError(str(e)) from None
        info = {'name': Path(str(init_from)).stem or 'model', 'source': str(init_from), 'folder': None,
                'tokenizer_source': init_from, 'block_size': None}
    tokenizer = Tokenizer.from_source(info['tokenizer_source'])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer of {info['tokenizer_source']!r} has {tokenizer.vocab_size} pieces but the model "
                         f"has vocab_size={model.config.vocab_size}; pass the weights source the model was trained from")
    return model.to(device).eval().requires_grad_(False), tokenizer, info


def setup_model(ckpt, init_from, device, dtype):
    """Resolve the --device and --dtype settings, load the model, and print both steps.

    Return (model, tokenizer, info) as load_model does, with info['dtype'] set to the dtype's name.
    """
    device = pick_device(device)
    torch_dtype, reason = pick_dtype(dtype, device)
    print(f"device {device}, dtype {str(torch_dtype).removeprefix('torch.')} ({reason})")
    t0 = time.time()
    model, tokenizer, info = load_model(ckpt, init_from, device, torch_dtype)
    print(f"loaded {info['source']} ({model.num_params() / 1e6:.1f}M parameters) in {time.time() - t0:.1f} s")
    return model, tokenizer, {**info, 'dtype': str(torch_dtype).removeprefix('torch.')}

# -----------------------------------------------------------------------------
# the stage: documents of a data.py split


def split_documents(data, split, tokenizer, max_docs=None, max_tokens=None):
    """Return EvalDocuments for a prepared split; max_tokens cuts the last document (counts from its decoded text)."""
    documents, total = [], 0
    for i, record in enumerate(data.records(split)[:max_docs]):
        if max_tokens is not None and total >= max_tokens:
            break
        ids = data.document(split, i)
        if max_tokens is not None and total + len(ids) > max_tokens:
            if max_tokens - total < 2:
                break  # a 1-token tail cannot be evaluated on its own
            ids = ids[:max_tokens - total]
            # NOTE: a cut inside a multi-byte character decodes to U+FFFD, which counts 3 bytes.
            documents.append(document_from_text(tokenizer, tokenizer.decode(ids), record['title'])._replace(ids=ids))
        else:
            documents.append(EvalDocument(ids, record['title'], record['words'], record['bytes']))
        total += len(ids)
    return documents


def print_table(result, header):
    print(header)
    rows = [('token perplexity', result['token_perplexity'], f"{result['tokens']:,} tokens")]
    if 'words' in result:
        rows += [('word perplexity', result['word_perplexity'], f"{result['words']:,} words"),
                 ('byte perplexity', result['byte_perplexity'], f"{result['bytes']:,} bytes"),
                 ('bits per byte', result['bits_per_byte'], '')]
    for name, value, note in rows:
        print(f"  {name:<18} {value:12.4f}   {note}")


def write_json(path, result):
    """Write `result` to `path` through a temporary file, so a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + '\n')
    os.replace(tmp, path)


def default_output(info, stem):
    """Return the default result file: {stem}.json in the checkpoint's folder, or out/{stem}-{model}.json."""
    return info['folder'] / f"{stem}.json" if info['folder'] else Path('out') / f"{stem}-{info['name']}.json"


def dataset_label(name):
    return Path(str(name)).name or 'data'


if __name__ == '__main__':
    with exit_on_error(ValueError, FileNotFoundError):
        config = configure(globals(), sys.argv[1:], types={'max_docs': (int, type(None)), 'max_tokens': (int, type(None))})
        for key in ('max_docs', 'max_tokens'):
            if config[key] is not None and config[key] < 1:
                raise ValueError(f"{key}={config[key]} is invalid: expected a positive int, or None for all")
        for key in ('window', 'stride', 'batch_size'):
            if config[key] < (1 if key == 'batch_size' else 0):
                raise ValueError(f"{key}={config[key]} is invalid: expected a positive int"
                                 f"{'' if key == 'batch_size' else ', or 0 for the default'}")

        # setup: model, tokenizer and the prepared split
        model, tokenizer, info = setup_model(ckpt, init_from, device, dtype)
        window = window or info['block_size'] or DEFAULT_WINDOW
        check_window(window, model.config.max_position_embeddings)
        stride = stride or max(1, window // 2)
        check_stride(stride, window)

        import data as data_module
        prepare_args = {'data_dir': data_dir} if data_dir else {}
        data = data_module.prepare(dataset=dataset, tokenizer=info['tokenizer_source'], max_docs=max_docs,
                                   verbose=False, **prepare_args)
        documents = split_documents(data, split, tokenizer, max_docs, max_tokens)

        # the work
        t0 = time.time()
        result = evaluate_perplexity(model, documents, window, stride, batch_size, progress=True)
        seconds = time.time() - t0

        # the report
        header = (f"{info['source']} on {dataset_label(dataset)}/{split}: {result['documents']} documents, "
                  f"window {window}, stride {stride}, {result['windows']} windows, "
                  f"{result['tokens'] / seconds:,.0f} tokens/s")
        print_table(result, header)
        result = {'model': info['source'], 'dataset': str(dataset), 'split': split, 'data_folder': str(data.path),
                  'dtype': info['dtype'], 'seconds': round(seconds, 2),
                  'config': config, **result}
        out_json = out_json or default_output(info, f"perplexity-{dataset_label(dataset)}-{split}")
        write_json(out_json, result)
        print(f"wrote {out_json}")
