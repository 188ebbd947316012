"""
Export a checkpoint or pretrained Gemma 3 as a Hugging Face folder for transformers, lm-eval's CLI, vLLM and others.

    python export.py --ckpt=out/ --out=out/hf                     # newest checkpoint in out/
    python export.py --init_from=gemma3-270m-gguf --out=/tmp/gemma3-270m --dtype=bfloat16
    python export.py --help                                       # every setting with its default

The folder contains
    config.json              Gemma3ForCausalLM config (model_type gemma3_text), written by transformers
    generation_config.json   BOS, EOS and pad ids
    model.safetensors        weights under transformers' names ('model.' + ours); the LM head is tied
                             to the embedding, so no lm_head.weight is stored (as save_pretrained does)
    tokenizer.model          our SentencePiece model, byte for byte
    tokenizer_config.json    GemmaTokenizer, BOS added to each input as Gemma expects
    special_tokens_map.json
and loads with transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained(folder) or
Gemma.from_pretrained(folder). Files are written to a temporary folder next to the target, checked,
and renamed into place, so the target is either complete or absent.

Other scripts use the Python API:

    folder, checks = export_hf(model, tokenizer, 'out/hf', dtype=torch.bfloat16)
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from configurator import configure, exit_on_error
from model import GGUF_ALIAS, Gemma
from perplexity import load_model

# -----------------------------------------------------------------------------
# settings: `python export.py --key=value` overrides any of these (see configurator.py)
ckpt = ''                      # checkpoint file, or a folder of ckpt_*.pt (the newest valid one); '' = use init_from
init_from = GGUF_ALIAS         # weights when ckpt is '': hub id, HF folder, .gguf file or the GGUF alias
out = ''                       # output folder (required); it must not exist unless --overwrite
dtype = 'float32'              # storage dtype of the weights: float32 | bfloat16 (half the size, rounded weights)
overwrite = False              # replace an existing output folder (removed only after the new one is complete)
verify = True                  # reload with transformers and model.py before renaming; compare weights, logits, ids

# English text with punctuation, digits, an accent, a dash, a newline and a run of spaces, on which the
# verification compares token ids and logits.
PROBE_TEXT = ("It was the best of times, it was the worst of times; in 1859 Dickens wrote of Paris and London.\n"
              "Café owners    counted 3.5 francs — \"enough,\" said one.")
LOGITS_TOLERANCE = 1e-4  # max |logit difference| between transformers and model.py in float32

# -----------------------------------------------------------------------------
# writing the folder


def tokenizer_files(tokenizer, max_length):
    """Return {file name: JSON dict} of the transformers tokenizer configuration for our SentencePiece model."""
    piece = tokenizer.sp.id_to_piece
    special = {'bos_token': piece(tokenizer.bos_id), 'eos_token': piece(tokenizer.eos_id),
               'pad_token': piece(tokenizer.pad_id), 'unk_token': piece(tokenizer.sp.unk_id())}
    config = {'tokenizer_class': 'GemmaTokenizer', **special,
              'add_bos_token': True,      # Gemma was trained with BOS at the start of every input
              'add_eos_token': False,
              'clean_up_tokenization_spaces': False,  # decode must give back the text exactly
              'spaces_between_special_tokens': False,
              'model_max_length': max_length}
    return {'tokenizer_config.json': config, 'special_tokens_map.json': special}


def write_folder(model, tokenizer, folder, dtype):
    """Write config, weights and tokenizer files into an existing empty folder."""
    from safetensors.torch import save_file
    from transformers import Gemma3TextConfig, GenerationConfig
    cfg = model.config
    Gemma3TextConfig(**cfg.to_hf_dict(), dtype=dtype).save_pretrained(folder)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(folder)
    (folder / 'tokenizer.model').write_bytes(tokenizer.model_bytes)
    weights = {'model.' + name: tensor.detach().to(device='cpu', dtype=dtype).contiguous()
               for name, tensor in model.state_dict().items()}
    save_file(weights, folder / 'model.safetensors', metadata={'format': 'pt'})  # 'pt': transformers' check
    # safetensors 0.8 creates the file with mode 0600; give it the mode the umask gives the other files
    shutil.copymode(folder / 'tokenizer.model', folder / 'model.safetensors')
    for name, content in tokenizer_files(tokenizer, cfg.max_position_embeddings).items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + '\n')

# -----------------------------------------------------------------------------
# verification


@torch.no_grad()
def verify_folder(model, tokenizer, folder, dtype, text=PROBE_TEXT):
    """Raise ValueError unless the folder reloads to the same weights, logits and token ids; return the figures.

    model.py's loader must read back every weight exactly, as the in-memory weights rounded to
    `dtype`. AutoTokenizer must give the same ids as our tokenizer on `text`, BOS included. And
    transformers' float32 logits on those ids must match model.py's on the reloaded weights to
    LOGITS_TOLERANCE.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    reloaded = Gemma.from_pretrained(folder).eval()
    expected = {k: v.detach().cpu().to(dtype).float() for k, v in model.state_dict().items()}
    for name, tensor in reloaded.state_dict().items():
        if not torch.equal(tensor, expected[name]):
            raise ValueError(f"{folder}: weight {name} reads back different from the model; the export is broken")

    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    hf_ids = hf_tokenizer(text).input_ids
    if hf_ids != ids:
        first = next(i for i, (a, b) in enumerate(zip(hf_ids + [None], ids + [None])) if a != b)
        raise ValueError(f"{folder}: AutoTokenizer ids differ from ours from position {first} "
                         f"({hf_ids[first:first + 5]} vs {ids[first:first + 5]})")

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    idx = torch.tensor([ids])
    diff = (hf_model(idx).logits - reloaded(idx)[0]).abs().max().item()
    if not diff <= LOGITS_TOLERANCE:
        raise ValueError(f"{folder}: transformers' logits differ from model.py's by {diff:.2e} "
                         f"(tolerance {LOGITS_TOLERANCE}); the exported config does not describe the model")
    return {'max_logit_diff': diff, 'probe_tokens': len(ids)}


def export_hf(model, tokenizer, out_dir, dtype=torch.float32, overwrite=False, verify=True):
    """Write a Hugging Face folder for model and tokenizer at out_dir through a temporary folder.

    With verify, the temporary folder must pass verify_folder() before it is renamed into place.
    Returns (the folder's Path, verify_folder()'s figures or None).
    Raises FileExistsError when out_dir exists and overwrite is False.
    """
    out_dir = Path(out_dir).expanduser()
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype={dtype} is not supported for export; use float32 or bfloat16 "
                         f"(float16 overflows on Gemma 3 activations)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists; pass --overwrite to replace it or choose another --out")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model has vocab_size="
                         f"{model.config.vocab_size}; export the tokenizer the model was trained with")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_folder(model, tokenizer, tmp, dtype)
        checks = verify_folder(model, tokenizer, tmp, dtype) if verify else None
        if out_dir.exists():  # overwrite: move the old folder aside, so a crash leaves one complete folder
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir, checks


if __name__ == '__main__':
    with exit_on_error(ValueError, FileNotFoundError, FileExistsError):
        config = configure(globals(), sys.argv[1:])
        if not out:
            raise ValueError("--out is required: pass the folder to create, e.g. --out=out/hf")
        if dtype not in ('float32', 'bfloat16'):
            raise ValueError(f"dtype={dtype!r} is invalid; use float32 or bfloat16")
        if Path(out).expanduser().exists() and not overwrite:  # fail before the slow load
            raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it or choose another --out")

        # setup
        t0 = time.time()
        model, tokenizer, info = load_model(ckpt, init_from, 'cpu', torch.float32)
        print(f"loaded {info['source']} ({model.num_params() / 1e6:.1f}M parameters) in {time.time() - t0:.1f} s")

        # the work
        t0 = time.time()
        folder, checks = export_hf(model, tokenizer, out, getattr(torch, dtype), overwrite, verify)

        # the report
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"wrote {folder} ({size:,.0f} MiB, {dtype}) in {time.time() - t0:.1f} s")
        if checks:
            print(f"verified: weights read back exactly, AutoTokenizer ids equal ours on {checks['probe_tokens']} "
                  f"tokens, transformers' logits within {checks['max_logit_diff']:.1e} of model.py's")
        else:
            print("not verified (--verify=False)")
