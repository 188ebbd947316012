"""
Fine-tune Gemma 3 with an auxiliary memory loss on an intermediate layer.

    python train.py                                        # 270M (PyPI GGUF), DINO memory loss, gutenberg
    python train.py config/mem_l1.py --max_iters=500       # a config file, then --key=value overrides
    python train.py config/baseline.py                     # cross-entropy only (same as --no_memory_loss)
    torchrun --standalone --nproc_per_node=8 train.py config/mem_dino.py
    python train.py config/mem_dino.py --init_from=resume  # continue from the newest checkpoint in out_dir
    python train.py --help                                 # every setting with its default

The loss of an optimizer step is

    loss = xent_weight * xent + memory_weight * sum_l w_l * mem_l

where xent is the mean next-token cross-entropy over the step's scored tokens and mem_l the mean
memory loss at hidden layer l over the step's pairs (t, t - memory_offset) (see "Memory losses" in
model.py). Both means run over the whole step (all micro-batches on all ranks), so gradient
accumulation and data parallelism give the gradient of one big batch.

Outputs in out_dir: ckpt_{iter:06d}.pt (model.load_checkpoint reads them), log.txt with one
`iter key value` line per measurement, and the wandb run when wandb_log is set.
"""

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, configure, exit_on_error
from model import (GGUF_ALIAS, IGNORE_INDEX, CheckpointError, Gemma, GemmaConfig, MemoryLoss, check_dtype,
                   gemma3_layer_types, list_checkpoints, memory_pair_mask, memory_positions, newest_checkpoint,
                   preset, save_checkpoint)

# -----------------------------------------------------------------------------
# settings: config files and `--key=value` override any of these (see configurator.py)
# The defaults describe a GPU run on Gemma 3 270M, and config/ contains the variants.
# I/O
out_dir = 'out'                # checkpoints, log.txt and wandb files
init_from = GGUF_ALIAS         # gemma3-270m-gguf | hub id | HF folder | .gguf file | scratch | resume (newest ckpt in out_dir)
tokenizer = ''                 # tokenizer source of the data ('' = init_from, or the GGUF alias for scratch)
eval_interval = 250            # iterations between evaluations on the val split (and after the last one)
eval_iters = 20                # val batches per evaluation, spread over the split (None = the whole split)
log_interval = 10              # iterations between log lines
ckpt_interval = 250            # iterations between checkpoints (one is also written after the last iteration)
keep_last = 3                  # newest checkpoints kept in out_dir; older ones are deleted after a save
# wandb
wandb_log = False              # log to Weights & Biases (WANDB_MODE=offline writes the run under out_dir only)
wandb_project = 'splitbrain'   # wandb project name
wandb_run_name = ''            # wandb run name ('' = the name of out_dir)
# data (see data.py)
dataset = 'gutenberg'          # gutenberg | pg19 | wikitext103 | path to a folder or file of documents
data_dir = ''                  # folder of prepared datasets ('' = data.py's default under the cache folder)
max_docs = None                # use at most this many documents per split (None = all)
batch_size = 8                 # windows per micro-batch on each rank
block_size = 2048              # tokens per window, BOS included
gradient_accumulation_steps = 8  # micro-batches per optimizer step over all ranks; divided by WORLD_SIZE
seed = 1337                    # seeds weight init and the data order
log_windows = False            # write each rank's training windows to out_dir/windows_rank{r}.txt
# model, when init_from='scratch' (ignored otherwise, so a config file can serve a later resume)
model_preset = 'gemma3-270m'   # GemmaConfig preset (gemma3-270m | gemma3-1b), or 'custom' for the sizes below
num_hidden_layers = 4          # custom model: transformer blocks
hidden_size = 64               # custom model: width of the residual stream
intermediate_size = 128        # custom model: MLP width
num_attention_heads = 2        # custom model: query heads
num_key_value_heads = 1        # custom model: key/value heads shared by the query heads
head_dim = 16                  # custom model: width of one head
sliding_window = 512           # custom model: keys seen by the local layers, the current one included
sliding_window_pattern = 6     # custom model: every n-th layer attends globally (Gemma 3 uses 6)
# losses
xent_weight = 1.0              # weight of the next-token cross-entropy (0 = off: the LM head is not run in training)
memory_loss = 'dino'           # l1 | dino; --no_memory_loss turns it off
memory_weight = 0.1            # weight of the memory loss; 0 computes and logs it without training on it
memory_layer = 12              # hidden-state index (transformers' indexing: 12 = after block 11), or a list
memory_layer_weights = None    # one weight per entry of a memory_layer list (None = 1.0 each)
memory_offset = 512            # k in the pairs (t, t - k); at most block_size - 2 (pairs with t - k = 0 touch BOS)
memory_norm = 'running'        # running: standardize each hidden channel with running mean/var; off: raw states
memory_norm_momentum = 0.99    # EMA momentum per optimizer step of the running mean/var
# DINO memory loss (Caron et al. 2021, arXiv:2104.14294)
dino_prototypes = 4096         # K, the number of prototypes
dino_hidden_dim = 2048         # width of the projection head's MLP
dino_bottleneck_dim = 256      # L2-normalized bottleneck before the prototypes
dino_teacher = 'ema'           # ema: EMA copy of the head with its own storage | shared: the head, without gradient
dino_teacher_momentum = 0.996  # EMA momentum per optimizer step of the teacher head
dino_center_momentum = 0.9     # EMA momentum per optimizer step of the center of the teacher's scores
dino_student_temp = 0.1        # student softmax temperature
dino_teacher_temp_start = 0.04  # teacher softmax temperature at iteration 0 ...
dino_teacher_temp = 0.07       # ... raised linearly to this value ...
dino_teacher_temp_warmup_iters = 500  # ... over this many iterations
# optimizer
optimizer = 'adamw'            # adamw | adafactor (torch.optim.Adafactor: lr is the maximum relative step size)
learning_rate = 3e-5           # peak LR of the model's weights
head_learning_rate = 1e-3      # peak LR of the memory heads: new random weights need larger steps
train_embeddings = True        # False freezes the tied embedding / LM head (168M of the 270M): no gradient, no optimizer state
max_iters = 2000               # optimizer steps in total
weight_decay = 0.1             # decoupled weight decay of matrices (norm weights and biases get none)
beta1 = 0.9                    # AdamW beta1
beta2 = 0.95                   # AdamW beta2
grad_clip = 1.0                # clip the global gradient norm to this value (0 = no clipping)
# learning-rate schedule: linear warmup, then cosine decay
decay_lr = True                # False keeps the peak LR after warmup
warmup_iters = 100             # iterations of linear warmup
lr_decay_iters = None          # iteration where the cosine reaches min_lr_ratio (None = max_iters)
min_lr_ratio = 0.1             # final LR as a fraction of the peak
# system
device = 'auto'                # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
dtype = 'auto'                 # auto (bfloat16 where the hardware has it, else float32) | bfloat16 | float32
compile = False                # torch.compile the model (10-20 s of compilation on CPU for little gain)
ddp_timeout_minutes = 30.0     # a collective that waits longer (a dead or hung rank) raises instead of hanging

CONFIG_TYPES = {'memory_layer': (int, list), 'memory_layer_weights': (list, type(None)),
                'memory_loss': (str, type(None)), 'memory_norm': (str, type(None)),
                'max_docs': (int, type(None)), 'eval_iters': (int, type(None)), 'lr_decay_iters': (int, type(None))}
SCRATCH_SIZES = ('num_hidden_layers', 'hidden_size', 'intermediate_size', 'num_attention_heads',
                 'num_key_value_heads', 'head_dim', 'sliding_window', 'sliding_window_pattern')
NAN_TEST_ENV = 'TRAIN_TEST_INJECT_NAN_AT_ITER'  # tests only: make the loss NaN at this iteration
# Tests only: 'POINT:ITER[:RANK[:hang]]' makes that rank SIGKILL itself (or hang, with ':hang') at POINT
# of iteration ITER, so the crash tests can stop a run at a known place and resume it.
FAULT_TEST_ENV = 'TRAIN_TEST_FAULT_AT'
FAULT_POINTS = ('backward',      # after the first micro-step's backward, gradients half accumulated
                'step',          # after the optimizer step, before the step is logged
                'log',           # after the step's metrics are written to log.txt
                'eval',          # after an evaluation, before its metrics are logged and the checkpoint saved
                'ckpt_synced',   # the temporary checkpoint file is complete, not yet renamed
                'ckpt_renamed',  # the checkpoint is in place, older ones not yet deleted
                'ckpt_saved')    # the save is done, older checkpoints deleted

# bf16 dense tensor-core peaks in FLOP/s (NVIDIA data sheets, without sparsity), matched in order against
# torch.cuda.get_device_name(); the first matching entry wins.
GPU_PEAK_FLOPS = (('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('GH200', 989e12), ('H200', 989e12),
                  ('H100', 989e12), ('A100', 312e12), ('L40S', 362e12), ('L4', 121e12), ('A10', 125e12))


class NonFiniteLossError(ArithmeticError):
    """The loss or the gradient norm became NaN or Inf; training stops without saving."""


class CheckpointSaveError(OSError):
    """A checkpoint that could not be written (disk full, I/O error). Training stops, earlier checkpoints stay intact."""

# -----------------------------------------------------------------------------
# setup helpers


def print0(*args, **kwargs):
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, **kwargs, flush=True)


def check_settings(config, world_size):
    """Raise ConfigError for settings that cannot describe a run; return the micro-steps per rank."""
    positive = ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval',
                'ckpt_interval', 'keep_last')
    for key in positive:
        if config[key] < 1:
            raise ConfigError(f"{key}={config[key]} is invalid: expected a positive integer")
    if not config['ddp_timeout_minutes'] > 0:
        raise ConfigError(f"ddp_timeout_minutes={config['ddp_timeout_minutes']} is invalid: expected a positive number")
    for key in ('max_iters', 'warmup_iters', 'dino_teacher_temp_warmup_iters'):
        if config[key] < 0:
            raise ConfigError(f"{key}={config[key]} is invalid: expected an integer >= 0")
    for key in ('eval_iters', 'max_docs', 'lr_decay_iters'):
        if config[key] is not None and config[key] < 1:
            raise ConfigError(f"{key}={config[key]} is invalid: expected a positive integer, or None")
    if config['gradient_accumulation_steps'] % world_size:
        raise ConfigError(f"gradient_accumulation_steps={config['gradient_accumulation_steps']} is not divisible by "
                          f"WORLD_SIZE={world_size}; pick a multiple of the number of processes")
    for key in ('xent_weight', 'memory_weight'):
        if (config[key] or 0) < 0:  # None (--no_memory_weight) means 0
            raise ConfigError(f"{key}={config[key]} is invalid: a negative weight would maximize the loss; "
                              f"use a weight >= 0 (0 turns the loss off)")
    if config['optimizer'] not in ('adamw', 'adafactor'):
        raise ConfigError(f"optimizer={config['optimizer']!r} is invalid; use adamw or adafactor")
    if config['memory_loss'] is not None:
        check_memory_settings(config)
    if not config['xent_weight'] and (config['memory_loss'] is None or not config['memory_weight']):
        raise ConfigError("both losses are off (xent_weight and memory_weight are 0 or memory_loss is off), so "
                          "nothing would be trained; set xent_weight or memory_weight")
    return config['gradient_accumulation_steps'] // world_size


def check_memory_settings(config):
    if config['memory_loss'] not in ('l1', 'dino'):
        raise ConfigError(f"memory_loss={config['memory_loss']!r} is invalid; use l1 or dino, or --no_memory_loss")
    layers = memory_layers(config)
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"memory_layer={config['memory_layer']!r} is invalid: expected an int or a list of ints")
    weights = config['memory_layer_weights']
    if weights is not None and (len(weights) != len(layers) or
                                not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
        raise ConfigError(f"memory_layer_weights={weights!r} does not match memory_layer={layers}: give one number "
                          f"per layer")
    offset, block = config['memory_offset'], config['block_size']
    if not isinstance(offset, int) or not 1 <= offset <= block - 2:
        raise ConfigError(f"memory_offset={offset!r} leaves no pairs in windows of block_size={block}: position 0 "
                          f"is BOS, so pairs need 1 <= memory_offset <= block_size - 2; lower memory_offset")
    if config['memory_norm'] not in ('running', None):
        raise ConfigError(f"memory_norm={config['memory_norm']!r} is invalid; use running, or --no_memory_norm")
    if config['dino_teacher'] not in ('ema', 'shared'):
        raise ConfigError(f"dino_teacher={config['dino_teacher']!r} is invalid; use ema or shared")
    for key in ('dino_student_temp', 'dino_teacher_temp_start', 'dino_teacher_temp'):
        if not config[key] > 0:
            raise ConfigError(f"{key}={config[key]!r} is invalid: expected a positive temperature")


def memory_layers(config):
    layer = config['memory_layer']
    return [layer] if isinstance(layer, int) else list(layer)


def pick_device(name, local_rank):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} requested but CUDA is not available; pass --device=cpu")
        return f"cuda:{local_rank}" if name == 'cuda' else name
    if name != 'cpu':
        raise ConfigError(f"device={name!r} is invalid; use auto, cpu, cuda or cuda:N")
    return name


def pick_dtype(name, device_type):
    """Return (dtype, reason). bfloat16 runs as autocast over float32 weights; float16 is rejected."""
    if name == 'float16':
        check_dtype(torch.float16)  # raises with the reason
    if name not in ('auto', 'bfloat16', 'float32'):
        raise ConfigError(f"dtype={name!r} is invalid; use auto, bfloat16 or float32")
    if name != 'auto':
        return getattr(torch, name), 'requested'
    if device_type == 'cuda':
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, 'auto: the GPU has bfloat16 tensor cores'
        return torch.float32, 'auto: this GPU has no bfloat16 support (float16 overflows on Gemma 3)'
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return torch.bfloat16, 'auto: the CPU has native bfloat16 matmuls (AVX512-BF16 or AMX)'
    return torch.float32, 'auto: the CPU has no native bfloat16 matmuls (no AVX512-BF16 or AMX)'


def gpu_peak_flops(name):
    """Return the bf16 dense peak FLOP/s of a GPU by its torch.cuda.get_device_name(), or None if unknown."""
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def peak_flops(device):
    """Return (peak FLOP/s, GPU name) for a known GPU, else (None, the reason MFU is not reported)."""
    if device.type != 'cuda':
        return None, 'no peak known for CPUs'
    name = torch.cuda.get_device_name(device)
    flops = gpu_peak_flops(name)
    return (flops, name) if flops else (None, f"no peak known for {name}")


def lr_factor(it, warmup, decay_iters, min_ratio, decay=True):
    """LR multiplier at iteration it: linear warmup, then cosine from 1 down to min_ratio at decay_iters."""
    if it < warmup:
        return (it + 1) / (warmup + 1)
    if not decay:
        return 1.0
    if it >= decay_iters:
        return min_ratio
    progress = (it - warmup) / max(1, decay_iters - warmup)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def dino_teacher_temperature(it, start, end, warmup):
    if it >= warmup:
        return end
    return start + (end - start) * it / warmup


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor

# -----------------------------------------------------------------------------
# model, memory loss and optimizer


def build_model(config, vocab_size, ckpt=None):
    """Return the Gemma for init_from: pretrained weights, a fresh random model or a checkpoint's weights."""
    source = config['init_from']
    if ckpt is not None:
        with torch.device('meta'):
            model = Gemma(GemmaConfig.from_dict(ckpt['model_config']))
        model.load_weights(ckpt['model'])
        return model
    if source != 'scratch':
        try:
            return Gemma.from_pretrained(source)
        except RuntimeError as e:  # the hub is unreachable
            raise ConfigError(str(e)) from None
    if config['model_preset'] != 'custom':
        return Gemma(preset(config['model_preset']))
    sizes = {k: config[k] for k in SCRATCH_SIZES if k != 'sliding_window_pattern'}
    gemma_config = GemmaConfig(vocab_size=vocab_size, query_pre_attn_scalar=config['head_dim'],
                               layer_types=gemma3_layer_types(config['num_hidden_layers'],
                                                              config['sliding_window_pattern']),
                               rope_local_base=10_000.0, rope_global_base=1_000_000.0, rms_norm_eps=1e-6,
                               max_position_embeddings=max(32_768, config['block_size']),
                               bos_token_id=2, eos_token_id=1, pad_token_id=0, **sizes)
    return Gemma(gemma_config)


def build_memory_loss(config, model_config):
    if config['memory_loss'] is None:
        return None
    dino = {'hidden_dim': config['dino_hidden_dim'], 'bottleneck_dim': config['dino_bottleneck_dim'],
            'num_prototypes': config['dino_prototypes'], 'teacher': config['dino_teacher'],
            'student_temp': config['dino_student_temp'], 'teacher_momentum': config['dino_teacher_momentum'],
            'center_momentum': config['dino_center_momentum']} if config['memory_loss'] == 'dino' else None
    return MemoryLoss(config['memory_loss'], memory_layers(config), model_config.hidden_size,
                      config['memory_offset'], weights=config['memory_layer_weights'], norm=config['memory_norm'],
                      norm_momentum=config['memory_norm_momentum'], dino=dino)


class LossModel(nn.Module):
    """The model and its memory losses as one module, so DDP averages the heads' gradients with the model's."""

    def __init__(self, model, memory, use_xent, train_memory):
        super().__init__()
        self.model, self.memory = model, memory
        self.use_xent, self.train_memory = use_xent, train_memory
        self.layers = tuple(memory.layers) if memory is not None else ()

    def forward(self, idx, targets, usable):
        """Return (mean cross-entropy or None, {layer: memory-loss sums}) for one micro-batch."""
        if self.use_xent:
            _, xent, hidden = self.model(idx, targets, hidden_layers=self.layers)
        else:
            _, xent, hidden = self.model(idx, hidden_layers=self.layers, return_logits=False)
        if self.memory is None:
            return xent, {}
        with nullcontext() if self.train_memory else torch.no_grad():
            return xent, self.memory(hidden, usable)


def configure_optimizer(config, model, memory, device_type):
    """AdamW or Adafactor with weight decay on matrices only; each group carries its own peak LR."""
    def groups(module, peak_lr):
        params = [p for p in module.parameters() if p.requires_grad]
        return [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': config['weight_decay'],
                 'peak_lr': peak_lr},
                {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0, 'peak_lr': peak_lr}]
    param_groups = groups(model, config['learning_rate'])
    if memory is not None:
        param_groups += groups(memory, config['head_learning_rate'])
    param_groups = [g for g in param_groups if g['params']]
    if config['optimizer'] == 'adafactor':
        return torch.optim.Adafactor(param_groups, lr=config['learning_rate'])
    # The fused kernel (CPU and CUDA) ran the 270M's AdamW step 4x faster than the per-tensor loop on CPU;
    # transformers' Trainer also defaults to it on torch >= 2.8.
    return torch.optim.AdamW(param_groups, lr=config['learning_rate'], betas=(config['beta1'], config['beta2']),
                             fused=device_type in ('cuda', 'cpu'))

# -----------------------------------------------------------------------------
# data


def open_data(config, tokenizer_source, master):
    """Prepare (once, on the master first) and open the dataset folder."""
    import data as data_module
    kwargs = {'data_dir': config['data_dir']} if config['data_dir'] else {}
    if master:
        data = data_module.prepare(dataset=config['dataset'], tokenizer=tokenizer_source,
                                   max_docs=config['max_docs'], verbose=True, **kwargs)
    if dist.is_initialized():
        dist.barrier()
    if not master:
        data = data_module.prepare(dataset=config['dataset'], tokenizer=tokenizer_source,
                                   max_docs=config['max_docs'], verbose=False, **kwargs)
    return data


def eval_batches(loader, eval_iters, batch_size, rank, world_size):
    """Return this rank's share of the evaluation windows: eval_iters * batch_size windows spread evenly
    over the split (all of them when eval_iters is None), dealt round-robin to the ranks."""
    docs, starts, first_scored = loader.eval_windows()
    if eval_iters is not None and eval_iters * batch_size < len(docs):
        picks = np.unique(np.linspace(0, len(docs) - 1, eval_iters * batch_size).round().astype(np.int64))
        docs, starts, first_scored = docs[picks], starts[picks], first_scored[picks]
    docs, starts, first_scored = docs[rank::world_size], starts[rank::world_size], first_scored[rank::world_size]
    return [loader.make_batch(docs[i:i + batch_size], starts[i:i + batch_size], first_scored[i:i + batch_size])
            for i in range(0, len(docs), batch_size)]

# -----------------------------------------------------------------------------
# evaluation, logging and checkpoints


@torch.no_grad()
def evaluate(model, memory, batches, autocast, bos_id, pad_id, config):
    """Return val_xent, val_mem (weighted over memory layers) and val_loss, summed exactly over all ranks."""
    model.eval()
    layers = tuple(memory.layers) if memory is not None else ()
    if memory is not None:
        memory.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3 + len(layers), dtype=torch.float64, device=device)  # xent, tokens, pairs, mem per layer

    for x, y, _, _ in batches:
        with autocast:
            _, xent, hidden = model(x, y, hidden_layers=layers)
        sums[0] += xent.double() * (y != IGNORE_INDEX).sum()
        sums[1] += (y != IGNORE_INDEX).sum()
        if memory is not None:
            usable = memory_positions(x, bos_id, pad_id)
            sums[2] += memory_pair_mask(usable, memory.offset).sum()
            with autocast:
                mem = memory(hidden, usable)
            for i, layer in enumerate(layers):
                sums[3 + i] += mem[layer]['loss'].double()
    all_reduce_sum(sums)
    model.train()
    if memory is not None:
        memory.train()

    metrics = {'val_xent': (sums[0] / sums[1].clamp(min=1)).item()}
    loss = config['xent_weight'] * metrics['val_xent']
    if memory is not None:
        per_layer = (sums[3:] / sums[2].clamp(min=1)).tolist()
        metrics['val_mem'] = sum(w * m for w, m in zip(memory.weights, per_layer))
        loss += config['memory_weight'] * metrics['val_mem']
    metrics['val_loss'] = loss
    return metrics


class MetricsLog:
    """log.txt with one `iter key value` line per measurement, plus wandb when a run is given."""

    def __init__(self, path, wandb_run=None):
        self.file = open(path, 'a', encoding='utf-8')
        self.wandb_run = wandb_run

    def write(self, it, metrics):
        for key, value in metrics.items():
            self.file.write(f"{it} {key} {value:.8g}\n" if isinstance(value, float) else f"{it} {key} {value}\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=it)

    def close(self):
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(config, run_id):
    """Start a wandb run, or continue the run `run_id` of a resumed checkpoint."""
    import wandb
    name = config['wandb_run_name'] or Path(config['out_dir']).resolve().name
    try:
        return wandb.init(project=config['wandb_project'], name=name, id=run_id, config=config,
                          dir=config['out_dir'], resume='allow' if run_id else None)
    except Exception as e:  # wandb raises its own error types for a missing login or an unreachable server
        raise ConfigError(f"wandb.init failed ({type(e).__name__}: {e}); run `wandb login`, set "
                          f"WANDB_MODE=offline, or pass --no_wandb_log") from None


def rng_state():
    """Return every RNG state as tensors and plain types, so weights_only loading accepts it."""
    np_state = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                       'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def changed_settings(old, new):
    """Return 'key old -> new' strings for settings that differ between a checkpoint and this run."""
    ignore = ('init_from',)
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k in old and k not in ignore and old[k] != new[k]]

# -----------------------------------------------------------------------------
# the run


def main(argv):
    config = configure(globals(), argv, types=CONFIG_TYPES)
    for key in ('xent_weight', 'memory_weight'):
        config[key] = config[key] or 0.0  # --no_xent_weight gives None: off

    # distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous for multi-node)
    ddp = 'RANK' in os.environ
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    master = rank == 0
    accum_steps = check_settings(config, world_size)
    device_name = pick_device(config['device'], local_rank)
    pick_dtype(config['dtype'], device_name.split(':')[0])  # reject a bad dtype before any work
    if ddp:
        backend = 'nccl' if device_name.startswith('cuda') else 'gloo'
        if device_name.startswith('cuda'):
            torch.cuda.set_device(device_name)
        dist.init_process_group(backend, timeout=timedelta(minutes=config['ddp_timeout_minutes']))
    try:
        train(config, rank, world_size, master, accum_steps, torch.device(device_name))
        if ddp:
            dist.barrier()  # every rank finished: no rank tears down the group under another's collective
    except NonFiniteLossError:
        if ddp:
            dist.barrier()  # every rank saw the same all-reduced loss and stops at the same step
        raise
    finally:
        if ddp:
            dist.destroy_process_group()


def train(config, rank, world_size, master, accum_steps, device):
    torch.manual_seed(config['seed'])  # the same initial weights on every rank
    random.seed(config['seed'])
    np.random.seed(config['seed'])
    out_dir = Path(config['out_dir'])  # created once the settings, data and model have passed their checks

    # dtype and autocast
    compute_dtype, dtype_reason = pick_dtype(config['dtype'], device.type)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if compute_dtype == torch.bfloat16
                else nullcontext())
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True

    # checkpoint to resume from
    ckpt = None
    if config['init_from'] == 'resume':
        ckpt_file, ckpt = newest_checkpoint(out_dir)
        print0(f"resuming from {ckpt_file} (iteration {ckpt['iter']})")
    tokenizer_source = config['tokenizer'] or (
        ckpt['config']['tokenizer'] if ckpt is not None else
        GGUF_ALIAS if config['init_from'] == 'scratch' else config['init_from'])
    config = {**config, 'tokenizer': tokenizer_source}  # checkpoints record the resolved source
    if ckpt is not None:
        changes = changed_settings(ckpt['config'], config)
        if changes:
            print0(f"settings that differ from the checkpoint's: {', '.join(changes)}")
        if ckpt.get('world_size', world_size) != world_size:
            print0(f"warning: the checkpoint was written with WORLD_SIZE={ckpt['world_size']}, this run has "
                   f"{world_size}; the windows per step stay the same but their order across ranks changes")

    print0("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in config.items()))
    print0(f"device {device}, dtype {str(compute_dtype).removeprefix('torch.')} ({dtype_reason}), "
           f"world size {world_size}")
    tokens_per_step = config['batch_size'] * config['block_size'] * config['gradient_accumulation_steps']
    print0(f"tokens per optimizer step: {config['batch_size']} batch x {config['block_size']} block x "
           f"{accum_steps} micro-steps x {world_size} ranks = {tokens_per_step:,}")

    # data
    data = open_data(config, tokenizer_source, master)
    # A rank draws batch_size * accum_steps windows per step and splits them into micro-batches. So the
    # windows of a step depend only on (seed, step) and the global batch size, not on how it is split.
    train_loader = make_loader(data, 'train', config['batch_size'] * accum_steps, config, device, rank, world_size)
    val_loader = make_loader(data, 'val', config['batch_size'], config, device, rank, world_size)
    val_batches = eval_batches(val_loader, config['eval_iters'], config['batch_size'], rank, world_size)

    # model and memory loss
    t0 = time.time()
    model = build_model(config, data.vocab_size, ckpt).to(device)
    cfg = model.config
    print0(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {model.num_params() / 1e6:.1f}M "
           f"parameters, from {ckpt_file if ckpt is not None else config['init_from']} ({time.time() - t0:.1f} s)")
    check_model_fits_data(config, cfg, data)
    if not config['train_embeddings']:
        model.embed_tokens.weight.requires_grad_(False)
    memory = build_memory_loss(config, cfg)
    if memory is not None:
        try:
            model.check_hidden_layers(memory.layers)
        except ValueError as e:
            raise ConfigError(f"memory_layer={config['memory_layer']!r} does not fit the model: {e}") from None
        if ckpt is not None:
            restore_memory(memory, ckpt)
        memory.to(device)
        print0(f"memory loss: {config['memory_loss']} at layers {memory.layers} (weights {memory.weights}), "
               f"offset {config['memory_offset']}, norm {config['memory_norm']}, weight {config['memory_weight']}, "
               f"{sum(p.numel() for p in memory.parameters() if p.requires_grad) / 1e6:.2f}M head parameters")
    use_xent = bool(config['xent_weight'])
    train_memory = memory is not None and bool(config['memory_weight'])

    # optimizer, and the state of a resumed run
    optimizer = configure_optimizer(config, model, memory, device.type)
    iter_num, best_val_loss, wandb_run_id = 0, float('inf'), None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        iter_num, best_val_loss = ckpt['iter'], ckpt['best_val_loss']
        wandb_run_id = ckpt.get('wandb_run_id')
        set_rng_state(ckpt['rng'])
        del ckpt  # frees the checkpoint's copy of the weights and optimizer state
    start_iter = iter_num

    # the module the backward pass runs through: compiled and wrapped for DDP as configured
    loss_model = LossModel(model, memory, use_xent, train_memory)
    if config['compile']:
        print0("compiling the model (takes a minute on a GPU, 10-20 s on CPU)")
        loss_model.model = torch.compile(model)
    # Parameters that get no gradient in some configurations: the blocks after the deepest memory layer
    # when xent is off, the heads when memory_weight is 0. DDP then has to look for them every step.
    find_unused = not use_xent or (memory is not None and not train_memory)
    if dist.is_initialized():
        loss_model = DDP(loss_model, device_ids=[device.index] if device.type == 'cuda' else None,
                         find_unused_parameters=find_unused, broadcast_buffers=False)

    # logging
    flops, peak_name = peak_flops(device)
    flops_per_step = model.flops_per_token(config['block_size']) * tokens_per_step
    print0(f"MFU against the bf16 dense peak of {peak_name} ({flops / 1e12:.0f} TFLOP/s per GPU)" if flops
           else f"MFU: n/a ({peak_name})")
    log = None
    out_dir.mkdir(parents=True, exist_ok=True)  # on every rank: exist_ok makes it safe, windows_rank{r}.txt needs it
    if master:
        wandb_run = None
        if config['wandb_log']:
            wandb_run = start_wandb(config, wandb_run_id)
            wandb_run_id = wandb_run.id  # checkpoints carry it, so a resumed run continues this run
        log = MetricsLog(out_dir / 'log.txt', wandb_run)
    window_log = open(out_dir / f"windows_rank{rank}.txt", 'a') if config['log_windows'] else None
    nan_iter = int(os.environ[NAN_TEST_ENV]) if os.environ.get(NAN_TEST_ENV) else None
    fault = fault_injector(os.environ.get(FAULT_TEST_ENV), rank)

    # the running statistics of the memory loss need values before the first step uses them
    if memory is not None and memory.needs_calibration:
        calibrate_memory(model, memory, train_loader, iter_num, accum_steps, config, autocast, data)

    def make_checkpoint():
        return {'model': model.state_dict(), 'model_config': cfg.to_dict(),
                'memory': memory.state_dict() if memory is not None else None,
                'memory_settings': memory.settings() if memory is not None else None,
                'optimizer': optimizer.state_dict(), 'config': config, 'iter': iter_num,
                'best_val_loss': best_val_loss, 'rng': rng_state(),
                'data': {'folder': str(data.path), 'seed': config['seed'], 'next_step': iter_num,
                         'windows_per_step': config['batch_size'] * config['gradient_accumulation_steps']},
                'world_size': world_size, 'wandb_run_id': wandb_run_id}

    # training loop
    step_seconds, steps_since_log = 0.0, 0  # time in training steps since the last log line (no eval, no saving)
    while True:
        last = iter_num >= config['max_iters']
        # The evaluation uses this iteration's teacher temperature too, so a resumed run (whose memory
        # loss starts at the default temperature) evaluates exactly as the uninterrupted run.
        if memory is not None:
            memory.set_teacher_temp(dino_teacher_temperature(
                iter_num, config['dino_teacher_temp_start'], config['dino_teacher_temp'],
                config['dino_teacher_temp_warmup_iters']))

        # evaluate and checkpoint
        if iter_num % config['eval_interval'] == 0 or last:
            metrics = evaluate(model, memory, val_batches, autocast, data.bos_id, data.pad_id, config)
            fault('eval', iter_num)
            best_val_loss = min(best_val_loss, metrics['val_loss'])
            print0(f"iter {iter_num} | val xent {metrics['val_xent']:.4f}" +
                   (f" | val mem {metrics['val_mem']:.4f}" if 'val_mem' in metrics else ''))
            if master:
                log.write(iter_num, metrics)
        if master and iter_num > start_iter and (iter_num % config['ckpt_interval'] == 0 or last):
            path = save(make_checkpoint(), out_dir, iter_num, config['keep_last'],
                        on_stage=lambda stage: fault(f"ckpt_{stage}", iter_num))
            print0(f"saved {path}")
            fault('ckpt_saved', iter_num)
        if last:
            break

        # schedules
        t_step = time.time()
        factor = lr_factor(iter_num, config['warmup_iters'], config['lr_decay_iters'] or config['max_iters'],
                           config['min_lr_ratio'], config['decay_lr'])
        for group in optimizer.param_groups:
            group['lr'] = group['peak_lr'] * factor

        # the step's windows and their counts over all ranks, which normalize every micro-batch's loss
        x_all, y_all, start_all, doc_all = train_loader.get_batch(iter_num)
        usable_all = memory_positions(x_all, data.bos_id, data.pad_id) if memory is not None else None
        counts = torch.zeros(2, dtype=torch.float64, device=device)  # scored tokens, memory pairs
        counts[0] = (y_all != IGNORE_INDEX).sum()
        if memory is not None:
            counts[1] = memory_pair_mask(usable_all, memory.offset).sum()
        all_reduce_sum(counts)
        n_tokens, n_pairs = counts[0].clamp(min=1), counts[1].clamp(min=1)
        if window_log is not None:
            for b in range(len(doc_all)):
                window_log.write(f"{iter_num} {b // config['batch_size']} {int(doc_all[b])} {int(start_all[b])}\n")
            window_log.flush()

        # forward and backward over the micro-batches; gradients are synchronized on the last one only
        n_layers = len(memory.layers) if memory is not None else 0
        sums = torch.zeros(2 + 2 * n_layers, dtype=torch.float64, device=device)  # xent, loss, mem and raw per layer
        for micro_step in range(accum_steps):
            rows = slice(micro_step * config['batch_size'], (micro_step + 1) * config['batch_size'])
            x, y = x_all[rows], y_all[rows]
            usable = usable_all[rows] if memory is not None else None
            sync = micro_step == accum_steps - 1 or not isinstance(loss_model, DDP)
            with (nullcontext() if sync else loss_model.no_sync()):
                with autocast:
                    xent, mem = loss_model(x, y, usable)
                # DDP averages gradients over ranks, so each rank's share is scaled back up by world_size
                loss = torch.zeros((), device=device)
                if use_xent:
                    xent_sum = xent.float() * (y != IGNORE_INDEX).sum()
                    loss = loss + config['xent_weight'] * xent_sum / n_tokens.float()
                    sums[0] += xent_sum.detach().double()
                for i, layer in enumerate(memory.layers if memory is not None else ()):
                    if train_memory:
                        loss = loss + config['memory_weight'] * memory.weights[i] * mem[layer]['loss'] / n_pairs.float()
                    sums[2 + i] += mem[layer]['loss'].detach().double()
                    if 'raw' in mem[layer]:
                        sums[2 + n_layers + i] += mem[layer]['raw'].double()
                if nan_iter == iter_num and micro_step == 0 and master:
                    loss = loss * float('nan')
                sums[1] += loss.detach().double()
                (loss * world_size).backward()
                if micro_step == 0:
                    fault('backward', iter_num)

        # step metrics over all ranks, then stop on a non-finite value before anything is updated
        all_reduce_sum(sums)
        step = step_metrics(sums, n_tokens, n_pairs, memory, config, use_xent)
        if not math.isfinite(step['loss']):
            raise NonFiniteLossError(stop_message(iter_num, 'loss', step, out_dir))
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']],
                                                   config['grad_clip'] if config['grad_clip'] > 0 else float('inf'))
        step['grad_norm'] = grad_norm.item()
        if not math.isfinite(step['grad_norm']):
            raise NonFiniteLossError(stop_message(iter_num, 'gradient norm', step, out_dir))
        optimizer.step()
        fault('step', iter_num)
        optimizer.zero_grad(set_to_none=True)
        if memory is not None:
            for layer, values in memory.end_step(all_reduce_sum).items():
                step.update({f"{k}_l{layer}": v for k, v in values.items()})

        # timing and logging
        step_seconds += time.time() - t_step
        steps_since_log += 1
        if iter_num % config['log_interval'] == 0 or iter_num == config['max_iters'] - 1:
            dt = step_seconds / steps_since_log
            step.update(lr=optimizer.param_groups[0]['lr'], dt_ms=1000 * dt, tok_per_s=tokens_per_step / dt)
            if flops:
                step['mfu'] = 100 * flops_per_step / dt / (flops * world_size)
            print0(log_line(iter_num, step))
            warn_collapse(iter_num, step, memory, config)
            if master:
                log.write(iter_num, step)
            fault('log', iter_num)
            step_seconds, steps_since_log = 0.0, 0
        iter_num += 1

    if dist.is_initialized():
        modules = [model] + ([memory] if memory is not None else [])
        same = replicas_identical(modules)
        print0(f"replica check: parameters and buffers {'identical' if same else 'DIFFER'} on all {world_size} ranks")
    if master:
        log.close()
    if window_log is not None:
        window_log.close()
    print0(f"done: {iter_num - start_iter} iterations, best val loss {best_val_loss:.4f}")


@torch.no_grad()
def replicas_identical(modules):
    """Return True when every parameter and buffer is bitwise equal on all ranks (elementwise max == min)."""
    same = True
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            high = tensor.detach().to(torch.float64, copy=True)  # a copy: all_reduce works in place
            low = high.clone()
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            same = same and torch.equal(high, low)
    return same


def make_loader(data, split, batch_size, config, device, rank, world_size):
    from data import Loader
    return Loader(data, split, batch_size, config['block_size'], device=str(device), seed=config['seed'],
                  rank=rank, world_size=world_size)


def check_model_fits_data(config, cfg, data):
    if data.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the data's tokenizer has {data.vocab_size} pieces but the model only {cfg.vocab_size}; "
                          f"prepare the data with the model's tokenizer (--tokenizer)")
    if (data.bos_id, data.pad_id) != (cfg.bos_token_id, cfg.pad_token_id):
        raise ConfigError(f"the data's BOS/pad ids {data.bos_id}/{data.pad_id} differ from the model's "
                          f"{cfg.bos_token_id}/{cfg.pad_token_id}; prepare the data with the model's tokenizer")
    if config['block_size'] > cfg.max_position_embeddings:
        raise ConfigError(f"block_size={config['block_size']} exceeds the model's max_position_embeddings="
                          f"{cfg.max_position_embeddings}; lower block_size")


def restore_memory(memory, ckpt):
    saved = ckpt.get('memory_settings')
    if saved != memory.settings():
        raise CheckpointError(f"the checkpoint's memory-loss settings {saved} differ from this run's "
                              f"{memory.settings()}; resume with the settings of the original run")
    memory.load_state_dict(ckpt['memory'])


@torch.no_grad()
def calibrate_memory(model, memory, loader, it, accum_steps, config, autocast, data):
    """Set the running mean/var from the hidden states of the first step's windows (no loss, no update)."""
    x_all = loader.get_batch(it).x
    for micro_step in range(accum_steps):
        x = x_all[micro_step * config['batch_size']:(micro_step + 1) * config['batch_size']]
        with autocast:
            _, _, hidden = model(x, hidden_layers=memory.layers, return_logits=False)
        memory.calibrate(hidden, memory_positions(x, data.bos_id, data.pad_id))
    memory.end_calibration(all_reduce_sum)


def step_metrics(sums, n_tokens, n_pairs, memory, config, use_xent):
    """Turn the step's all-reduced sums into exact step means: loss, xent, mem and per-layer values."""
    n_tokens, n_pairs = n_tokens.item(), n_pairs.item()
    step = {'loss': sums[1].item()}
    if use_xent:
        step['xent'] = sums[0].item() / n_tokens
    if memory is not None:
        n_layers = len(memory.layers)
        per_layer = (sums[2:2 + n_layers] / n_pairs).tolist()
        raw = (sums[2 + n_layers:] / n_pairs).tolist()
        step['mem'] = sum(w * m for w, m in zip(memory.weights, per_layer))
        for layer, value, raw_value in zip(memory.layers, per_layer, raw):
            step[f"mem_l{layer}"] = value
            if memory.kind == 'l1':
                step[f"mem_raw_l{layer}"] = raw_value
        if memory.kind == 'l1':
            step['mem_raw'] = sum(w * r for w, r in zip(memory.weights, raw))
    return step


def save(ckpt, out_dir, it, keep_last, on_stage=None):
    """Call save_checkpoint and turn a failed write (disk full, I/O error) into CheckpointSaveError."""
    try:
        return save_checkpoint(ckpt, out_dir, it, keep_last, on_stage=on_stage)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as a RuntimeError whose context is the OSError (errno 28: disk full)
        cause = e.__context__ if isinstance(e.__context__, OSError) else e
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        saved = list_checkpoints(out_dir)
        last = f"the last checkpoint {saved[-1]} is intact" if saved else "no earlier checkpoint exists"
        raise CheckpointSaveError(f"saving the checkpoint of iteration {it} in {out_dir} failed ({reason}); {last}; "
                                  f"free disk space or fix the error, then rerun with --init_from=resume") from None


def fault_injector(spec, rank):
    """Return fault(point, it), which SIGKILLs or hangs this process at the place `spec` names (tests only).

    spec is the value of FAULT_TEST_ENV, 'POINT:ITER[:RANK[:hang]]'; None or '' gives a no-op."""
    if not spec:
        return lambda point, it: None
    parts = spec.split(':')
    if len(parts) < 2 or parts[0] not in FAULT_POINTS or parts[4:] or (parts[3:] and parts[3] != 'hang'):
        raise ValueError(f"{FAULT_TEST_ENV}={spec!r} is invalid; use POINT:ITER[:RANK[:hang]] with POINT one of "
                         f"{', '.join(FAULT_POINTS)}")
    point, fault_iter = parts[0], int(parts[1])
    fault_rank = int(parts[2]) if len(parts) > 2 else 0
    hang = len(parts) > 3

    def fault(name, it):
        if (name, it, rank) != (point, fault_iter, fault_rank):
            return
        print(f"test fault: rank {rank} {'hangs' if hang else 'is killed'} at {name}, iteration {it}", flush=True)
        while hang:
            time.sleep(60)
        os.kill(os.getpid(), signal.SIGKILL)
    return fault


def stop_message(it, what, step, out_dir):
    saved = list_checkpoints(out_dir) if out_dir.is_dir() else []
    values = ", ".join(f"{k} {v:.4g}" for k, v in step.items() if k in ('loss', 'xent', 'mem', 'grad_norm'))
    last = f"the last checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
    return (f"{what} is not finite at iteration {it} ({values}); stopped without saving, {last}; lower "
            f"learning_rate or memory_weight, or resume from the checkpoint with other settings")


def log_line(it, step):
    parts = [f"iter {it}", f"loss {step['loss']:.4f}"]
    parts.append(f"xent {step['xent']:.4f}" if 'xent' in step else 'xent off')
    parts.append(f"mem {step['mem']:.4f}" if 'mem' in step else 'mem off')
    parts += [f"lr {step['lr']:.2e}", f"grad norm {step['grad_norm']:.3f}", f"dt {step['dt_ms']:.0f} ms",
              f"tok/s {step['tok_per_s']:,.0f}", f"mfu {step['mfu']:.1f}%" if 'mfu' in step else 'mfu n/a']
    return " | ".join(parts)


def warn_collapse(it, step, memory, config):
    """Print a warning when a DINO head collapses: a near one-hot teacher, or a loss stuck at ln K."""
    if memory is None or memory.kind != 'dino' or it < config['dino_teacher_temp_warmup_iters']:
        return  # a fresh head is near uniform, so its loss starts at ln K without any collapse
    uniform = math.log(config['dino_prototypes'])
    for layer in memory.layers:
        entropy = step.get(f"teacher_entropy_l{layer}")
        value = step.get(f"mem_l{layer}")
        if entropy is not None and entropy < 0.05:
            print0(f"warning: DINO collapse at iter {it}, layer {layer}: teacher entropy {entropy:.4f} < 0.05 "
                   f"(the teacher puts its mass on one prototype); raise dino_teacher_temp or lower head_learning_rate")
        elif value is not None and abs(value - uniform) < 0.01:
            print0(f"warning: DINO collapse at iter {it}, layer {layer}: loss {value:.4f} sits at ln K = "
                   f"{uniform:.4f} (uniform outputs); lower dino_teacher_temp or check the head's input")


if __name__ == '__main__':
    with exit_on_error(ValueError, FileNotFoundError, NonFiniteLossError, CheckpointSaveError):
        main(sys.argv[1:])
