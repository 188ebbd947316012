"""nihs.py on real Gutenberg text and the real Gemma 3 270M: needle placement, scoring, statistics, CLI."""

import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import nihs
from conftest import ROOT

# A sentence boundary as this test reads it, written out independently of nihs.SENTENCE_END: the
# text before a needle must end with . ! or ? (closing quotes or brackets allowed).
ENDS_SENTENCE = re.compile(r"[.!?]['\")\]]*$")
SENTENCE_END = re.compile(r"[.!?]['\")\]]*(?=\s|$)")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's forward passes on one thread, then restore the session's setting.

    On a 2-core machine shared with other test runs, two OpenMP threads per process wait on each
    other at every small op. Under a load average of 4-6 this module took 8.6 minutes with 2 threads
    and 2.8 minutes with 1. Two threads may be faster on an idle machine, but one keeps the module short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return nihs.load_tokenizer("gemma3-270m-gguf")


@pytest.fixture(scope="module")
def docs():
    return nihs.load_documents("gutenberg", "test", "gemma3-270m-gguf")


def haystack_of(tok, docs, tokens, seed=0):
    return nihs.cut_haystack(tok, docs, tokens, random.Random(seed))


def strip_needles(text, needles):
    for needle in needles:
        text = text.replace(" " + needle.text, "").replace(needle.text + " ", "").replace(needle.text, "")
    return text


# -----------------------------------------------------------------------------
# needle placement


def test_needle_lands_at_every_depth(tok, docs):
    haystack = haystack_of(tok, docs, 1000)
    assert 900 <= haystack.num_tokens <= 1000
    needles = nihs.draw_needles("city", random.Random(1))
    H = len(tok.encode(haystack.text))
    for depth in range(101):
        trial = nihs.build_trial(tok, haystack, needles, "city", depth, random.Random(depth))
        start = trial.prompt.index(needles[0].text)
        before = strip_needles(trial.prompt[:start], needles[1:]).rstrip()
        assert before == "" or ENDS_SENTENCE.search(before), f"depth {depth}: not at a sentence end: {before[-40:]!r}"
        assert trial.prompt[start + len(needles[0].text)] in " \n", f"depth {depth}: needle runs into the next word"

        # haystack tokens before the needle, and the sentences on either side of it
        prefix_tokens = len(tok.encode(before))
        previous = ([0] + [m.end() for m in SENTENCE_END.finditer(before[:-1])])[-1]
        previous_sentence = len(tok.encode(before[previous:]))
        rest = haystack.text[len(before):]
        following = next((m.end() for m in SENTENCE_END.finditer(rest)), len(rest))
        next_sentence = len(tok.encode(rest[:following]))
        goal = depth / 100 * H
        slack = 3  # tokens: sentence-by-sentence counts differ from one whole encoding at a few joins
        assert prefix_tokens - previous_sentence - slack <= goal <= prefix_tokens + next_sentence + slack, \
            f"depth {depth}: needle after {prefix_tokens} of {H} tokens, more than one sentence from {goal:.0f}"


def test_needle_positions_match_tokens(tok, docs):
    haystack = haystack_of(tok, docs, 1000, seed=2)
    needles = nihs.draw_needles("uuid", random.Random(2))
    for depth in (0, 33, 100, "adjacent"):
        trial = nihs.build_trial(tok, haystack, needles, "uuid", depth, random.Random(3))
        assert len(trial.positions) == 4
        for needle, (first, end) in zip(needles, trial.positions):
            assert tok.decode(trial.ids[first:end]).strip() == needle.text
        assert tok.decode(trial.ids[trial.question_pos:]).startswith("Question: What is the access code for")
        record = nihs.trial_record(trial)
        assert record["distance"] == trial.question_pos - trial.positions[0][1]
        assert record["prompt_len"] == len(trial.ids)
    assert record["distance"] <= 2  # adjacent: only the blank line before the question


def test_distractors_present_and_distinct(tok, docs):
    for kind in nihs.NEEDLE_KINDS:
        for index in range(20):
            trial = nihs.make_trial(tok, docs, kind, 512, 50, index, seed=7)
            keys = [needle.key for needle in trial.needles]
            values = [needle.value for needle in trial.needles]
            assert len(set(keys)) == 4
            assert len(set(values)) == 4
            for needle in trial.needles:
                assert trial.prompt.count(needle.text) == 1
            assert trial.needles[0].key in trial.question
            assert all(needle.key not in trial.question for needle in trial.needles[1:])


def test_no_needle_control_plants_nothing(tok, docs):
    trial = nihs.make_trial(tok, docs, "uuid", 512, "none", 0, seed=7)
    assert trial.positions == []
    assert all(needle.value not in trial.prompt for needle in trial.needles)
    assert "access code" not in trial.prompt.split("\n\nQuestion:")[0]


def test_bos_exactly_once(tok, docs):
    for kind in nihs.NEEDLE_KINDS:
        for depth in (0, 50, 100, "adjacent", "none"):
            trial = nihs.make_trial(tok, docs, kind, 256, depth, 1, seed=3)
            assert trial.ids[0] == tok.bos_id
            assert trial.ids.count(tok.bos_id) == 1
            assert trial.ids[1:] == tok.encode(trial.prompt)


def test_prompt_length_within_request(tok, docs):
    for kind in nihs.NEEDLE_KINDS:
        for length in (256, 1024, 4096):
            for depth in (25, "none"):
                trial = nihs.make_trial(tok, docs, kind, length, depth, 0, seed=5)
                assert len(trial.ids) <= length
                assert len(trial.ids) >= 0.8 * length, f"{kind} {length} {depth}: only {len(trial.ids)} tokens"


def test_too_short_length_rejected(tok, docs):
    with pytest.raises(ValueError, match=r"length 128 is too short: .* use --lengths of at least \d+"):
        nihs.make_trial(tok, docs, "uuid", 128, 50, 0, seed=1)
    settings = nihs.resolve_settings({"lengths": [128], "needle": "uuid"})
    with pytest.raises(ValueError, match="length 128 is too short"):
        nihs.check_grid_fits(tok, docs, settings)


def test_trials_deterministic_for_seed(tok, docs):
    a = nihs.make_trial(tok, docs, "uuid", 512, 75, 4, seed=11)
    b = nihs.make_trial(tok, docs, "uuid", 512, 75, 4, seed=11)
    c = nihs.make_trial(tok, docs, "uuid", 512, 75, 4, seed=12)
    assert a.prompt == b.prompt
    assert a.ids == b.ids
    assert a.prompt != c.prompt
    deeper = nihs.make_trial(tok, docs, "uuid", 512, 25, 4, seed=11)
    assert deeper.needles == a.needles  # the cells of one length share needles and haystack
    assert deeper.haystack.text == a.haystack.text


def test_haystacks_come_from_test_split(docs):
    titles = {doc.title for doc in docs}
    import data
    folder = data.prepare(dataset="gutenberg", tokenizer="gemma3-270m-gguf", verbose=False)
    train_titles = {r["title"] for r in folder.records("train")}
    assert titles and not titles & train_titles


# -----------------------------------------------------------------------------
# scoring


def test_join_split_never_empty(tok):
    cases = [("Hello.\n", ["\nWorld", "\n\nAgain"]), ("The code is", [" 3fa1", " x"]), ("abc", ["def", " d"])]
    for prompt, continuations in cases:
        prompt_ids = [tok.bos_id] + tok.encode(prompt)
        shared, conts = nihs.split_continuations(tok, prompt_ids, prompt, continuations)
        assert 1 <= shared <= len(prompt_ids)
        for continuation, cont in zip(continuations, conts):
            assert cont, f"{prompt!r} + {continuation!r}: empty continuation"
            assert tok.decode(prompt_ids[1:shared] + cont) == prompt + continuation
    shared, _ = nihs.split_continuations(tok, [tok.bos_id] + tok.encode("Hello.\n"), "Hello.\n", ["\nWorld"])
    assert shared < 1 + len(tok.encode("Hello.\n"))  # ".\n" + "\n" merged: the join moved into the prompt


def full_sequence_logprobs(model, prefix, cont):
    """Reference: run prefix + continuation as one sequence without a cache (LM head on the scored rows only)."""
    idx = torch.tensor([prefix + cont])
    n_layer = model.config.num_hidden_layers
    final = model(idx, hidden_layers=(n_layer,), return_logits=False)[2][n_layer][0]  # after the final norm
    logits = final[len(prefix) - 1:-1].float() @ model.embed_tokens.weight.float().T
    logprobs = F.log_softmax(logits, dim=-1)
    return [logprobs[j, token].item() for j, token in enumerate(cont)]


def test_cached_scoring_equals_full_scoring(real_model, tok, docs):
    trial = nihs.make_trial(tok, docs, "uuid", 256, 50, 0, seed=1)
    values = sorted(needle.value for needle in trial.needles)
    shared, conts = nihs.split_continuations(tok, trial.ids, trial.prompt, [" " + v for v in values])
    assert shared == len(trial.ids)
    assert len({len(c) for c in conts}) > 1  # continuations of different lengths: the batch is padded
    cached = nihs.continuation_logprobs(real_model, trial.ids, conts)
    with torch.no_grad():
        for cont, scores in zip(conts, cached):
            reference = full_sequence_logprobs(real_model, trial.ids, cont)
            assert len(scores) == len(cont)
            assert max(abs(a - b) for a, b in zip(scores, reference)) < 1e-4


def test_option_order_does_not_matter(real_model, tok, docs):
    trial = nihs.make_trial(tok, docs, "city", 256, "adjacent", 0, seed=1)
    values = [needle.value for needle in trial.needles]
    forward = nihs.score_trial(real_model, tok, trial, options=values)
    backward = nihs.score_trial(real_model, tok, trial, options=values[::-1])
    for i, value in enumerate(values):
        j = values[::-1].index(value)
        assert forward["scores"]["acc"][i] == pytest.approx(backward["scores"]["acc"][j], abs=1e-5)
    assert forward["hits"] == backward["hits"]


# -----------------------------------------------------------------------------
# statistics on hand-made results


def test_wilson_interval_matches_references():
    from scipy.stats import binomtest
    for k, n in [(0, 10), (1, 10), (5, 10), (10, 10), (81, 263), (37, 50), (3, 200)]:
        expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = nihs.wilson_interval(k, n)
        assert low == pytest.approx(expected.low, abs=1e-9)
        assert high == pytest.approx(expected.high, abs=1e-9)
    # by hand: with k = 0 the interval is [0, z^2 / (n + z^2)]
    z2 = 1.959963984540054 ** 2
    assert nihs.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))


def newcombe_reference(k1, n1, k2, n2):
    """Newcombe's hybrid score interval for p1 - p2, from scipy's Wilson limits of each proportion:
    p1 - p2 - sqrt((p1 - L1)^2 + (U2 - p2)^2) to p1 - p2 + sqrt((U1 - p1)^2 + (p2 - L2)^2)."""
    from scipy.stats import binomtest
    p1, p2 = k1 / n1, k2 / n2
    w1 = binomtest(k1, n1).proportion_ci(method="wilson")
    w2 = binomtest(k2, n2).proportion_ci(method="wilson")
    return (p1 - p2 - math.sqrt((p1 - w1.low) ** 2 + (w2.high - p2) ** 2),
            p1 - p2 + math.sqrt((w1.high - p1) ** 2 + (p2 - w2.low) ** 2))


def test_newcombe_interval_matches_reference():
    for k1, n1, k2, n2 in [(56, 70, 48, 80), (9, 10, 3, 10), (0, 20, 0, 20), (20, 20, 5, 20), (3, 7, 6, 7)]:
        low, high = nihs.newcombe_interval(k2, n2, k1, n1)  # b - a with a = (k2, n2), b = (k1, n1)
        expected_low, expected_high = newcombe_reference(k1, n1, k2, n2)
        assert low == pytest.approx(expected_low, abs=1e-9)
        assert high == pytest.approx(expected_high, abs=1e-9)
    assert nihs.newcombe_interval(56, 70, 48, 80) == pytest.approx(tuple(-x for x in newcombe_reference(56, 70, 48, 80)[::-1]))


def hand_made_results(hits_by_cell, name, settings):
    """Results built with nihs.summarize from trial records whose hits are given per cell."""
    trials = []
    for (length, depth), hits in hits_by_cell.items():
        for i, hit in enumerate(hits):
            trials.append({"length": length, "depth": depth, "index": i, "target": f"v{i}", "start_char": i,
                           "prompt_len": length - 3, "seconds": 0.5, "distance": 10 * (i + 1),
                           "hits": {"acc": bool(hit), "acc_norm": not hit}})
    settings = nihs.resolve_settings(settings)
    return nihs.summarize(trials, settings, 1.0, {"name": name})


def test_summary_accuracy_and_intervals():
    settings = {"lengths": [256], "depths": [50], "n": 10}
    hits = {(256, 50): [1] * 7 + [0] * 3, (256, "adjacent"): [1] * 10, (256, "none"): [1, 0, 0, 0] * 2 + [0, 1]}
    results = hand_made_results(hits, "a", settings)
    cells = {(c["length"], c["depth"]): c for c in results["cells"]}
    assert list(cells) == [(256, 50), (256, "adjacent"), (256, "none")]
    for key, expected_k in [((256, 50), 7), ((256, "adjacent"), 10), ((256, "none"), 3)]:
        acc = cells[key]["metrics"]["acc"]
        assert (acc["k"], acc["n"]) == (expected_k, 10)
        assert acc["acc"] == expected_k / 10
        p, z = expected_k / 10, 1.959963984540054
        center = (p + z * z / 20) / (1 + z * z / 10)
        half = z / (1 + z * z / 10) * math.sqrt(p * (1 - p) / 10 + z * z / 400)
        assert acc["low"] == pytest.approx(max(0.0, center - half))
        assert acc["high"] == pytest.approx(min(1.0, center + half))
        assert cells[key]["metrics"]["acc_norm"]["k"] == 10 - expected_k
    assert cells[(256, 50)]["mean_distance"] == pytest.approx(55.0)
    table = nihs.format_table(results)
    assert "0.70 [0.40, 0.89]" in table  # Wilson 7/10, rounded


def test_compare_reports_difference_and_interval():
    settings = {"lengths": [512], "depths": [0], "n": 80}
    a = hand_made_results({(512, 0): [1] * 48 + [0] * 32}, "baseline", settings)
    b = hand_made_results({(512, 0): [1] * 56 + [0] * 14}, "memory", settings)
    comparison = nihs.compare_results(a, b)
    (row,) = comparison["rows"]
    assert row["diff"] == pytest.approx(56 / 70 - 48 / 80)
    assert (row["low"], row["high"]) == pytest.approx(newcombe_reference(56, 70, 48, 80))
    assert "only_a" not in row  # different trial sets: no paired counts
    assert "+0.20 [+0.05, +0.33]" in nihs.format_comparison(comparison)

    # the same 80 trials: a right on 0..47, c right on 8..57
    c = hand_made_results({(512, 0): [0] * 8 + [1] * 50 + [0] * 22}, "memory", settings)
    paired = nihs.compare_results(a, c)["rows"][0]
    assert paired["only_a"] == 8
    assert paired["only_b"] == 10
    assert paired["diff"] == pytest.approx(2 / 80)

    b["needle"] = "city"
    with pytest.raises(ValueError, match="cannot compare results of needle 'uuid' with needle 'city'"):
        nihs.compare_results(a, b)


# -----------------------------------------------------------------------------
# the real 270M


def test_real_model_adjacent_recall_and_chance(real_model, tok, docs):
    settings = {"lengths": [256], "depths": [], "n": 20, "needle": "city"}
    results = nihs.run_nihs(real_model, tok, settings, docs, progress=False)
    cells = {c["depth"]: c["metrics"] for c in results["cells"]}
    adjacent, none = cells["adjacent"]["acc"], cells["none"]["acc"]
    print(f"270M, 256 tokens, city: adjacent {adjacent['k']}/{adjacent['n']}, no needle {none['k']}/{none['n']}")
    assert adjacent["acc"] >= 0.8
    assert adjacent["low"] > 0.5  # the whole interval clears chance (0.25) by far
    assert none["low"] <= 0.25 <= none["high"]
    assert none["acc"] <= 0.5
    for trial in results["trials"]:
        assert trial["prompt_len"] <= 256
        assert trial["join_shift"] == 0


def test_probe_needs_two_training_labels():
    settings = nihs.resolve_settings({"lengths": [256], "method": "probe", "needle": "city", "probe_classes": 4,
                                      "probe_train_n": 1})
    with pytest.raises(ValueError, match="raise --probe_train_n"):
        nihs.check_probe_labels(settings)
    nihs.check_probe_labels({**settings, "probe_train_n": 32})


def test_probe_beats_shuffled_label_control(real_model, tok, docs):
    settings = {"lengths": [128], "depths": [], "n": 16, "needle": "city", "method": "probe", "layers": [12],
                "probe_classes": 4, "probe_train_n": 32}
    results = nihs.run_nihs(real_model, tok, settings, docs, progress=False)
    cells = {c["depth"]: c for c in results["cells"]}
    probe, control = cells["adjacent"]["metrics"]["probe_l12"], cells["adjacent"]["metrics"]["control_l12"]
    print(f"270M probe, layer 12, 128 tokens, C=4: adjacent {probe['k']}/{probe['n']}, "
          f"control {control['k']}/{control['n']}")
    assert results["chance"] == 0.25
    assert cells["adjacent"]["selectivity"]["l12"] >= 0.3
    assert probe["low"] > control["acc"]
    assert cells["none"]["metrics"]["probe_l12"]["acc"] <= 0.5  # nothing planted: nothing to decode


# -----------------------------------------------------------------------------
# the command line


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as in one_torch_thread
    return subprocess.run([sys.executable, str(ROOT / "nihs.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A random one-layer Gemma with the real vocabulary, saved as a Hugging Face folder, per length limit."""
    from safetensors.torch import save_file

    from model import Gemma, GemmaConfig, gemma3_layer_types
    folders = {}
    for limit in (512, 200_000):
        config = GemmaConfig(vocab_size=262_144, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=1, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                             sliding_window=64, layer_types=gemma3_layer_types(1), rope_local_base=10_000.0,
                             rope_global_base=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=limit,
                             bos_token_id=2, eos_token_id=1, pad_token_id=0)
        folder = tmp_path_factory.mktemp(f"tiny{limit}")
        save_file({f"model.{k}": v.contiguous() for k, v in Gemma(config).state_dict().items()},
                  folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
        folders[limit] = folder
    return folders


def test_cli_rejects_bad_settings(tmp_path):
    assert_one_line_error(run_cli("--n=0"), "n must be", "0")
    assert_one_line_error(run_cli("--needle=needle"), "unknown needle kind", "'needle'")
    assert_one_line_error(run_cli("--depths=0,150"), "depths", "150")
    assert_one_line_error(run_cli("--compare", "a.json"), "--compare needs two")
    assert_one_line_error(run_cli("--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")),
                          "results file not found", "a.json")
    assert_one_line_error(run_cli(f"--ckpt={tmp_path}"), "ckpt_*.pt", str(tmp_path))


def test_cli_rejects_length_over_limits(tiny_model_folder):
    result = run_cli(f"--init_from={tiny_model_folder[512]}", "--tokenizer=gemma3-270m-gguf", "--lengths=256,1024")
    assert_one_line_error(result, "length 1024", "max_position_embeddings=512")
    result = run_cli(f"--init_from={tiny_model_folder[200_000]}", "--tokenizer=gemma3-270m-gguf",
                     "--lengths=100000")
    assert_one_line_error(result, "100000 tokens", "gutenberg/test")


def test_cli_writes_results_and_compares(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--needle=city", "--lengths=128", "--depths=50", "--n=2", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "95% Wilson" in result.stdout
    for name in ("results.json", "heatmap.png", "distance.png"):
        assert (out / name).stat().st_size > 0
        assert not list(out.glob(f".{name}.tmp*"))
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["lengths"] == [128]
    assert results["model"]["name"] == "gemma3-270m-gguf"
    assert [(c["depth"], c["n"]) for c in results["cells"]] == [(50, 2), ("adjacent", 2), ("none", 2)]
    assert len(results["trials"]) == 6
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    result = run_cli("--compare", str(out / "results.json"), str(out), f"--out={tmp_path / 'cmp'}")
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [row["diff"] for row in comparison["rows"]] == [0.0, 0.0, 0.0]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_cli_evaluates_checkpoint_folder(tmp_path, tiny_model_folder):
    from model import Gemma, save_checkpoint
    model = Gemma.from_pretrained(tiny_model_folder[512])
    train_config = {"dataset": "gutenberg", "tokenizer": "gemma3-270m-gguf", "init_from": "scratch"}
    for iter_num in (5, 10):
        save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(), "config": train_config,
                         "iter": iter_num}, tmp_path / "run", iter_num)
    result = run_cli(f"--ckpt={tmp_path / 'run'}", "--needle=city", "--lengths=256", "--depths=50", "--n=1")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "nihs" / "results.json").read_text())
    assert results["model"]["checkpoint"].endswith("ckpt_000010.pt")
    assert results["model"]["iter"] == 10
    assert results["model"]["training"]["dataset"] == "gutenberg"
    assert len(results["trials"]) == 3

    result = run_cli(f"--ckpt={tmp_path / 'run'}", "--split=train", "--lengths=256")
    assert_one_line_error(result, "split 'train' of gutenberg is the checkpoint's training text")


def test_checkpoint_loader_skips_corrupt_newest(tmp_path, tiny_model_folder):
    from model import Gemma
    model = Gemma.from_pretrained(tiny_model_folder[512])
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(), "config": {}, "iter": 10},
               tmp_path / "ckpt_000010.pt")
    (tmp_path / "ckpt_000020.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="ckpt_000020"):
        loaded, checkpoint = nihs.load_checkpoint(tmp_path)
    assert checkpoint["path"].endswith("ckpt_000010.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_wilson_bounds_contain_estimate_at_extremes():
    from nihs import wilson_interval
    for n in range(1, 200):
        for k in (0, n):
            low, high = wilson_interval(k, n)
            assert low <= k / n <= high, (k, n, low, high)
