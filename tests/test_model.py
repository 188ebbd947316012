"""model.py against transformers' Gemma 3: tiny random configs and the real 270M."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from model import (IGNORE_INDEX, Gemma, GemmaConfig, KVCache, check_dtype, chunked_cross_entropy, preset,
                   resolve_source)

# (num_key_value_heads, head_dim, sliding_window, T): window below T, kv heads 1 and > 1, head_dim != 48 / 4
TINY_SHAPES = [(1, 16, 16, 64), (2, 24, 8, 40), (4, 8, 100, 30)]


def make_reference(tmp_path, kv_heads=1, head_dim=16, window=16, layers=7, seed=0):
    """A random transformers Gemma3ForCausalLM saved with save_pretrained; returns (model, folder)."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                              sliding_window=window, query_pre_attn_scalar=head_dim, max_position_embeddings=512)
    ref = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norm weights start at zero; randomize them so a (1 + w) slip would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    folder = tmp_path / f"ref_{kv_heads}_{head_dim}_{window}"
    ref.save_pretrained(folder)
    return ref, folder


@pytest.mark.parametrize("kv_heads,head_dim,window,T", TINY_SHAPES)
def test_tiny_logits_and_hidden_match_transformers(tmp_path, kv_heads, head_dim, window, T):
    ref, folder = make_reference(tmp_path, kv_heads, head_dim, window)
    ours = Gemma.from_pretrained(folder).eval()
    idx = torch.randint(0, 300, (2, T))
    with torch.no_grad():
        expected = ref(idx, output_hidden_states=True)
        logits, loss, hidden = ours(idx, hidden_layers=range(8))
    assert loss is None
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    assert sorted(hidden) == list(range(8))
    for i in range(8):
        torch.testing.assert_close(hidden[i], expected.hidden_states[i], atol=1e-4, rtol=0, msg=f"hidden {i}")


def test_sharded_safetensors_folder_loads(tmp_path):
    ref, _ = make_reference(tmp_path)
    folder = tmp_path / "sharded"
    ref.save_pretrained(folder, max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").is_file()
    ours = Gemma.from_pretrained(folder).eval()
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], ref(idx).logits, atol=1e-4, rtol=0)


def test_hidden_only_stops_after_deepest_block(tmp_path):
    _, folder = make_reference(tmp_path)
    model = Gemma.from_pretrained(folder).eval()
    ran = []
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
    idx = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        logits, loss, hidden = model(idx, hidden_layers=(3,), return_logits=False)
        full = model(idx, hidden_layers=(3,))[2]
    assert logits is None
    assert loss is None
    assert ran[:3] == [0, 1, 2]  # the early-stopping call ran blocks 0..2 only
    assert len(ran) == 3 + 7     # and the full call ran all 7
    torch.testing.assert_close(hidden[3], full[3])


def test_hidden_index_out_of_range_names_valid_range(tmp_path):
    _, folder = make_reference(tmp_path)
    model = Gemma.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.7"):
        model(torch.zeros(1, 4, dtype=torch.long), hidden_layers=(8,))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.zeros(1, 4, dtype=torch.long), hidden_layers=(-1,))


def test_chunked_loss_equals_full_loss_and_gradients(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(50, 48, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 48, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[[3, 17, 40]] = IGNORE_INDEX
    loss = chunked_cross_entropy(x, weight, targets, chunk=7)
    gx, gw = torch.autograd.grad(loss, (x, weight))
    expected = torch.nn.functional.cross_entropy(x @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    ex, ew = torch.autograd.grad(expected, (x, weight))
    assert abs(loss.item() - expected.item()) < 1e-6
    torch.testing.assert_close(gx, ex, atol=1e-6, rtol=0)
    torch.testing.assert_close(gw, ew, atol=1e-6, rtol=0)


def test_chunked_loss_under_bf16_autocast():
    # bf16 logits take the fp32 scratch path: 300 rows make 2 chunks and several partial row blocks
    torch.manual_seed(0)
    x = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    targets = torch.randint(0, 500, (300,))
    targets[[0, 150, 299]] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(x, weight, targets, chunk=200)
    gx, gw = torch.autograd.grad(loss, (x, weight))
    logits = (x.bfloat16() @ weight.bfloat16().t()).float()  # bf16 matmul, fp32 softmax, as autocast runs it
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    ex, ew = torch.autograd.grad(expected, (x, weight))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()
    torch.testing.assert_close(gx, ex, atol=2e-2 * ex.abs().max().item(), rtol=0)
    torch.testing.assert_close(gw, ew, atol=2e-2 * ew.abs().max().item(), rtol=0)


def test_chunked_loss_backward_runs_once():
    # backward hands its gradient buffers to autograd, so a retained graph cannot be reused
    x = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    loss = chunked_cross_entropy(x, weight, torch.randint(0, 20, (6,)), chunk=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_model_loss_equals_unchunked_fp32(tmp_path):
    ref, folder = make_reference(tmp_path)
    model = Gemma.from_pretrained(folder)
    model.loss_chunk = 13  # several chunks, last one partial
    idx = torch.randint(0, 300, (2, 40))
    targets = torch.randint(0, 300, (2, 40))
    targets[0, :5] = IGNORE_INDEX
    _, loss, _ = model(idx, targets)
    loss.backward()
    expected = torch.nn.functional.cross_entropy(ref(idx).logits.flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE_INDEX)
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-6
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads["model." + name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_all_targets_ignored_gives_zero_loss(tmp_path):
    _, folder = make_reference(tmp_path)
    model = Gemma.from_pretrained(folder)
    idx = torch.randint(0, 300, (1, 8))
    _, loss, _ = model(idx, torch.full((1, 8), IGNORE_INDEX))
    assert loss.item() == 0.0


def test_kv_cache_equals_full_forward_across_window(tmp_path):
    _, folder = make_reference(tmp_path, window=16)
    model = Gemma.from_pretrained(folder).eval()
    idx = torch.randint(0, 300, (1, 60))
    prompt, options = idx[:, :45], torch.randint(0, 300, (3, 9))  # prompt longer than the window
    with torch.no_grad():
        last, cache = model.forward_cached(prompt, num_logits=1)
        batch_logits, _ = model.forward_cached(options, cache.expand(3))
        for b in range(3):
            full = model(torch.cat((prompt, options[b:b + 1]), dim=1))[0]
            torch.testing.assert_close(batch_logits[b], full[0, 45:], atol=1e-4, rtol=0)
            torch.testing.assert_close(last[0, 0], full[0, 44], atol=1e-4, rtol=0)
    assert cache.length == 45  # reusing the cache did not extend it


def test_kv_cache_step_by_step_decoding(tmp_path):
    _, folder = make_reference(tmp_path, window=8)
    model = Gemma.from_pretrained(folder).eval()
    idx = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        full = model(idx)[0]
        cache = None
        for t in range(30):
            logits, cache = model.forward_cached(idx[:, t:t + 1], cache)
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-4, rtol=0)


def test_right_padding_leaves_real_tokens_unchanged(tmp_path):
    _, folder = make_reference(tmp_path, window=8)
    model = Gemma.from_pretrained(folder).eval()
    idx = torch.randint(0, 300, (1, 20))
    padded = torch.cat((idx, torch.zeros(1, 12, dtype=torch.long)), dim=1)
    with torch.no_grad():
        a, b = model(idx)[0], model(padded)[0]
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b[:, :20], a, atol=1e-5, rtol=0)


def test_fp16_rejected_with_reason(tmp_path):
    _, folder = make_reference(tmp_path)
    with pytest.raises(ValueError, match="65504"):
        Gemma.from_pretrained(folder, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        check_dtype(torch.float16)


def test_bf16_close_to_fp32(tmp_path):
    _, folder = make_reference(tmp_path)
    idx = torch.randint(0, 300, (1, 32))
    with torch.no_grad():
        fp32 = Gemma.from_pretrained(folder).eval()(idx)[0]
        bf16 = Gemma.from_pretrained(folder, dtype=torch.bfloat16).eval()(idx)[0]
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_tied_head_shares_storage_after_optimizer_step(tmp_path):
    _, folder = make_reference(tmp_path)
    model = Gemma.from_pretrained(folder)
    assert model.lm_head_weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.embed_tokens.weight.detach().clone()
    _, loss, _ = model(torch.randint(0, 300, (1, 16)), torch.randint(0, 300, (1, 16)))
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.embed_tokens.weight)
    assert model.lm_head_weight is model.embed_tokens.weight
    assert sum(p.numel() == 300 * 48 for p in model.parameters()) == 1  # one tensor, not two


def test_presets_match_released_sizes():
    with torch.device("meta"):
        assert Gemma(preset("gemma3-270m")).num_params() == 268_098_176
        assert Gemma(preset("gemma3-1b")).num_params() == 999_885_952
    assert preset("gemma3-270m").layer_types.count("full_attention") == 3


@pytest.mark.parametrize("field,value,message", [
    ("num_key_value_heads", 3, "not divisible by num_key_value_heads"),
    ("head_dim", 15, "head_dim=15 is odd"),
    ("hidden_size", 0, "hidden_size=0 is invalid"),
    ("layer_types", ("sliding_attention",), "layer_types has 1 entries"),
    ("rms_norm_eps", -1.0, "rms_norm_eps=-1.0 is invalid"),
])
def test_config_validation_names_field(field, value, message):
    d = preset("gemma3-270m").to_dict()
    d[field] = value
    with pytest.raises(ValueError, match=message):
        GemmaConfig.from_dict(d)


def test_config_roundtrip_through_hf_dict():
    cfg = preset("gemma3-1b")
    assert GemmaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    old_style = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("rope_parameters", "layer_types")}
    old_style.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6)
    assert GemmaConfig.from_hf_dict(old_style) == cfg


def test_folder_with_missing_tensor_lists_it(tmp_path):
    from safetensors.torch import load_file, save_file
    _, folder = make_reference(tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 \(layers\.2\.mlp\.up_proj\.weight\)"):
        Gemma.from_pretrained(folder)


def test_wrong_shape_is_named(tmp_path):
    _, folder = make_reference(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight has shape \(96, 48\), expected \(64, 48\)"):
        Gemma.from_pretrained(folder)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="unreachable.*local folder"):
        resolve_source("google/gemma-3-270m")


def test_non_gemma_gguf_rejected(tmp_path):
    import gguf
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not a Gemma 3 GGUF file.*architecture='llama'"):
        Gemma.from_pretrained(path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="could not be read as a GGUF file"):
        Gemma.from_pretrained(junk)

# -----------------------------------------------------------------------------
# The real Gemma 3 270M


@pytest.fixture(scope="session")
def reference_270m(gguf_path):
    """transformers' own GGUF loader on the same file: the independent reference."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="session")
def english_ids(reference_270m):
    """799 tokens of a real Gutenberg play (As You Like It), with BOS in front: longer than the window."""
    import data
    folder = data.prepare(verbose=False)
    i = next(i for i, r in enumerate(folder.records("val")) if r["title"] == "As You Like It")
    tokenizer = reference_270m[0]
    ids = tokenizer(folder.text("val", i)[:8000], add_special_tokens=False, split_special_tokens=True).input_ids
    return torch.tensor([[2] + ids[:799]])


def test_real_270m_matches_transformers_gguf(real_model, reference_270m, english_ids):
    _, ref = reference_270m
    with torch.no_grad():
        expected = ref(english_ids, output_hidden_states=True)
        logits, _, hidden = real_model(english_ids, hidden_layers=(6, 12, 18))
    diff = (logits - expected.logits).abs()
    assert english_ids.shape[1] == 800
    assert diff.max() < 1e-3
    assert diff[:, 512:].max() < 1e-3  # positions that need the global layers to see the start
    for i in (6, 12, 18):
        scale = expected.hidden_states[i].abs().max()
        assert (hidden[i] - expected.hidden_states[i]).abs().max() < 1e-5 * scale


def test_real_270m_nll_in_sane_range(real_model, english_ids):
    with torch.no_grad():
        _, loss, _ = real_model(english_ids[:, :-1], english_ids[:, 1:])
    # Measured 3.53 nats on this excerpt (early-modern spelling); a broken forward gives > 8.
    assert 2.5 < loss.item() < 4.5


def test_real_270m_kv_cache_across_window(real_model, english_ids):
    prompt, rest = english_ids[:, :600], english_ids[:, 600:640]
    with torch.no_grad():
        _, cache = real_model.forward_cached(prompt, num_logits=1)
        cached, _ = real_model.forward_cached(rest, cache)
        full = real_model(english_ids[:, :640])[0]
    torch.testing.assert_close(cached, full[:, 600:], atol=1e-4, rtol=0)


def test_dequantized_cache_equals_model(real_model, gguf_path):
    from model import read_gguf_cached
    read_gguf_cached(gguf_path)  # writes the cache entry if the session fixture did not
    config, state_dict = read_gguf_cached(gguf_path)
    assert config == real_model.config
    for name, tensor in real_model.state_dict().items():
        assert torch.equal(state_dict[name], tensor), name


def test_chunked_loss_under_no_grad_builds_no_gradients(monkeypatch):
    x = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    allocated = []
    real_zeros = torch.zeros

    def counting_zeros(*args, **kwargs):
        allocated.append(args)
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", counting_zeros)
    with torch.no_grad():
        loss = chunked_cross_entropy(x, weight, targets, chunk=8)
    monkeypatch.undo()
    assert not loss.requires_grad
    assert all(tuple(a[0]) != (50, 8) for a in allocated if a and isinstance(a[0], torch.Size))  # no weight gradient
    expected = torch.nn.functional.cross_entropy(x @ weight.t(), targets)
    assert abs(loss.item() - expected.item()) < 1e-5
