"""
Speed and memory of this repo against transformers' Gemma 3, side by side in one run.

    python bench.py                  # the full CPU run recorded in BENCHMARKS.md
    python bench.py --quick          # a reduced run (smoke test, a few minutes)
    python bench.py --dtype=bfloat16 --benchmarks="['train']"   # the bf16 training-step table
    python bench.py --device=cuda --dtype=bfloat16 --blocks=2048 --batch_size=8

Every figure is a median over `repeats` timed repetitions after `warmup` untimed ones. Each
training-step variant runs in a fresh process, so its peak memory is its own. That is the resident
set size on CPU (VmHWM, reset after the step that allocates the AdamW state) and
torch.cuda.max_memory_allocated on GPU. The memory in use right after that step is reported too. `dtype` applies to the training step, and NIHS and
perplexity run in fp32. Goals print PASS or MISS. They are targets for this code, not assertions.
"""

import json
import multiprocessing as mp
import queue as queue_module
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from configurator import configure, exit_on_error

# -----------------------------------------------------------------------------
# settings

quick = False                 # smoke test: overrides blocks, repeats, warmup, nihs_lengths, ppl_tokens
benchmarks = ['train', 'nihs', 'perplexity', 'prep']  # sections to run (always in this order)
init_from = 'gemma3-270m-gguf'  # weights for every measurement
device = 'cpu'                # cpu | cuda
dtype = 'float32'             # float32 | bfloat16 (autocast over fp32 weights, for both models)
blocks = [512, 1024]          # training-step window lengths, tokens
batch_size = 1                # training-step windows per step
repeats = 3                   # timed repetitions per measurement (median reported)
warmup = 1                    # untimed repetitions before timing
nihs_lengths = [512, 2048]    # prompt lengths of the 4-way scoring benchmark, tokens
nihs_option_tokens = 12       # tokens per option (a uuid option is ~34, a city ~3)
ppl_window = 1024             # rolling perplexity window, tokens
ppl_stride = 512              # rolling perplexity stride, tokens
ppl_tokens = 16384            # tokens scored in the perplexity benchmark
memory_layer = 12             # layer of the DINO memory loss in the "ours + DINO" variant
out = 'bench.json'            # where the figures are written (JSON)

GOALS = {  # name: (metric, comparison, threshold)
    'train step time vs transformers (block 1024)': ('step_ratio_1024', '<=', 0.75),
    'train peak memory vs transformers (block 1024)': ('memory_ratio_1024', '<=', 0.5),
    'NIHS cached vs 4 full forwards (length 2048)': ('nihs_speedup_2048', '>=', 3.0),
    'prep throughput vs raw SentencePiece': ('prep_ratio', '>=', 0.8),
    'cache hit vs cold prep time': ('cache_hit_fraction', '<=', 0.02),
    'DINO overhead on step time (largest over blocks)': ('dino_overhead', '<=', 0.15),
}

# -----------------------------------------------------------------------------
# helpers


def timed(fn, repeats, warmup, sync=lambda: None):
    """Run fn warmup + repeats times; return the median seconds of the timed runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak_memory(dev):
    if dev == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    else:
        Path('/proc/self/clear_refs').write_text('5')  # Linux: resets VmHWM to the current RSS


def peak_memory(dev):
    """Peak bytes since reset_peak_memory: CUDA allocations, or resident set size on CPU."""
    if dev == 'cuda':
        return torch.cuda.max_memory_allocated()
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
    raise RuntimeError('VmHWM not found in /proc/self/status; peak RSS needs Linux')


def transformers_twin(model):
    """transformers' Gemma3ForCausalLM (sdpa attention) holding the same weights as our model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    hf = model.config.to_hf_dict()
    config = Gemma3TextConfig(**{k: v for k, v in hf.items() if k not in ('architectures', 'model_type')})
    config._attn_implementation = 'sdpa'
    twin = Gemma3ForCausalLM(config)
    twin.load_state_dict({'model.' + k: v for k, v in model.state_dict().items()}, strict=False)
    twin.tie_weights()
    return twin

# -----------------------------------------------------------------------------
# 1. training step: ours (no memory loss), ours + DINO, transformers


def train_step_worker(variant, T, settings, queue):
    """Measure one variant in this (fresh) process and put its figures on the queue."""
    from model import Gemma, MemoryLoss
    from train import peak_flops
    torch.manual_seed(0)
    torch.set_num_threads(settings['threads'])
    dev, use_bf16 = settings['device'], settings['dtype'] == 'bfloat16'
    sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
    ours = Gemma.from_pretrained(settings['init_from'])
    ours_flops_per_token = ours.flops_per_token(T)
    if variant == 'transformers':
        model = transformers_twin(ours).to(dev)
        del ours
    else:
        model = ours.to(dev)
    memory = None
    if variant == 'ours+dino':
        memory = MemoryLoss('dino', [settings['memory_layer']], model.config.hidden_size, offset=T // 2).to(dev)
    model.train()
    params = list(model.parameters()) + (list(memory.parameters()) if memory is not None else [])
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)  # as train.py and transformers' Trainer use
    B = settings['batch_size']
    idx = torch.randint(3, model.config.vocab_size, (B, T), device=dev)
    idx[:, 0] = 2
    targets = torch.roll(idx, -1, dims=1)
    usable = torch.ones(B, T, dtype=torch.bool, device=dev)
    usable[:, 0] = False
    # bf16 as transformers' Trainer runs it with bf16=True: autocast over fp32 weights, for both models
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=use_bf16)

    def step():
        with autocast:
            if variant == 'transformers':
                loss = model(input_ids=idx, labels=targets).loss
            elif memory is None:
                loss = model(idx, targets)[1]
            else:
                _, loss, hidden = model(idx, targets, hidden_layers=(settings['memory_layer'],))
                pairs = (T - T // 2 - 1) * B
                loss = loss + 0.1 * memory(hidden, usable)[settings['memory_layer']]['loss'] / pairs
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if memory is not None:
            memory.end_step(lambda t: t)

    step()  # allocates the optimizer state, so the peak below is the steady state of training
    reset_peak_memory(dev)
    rest = peak_memory(dev)  # weights, optimizer state and what the allocator kept from that step
    seconds = timed(step, settings['repeats'], settings['warmup'], sync)
    row = {'variant': variant, 'block': T, 'step_s': seconds, 'tok_s': B * T / seconds,
           'rest_bytes': rest, 'peak_bytes': peak_memory(dev)}
    flops, _ = peak_flops(torch.device(dev))
    if flops:  # NOTE: not yet run on a GPU. Both models get one FLOP count because they do the same work.
        row['mfu'] = ours_flops_per_token * row['tok_s'] / flops
    queue.put(row)


class WorkerError(RuntimeError):
    """A measurement process exited without reporting (its own traceback is printed before this)."""


def run_worker(target, *args):
    """Run target(*args, queue) in a fresh spawned process and return what it put on the queue."""
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise WorkerError(f"the {args[0]} worker exited with code {proc.exitcode} before reporting; "
                                   f"its traceback is printed above") from None
    proc.join()
    return result


def bench_train(settings):
    rows = []
    for T in settings['blocks']:
        for variant in ('ours', 'ours+dino', 'transformers'):
            rows.append(run_worker(train_step_worker, variant, T, settings))
            r = rows[-1]
            mfu = f"  MFU {100 * r['mfu']:.1f}%" if 'mfu' in r else ''
            print(f"  train  block {T:5d}  {variant:12s}  {r['step_s']:7.2f} s/step  {r['tok_s']:8.0f} tok/s  "
                  f"peak {r['peak_bytes'] / 2**30:6.2f} GiB  (at rest {r['rest_bytes'] / 2**30:5.2f} GiB){mfu}",
                  flush=True)
    return rows

# -----------------------------------------------------------------------------
# 2. NIHS scoring: one prompt pass with a KV cache vs 4 full-sequence forwards


def bench_nihs(model, settings):
    from nihs import continuation_logprobs
    dev = settings['device']
    rows = []
    gen = torch.Generator().manual_seed(0)
    for T in settings['nihs_lengths']:
        prompt = torch.randint(3, model.config.vocab_size, (T,), generator=gen).tolist()
        prompt[0] = 2
        options = [torch.randint(3, model.config.vocab_size, (settings['nihs_option_tokens'],),
                                 generator=gen).tolist() for _ in range(4)]

        def cached():
            with torch.no_grad():
                continuation_logprobs(model, prompt, options)

        def full():
            with torch.no_grad():
                for option in options:
                    model(torch.tensor([prompt + option], device=dev))

        t_cached = timed(cached, settings['repeats'], settings['warmup'])
        t_full = timed(full, settings['repeats'], settings['warmup'])
        rows.append({'length': T, 'cached_s': t_cached, 'full_s': t_full, 'speedup': t_full / t_cached})
        print(f"  nihs   length {T:5d}  cached {t_cached:6.2f} s  4 full {t_full:6.2f} s  "
              f"speedup {t_full / t_cached:5.2f}x", flush=True)
    return rows

# -----------------------------------------------------------------------------
# 3. data preparation vs raw SentencePiece; cache hit vs cold


def bench_prep(settings):
    import data
    threads = settings['threads']
    tok = data.Tokenizer.from_source(settings['init_from'])
    texts = [text for _, text, in gutenberg_texts(settings)]
    raw, cold, hit = [], [], []
    for _ in range(settings['repeats']):  # interleaved, so drifts in machine speed hit both sides alike
        t0 = time.perf_counter()
        n_raw = sum(len(ids) for ids in tok.encode_batch(texts, num_threads=threads))
        raw.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            folder = data.prepare(data_dir=tmp, num_threads=threads, max_docs=settings['prep_docs'], verbose=False)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            data.prepare(data_dir=tmp, num_threads=threads, max_docs=settings['prep_docs'], verbose=False)
            hit.append(time.perf_counter() - t0)
            n_prep = sum(folder.num_tokens(split) for split in data.SPLITS)
    raw_s, cold_s, hit_s = (statistics.median(t) for t in (raw, cold, hit))
    row = {'raw_tok_s': n_raw / raw_s, 'prep_tok_s': n_prep / cold_s, 'prep_ratio': (n_prep / cold_s) / (n_raw / raw_s),
           'cold_s': cold_s, 'hit_s': hit_s, 'cache_hit_fraction': hit_s / cold_s, 'threads': threads}
    print(f"  prep   raw SentencePiece {row['raw_tok_s']:9.0f} tok/s  data.py {row['prep_tok_s']:9.0f} tok/s  "
          f"ratio {row['prep_ratio']:.2f}  cold {cold_s:.2f} s  cache hit {hit_s:.3f} s", flush=True)
    return row


def gutenberg_texts(settings):
    """(title, text) of the Gutenberg documents that prepare() tokenizes, in the same numbers per split."""
    import data
    folder = data.prepare(max_docs=settings['prep_docs'], verbose=False)
    for split in data.SPLITS:
        for i, record in enumerate(folder.records(split)):
            yield record['title'], folder.text(split, i)

# -----------------------------------------------------------------------------
# 4. rolling perplexity throughput


def bench_perplexity(model, settings):
    import data
    from perplexity import evaluate_perplexity
    folder = data.prepare(verbose=False)
    ids, budget = [], settings['ppl_tokens']
    for _, doc in folder.documents('test'):
        ids.append(doc[:budget])
        budget -= len(ids[-1])
        if budget <= 0:
            break
    t0 = time.perf_counter()
    with torch.no_grad():
        result = evaluate_perplexity(model, ids, window=settings['ppl_window'], stride=settings['ppl_stride'])
    seconds = time.perf_counter() - t0
    row = {'window': settings['ppl_window'], 'stride': settings['ppl_stride'], 'tokens': result['tokens'],
           'seconds': seconds, 'tok_s': result['tokens'] / seconds, 'token_perplexity': result['token_perplexity']}
    print(f"  ppl    W={row['window']} S={row['stride']}  {row['tokens']} tokens  {row['tok_s']:7.0f} tok/s  "
          f"(perplexity {row['token_perplexity']:.2f})", flush=True)
    return row


# -----------------------------------------------------------------------------
# report


def ratios(train_rows, nihs_rows, prep_row):
    out = {}
    by = {(r['variant'], r['block']): r for r in train_rows}
    for (variant, T), r in by.items():
        if variant == 'ours' and ('transformers', T) in by:
            out[f'step_ratio_{T}'] = r['step_s'] / by['transformers', T]['step_s']
            out[f'memory_ratio_{T}'] = r['peak_bytes'] / by['transformers', T]['peak_bytes']
            hf = by['transformers', T]
            out[f'step_memory_ratio_{T}'] = (r['peak_bytes'] - r['rest_bytes']) / (hf['peak_bytes'] - hf['rest_bytes'])
        if variant == 'ours+dino' and ('ours', T) in by:
            out[f'dino_overhead_{T}'] = r['step_s'] / by['ours', T]['step_s'] - 1
    overheads = [v for k, v in out.items() if k.startswith('dino_overhead_')]
    if overheads:
        out['dino_overhead'] = max(overheads)
    for r in nihs_rows:
        out[f"nihs_speedup_{r['length']}"] = r['speedup']
    if prep_row:
        out['prep_ratio'] = prep_row['prep_ratio']
        out['cache_hit_fraction'] = prep_row['cache_hit_fraction']
    return out


def print_goals(measured, quick):
    if quick:
        print('\ngoals: not judged in a --quick run (reduced sizes, one repetition)')
        return
    print('\ngoals')
    for name, (metric, op, threshold) in GOALS.items():
        if metric not in measured:
            print(f'  n/a   {name} (not measured in this run)')
            continue
        value = measured[metric]
        ok = value <= threshold if op == '<=' else value >= threshold
        print(f"  {'PASS' if ok else 'MISS'}  {name}: {value:.3f} (goal {op} {threshold})")


def machine():
    import platform
    cpu = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                if line.startswith('model name')), platform.processor()) if Path('/proc/cpuinfo').exists() else ''
    info = {'cpu': cpu, 'cores': os.cpu_count(), 'torch': torch.__version__, 'python': platform.python_version()}
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    return info


def check_settings(settings):
    """Raise ValueError on settings that would fail or mislead only after minutes of measuring."""
    if settings['device'] == 'cuda' and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use --device=cpu")
    if settings['dtype'] not in ('float32', 'bfloat16'):
        raise ValueError(f"dtype={settings['dtype']!r} is invalid; use float32 or bfloat16 (float16 overflows Gemma 3)")
    sections = ['train', 'nihs', 'perplexity', 'prep']
    unknown = sorted(set(settings['benchmarks']) - set(sections))
    if unknown:
        raise ValueError(f"benchmarks={unknown} is unknown; choose from {sections}")
    if not settings['benchmarks']:
        raise ValueError(f"benchmarks=[] runs nothing; choose from {sections}")
    if settings['repeats'] < 1 or settings['warmup'] < 0:
        raise ValueError(f"repeats={settings['repeats']}, warmup={settings['warmup']} is invalid; "
                         f"use repeats >= 1 and warmup >= 0")
    if not settings['blocks'] or min(settings['blocks']) < 2:
        raise ValueError(f"blocks={settings['blocks']} is invalid; give window lengths of at least 2 tokens")
    folder = Path(settings['out']).resolve().parent
    if not folder.is_dir():
        raise ValueError(f"out={settings['out']!r}: folder {folder} not found; create it or pick another path")


def main():
    settings = configure(globals(), sys.argv[1:])
    if settings['quick']:
        settings.update(blocks=[128], repeats=1, warmup=0, nihs_lengths=[256], ppl_tokens=512)
    settings['threads'] = torch.get_num_threads()
    settings['prep_docs'] = 4 if settings['quick'] else None
    check_settings(settings)
    info = machine()
    print(f"machine: {info}\nsettings: device={settings['device']} dtype={settings['dtype']} threads={settings['threads']}"
          f" repeats={settings['repeats']} warmup={settings['warmup']}\n", flush=True)

    run = settings['benchmarks']
    train_rows = bench_train(settings) if 'train' in run else []
    nihs_rows, ppl_row, prep_row = [], None, None
    if 'nihs' in run or 'perplexity' in run:
        from model import Gemma
        model = Gemma.from_pretrained(settings['init_from']).to(settings['device']).eval()
        nihs_rows = bench_nihs(model, settings) if 'nihs' in run else []
        ppl_row = bench_perplexity(model, settings) if 'perplexity' in run else None
        del model
    prep_row = bench_prep(settings) if 'prep' in run else None

    measured = ratios(train_rows, nihs_rows, prep_row)
    print('\nratios: ' + ', '.join(f'{k} {v:.3f}' for k, v in measured.items()))
    print_goals(measured, settings['quick'])
    report = {'machine': info, 'settings': {k: v for k, v in settings.items()}, 'train': train_rows,
              'nihs': nihs_rows, 'perplexity': ppl_row, 'prep': prep_row, 'ratios': measured}
    tmp = Path(settings['out']).with_suffix('.tmp')
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, settings['out'])
    print(f"\nwrote {settings['out']}")


if __name__ == '__main__':
    with exit_on_error(ValueError, FileNotFoundError, WorkerError):
        main()
