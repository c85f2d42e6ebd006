"""Frozen harness of the gpt-pretrain experiment: data, tokenizer, dataloader, evaluation.

Run once before training (cwd = this directory):

    python prepare.py [--data-dir D] [--source PATH] [--num-shards N] [--vocab-size 8192]
                      [--fallback {none,stdlib}] [--base-url URL] [--force]

Without --source it downloads climbmix-400b-shuffle parquet shards (the layout
karpathy/autoresearch uses: shard_00000.parquet ..., a `text` column, the pinned
validation shard shard_06542.parquet). With --source it builds the shards from local
text files or parquet files instead. Then it trains a byte-level BPE tokenizer
(rustbpe), saves it for tiktoken plus a per-token UTF-8 byte-length table, and writes
the READY manifest last.

Environment: SKYLAB_DATA_DIR (data directory; default ~/.cache/skylab/gpt-pretrain),
SKYLAB_DATA_URL (download base URL), SKYLAB_TIME_BUDGET (training seconds).

train.py imports MAX_SEQ_LEN, EVAL_TOKENS, TIME_BUDGET, Tokenizer, make_dataloader and
evaluate_bpb from here. This file is frozen: the metric must not move between trials.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import math
import os
import queue
import random
import shutil
import socket
import sys
import sysconfig
import threading
import time
import zlib
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tiktoken

# torch is imported inside the functions that train or evaluate: preparing data never
# needs it, and importing it can take longer than the preparation on a small machine.
if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------
# Constants read by train.py (the cpu profile rewrites the first two)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = 2048  # context length of training and evaluation rows
EVAL_TOKENS = 40 * 524288  # validation tokens scored by evaluate_bpb
TIME_BUDGET = float(os.environ.get("SKYLAB_TIME_BUDGET") or 300)  # training seconds

# ---------------------------------------------------------------------------
# Data layout
# ---------------------------------------------------------------------------

READY = "READY"
MANIFEST_FORMAT = 2
DEFAULT_DATA_DIR = Path.home() / ".cache" / "skylab" / "gpt-pretrain"
DOWNLOAD_DIR = "climbmix"  # downloaded shards, kept across runs so downloads resume
CORPUS_DIR = "corpus"  # shards built from --source or the stdlib fallback
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
VAL_SHARD_INDEX = 6542  # the last climbmix shard is pinned as the validation shard
VAL_SHARD = f"shard_{VAL_SHARD_INDEX:05d}.parquet"
DEFAULT_NUM_SHARDS = 10
CONNECT_TIMEOUT = 5.0  # seconds for DNS + TCP connect: an offline machine fails fast
READ_TIMEOUT = 60.0  # seconds without a byte before a download attempt is abandoned
DOWNLOAD_ATTEMPTS = 3  # per file; backoff 1 s, 2 s between attempts
DOWNLOAD_WORKERS = 4

# Built corpora (--source text files, the stdlib fallback)
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".pyi", ".toml", ".cfg", ".ini", ".c", ".h"}
DOC_MAX_CHARS = 6000  # longer texts are cut at blank lines into documents of about this size
VAL_PERCENT = 10  # share of built-corpus documents hashed into the validation shard
SHARD_CHARS = 8_000_000  # text characters per built training shard
ROW_GROUP_DOCS = 1024
SPLIT_SEED = 1234

# Tokenizer
VOCAB_SIZE = 8192
# GPT-4 style split, with numbers in groups of at most two digits (as autoresearch).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS_TOKEN = "<|bos|>"
SPECIAL_TOKENS = [BOS_TOKEN, "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
TOKENIZER_TRAIN_CHARS = 6_000_000  # bounds tokenizer training to seconds on 2 cores
TOKENIZER_DOC_CHARS = 10_000  # per-document cap while training the tokenizer
EXACT_COUNT_CHARS = 4_000_000  # tokens are counted on this much text per split, then scaled
POOL_DOCS_PER_ROW = 8  # documents the packer chooses from, per row of a batch


class PrepareError(Exception):
    """A problem the user must fix; reported as one line, exit status 1."""


class DownloadError(PrepareError):
    pass


def data_dir(override: str | Path | None = None) -> Path:
    """The data directory: OVERRIDE, else $SKYLAB_DATA_DIR, else the default cache."""
    chosen = override or os.environ.get("SKYLAB_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def read_manifest(directory: str | Path | None = None) -> dict[str, Any]:
    """The READY manifest of a prepared data directory; PrepareError when not prepared."""
    path = data_dir(directory) / READY
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise PrepareError(f"{path} not found: run `python prepare.py` first") from None
    except (OSError, ValueError) as exc:
        raise PrepareError(f"{path}: unreadable manifest ({exc})") from exc
    return manifest


def _log(message: str) -> None:
    print(f"prepare: {message}", flush=True)


def _one_line(exc: BaseException) -> str:
    """The innermost cause of EXC as one short line (requests nests them deeply)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------


def _resolve(host: str, port: int, timeout: float) -> None:
    """Resolve HOST within TIMEOUT seconds; getaddrinfo itself can hang far longer."""
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise DownloadError(f"cannot resolve {host} within {timeout:.0f} s (offline?)")
    if outcome[0] is not None:
        raise DownloadError(f"cannot resolve {host}: {_one_line(outcome[0])}")


def _check_shard(path: Path) -> None:
    schema = pq.read_schema(path)
    if "text" not in schema.names:
        raise PrepareError(f"{path}: parquet file has no 'text' column")


def _download_file(url: str, dest: Path) -> None:
    """Fetch URL into DEST via a temporary name; skip a complete file, retry with backoff."""
    import requests  # only the download path needs it

    if dest.exists():
        return
    partial = dest.with_name(dest.name + ".part")
    last_error: BaseException | None = None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(2 ** (attempt - 1))
        try:
            with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as reply:
                reply.raise_for_status()
                with partial.open("wb") as sink:
                    for chunk in reply.iter_content(chunk_size=1 << 20):
                        sink.write(chunk)
            _check_shard(partial)
            partial.replace(dest)
            return
        except (requests.RequestException, OSError, pa.ArrowException, PrepareError) as exc:
            last_error = exc
            partial.unlink(missing_ok=True)
            if _permanent(exc):
                break
    assert last_error is not None
    raise DownloadError(f"{url}: {_one_line(last_error)}")


def _permanent(exc: BaseException) -> bool:
    """An HTTP client error other than 408/429: retrying cannot help."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def download_climbmix(directory: Path, num_shards: int, base_url: str) -> tuple[list[Path], Path]:
    """Download NUM_SHARDS training shards and the pinned validation shard."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"not an http(s) URL: {base_url}")
    _resolve(
        parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), CONNECT_TIMEOUT
    )
    directory.mkdir(parents=True, exist_ok=True)
    val = directory / VAL_SHARD
    # The validation shard first and alone: an unreachable server fails once, quickly.
    _download_file(f"{base_url.rstrip('/')}/{VAL_SHARD}", val)
    train = [directory / f"shard_{index:05d}.parquet" for index in range(num_shards)]
    missing = [path for path in train if not path.exists()]
    _log(f"downloading {len(missing)} training shards ({len(train) - len(missing)} already here)")
    pool = ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS)
    try:
        futures = [
            pool.submit(_download_file, f"{base_url.rstrip('/')}/{path.name}", path)
            for path in missing
        ]
        for future in futures:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on failure, queued files are skipped
    return train, val


# ---------------------------------------------------------------------------
# Built corpora: local files and the stdlib fallback
# ---------------------------------------------------------------------------


def split_document(text: str, max_chars: int = DOC_MAX_CHARS) -> list[str]:
    """Cut TEXT at blank lines into pieces of about MAX_CHARS (hard cuts only if needed)."""
    pieces: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        while len(paragraph) > max_chars:
            pieces.extend([current] if current else [])
            current = ""
            pieces.append(paragraph[:max_chars])
            paragraph = paragraph[max_chars:]
        candidate = f"{current}\n\n{paragraph}" if current else paragraph
        if len(candidate) > max_chars:
            pieces.append(current)
            candidate = paragraph
        current = candidate
    pieces.append(current)
    return [piece for piece in pieces if piece.strip()]


def _read_text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def _text_files(
    root: Path, suffixes: set[str], skip_dirs: set[str] = frozenset()
) -> Iterator[Path]:
    """Files under ROOT with one of SUFFIXES, in a stable order; caches never entered."""
    if root.is_file():
        yield root
        return
    skip = {"__pycache__", ".git", *skip_dirs}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(name for name in dirs if name not in skip)
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in suffixes:
                yield Path(folder, name)


def _documents_from_files(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        text = _read_text(path)
        if text:
            yield from split_document(text)


def local_text_documents(source: Path) -> Iterator[str]:
    return _documents_from_files(_text_files(source, TEXT_SUFFIXES))


def stdlib_documents() -> Iterator[str]:
    """The standard library's sources, pydoc's topic texts and any Python docs installed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    yield from _documents_from_files(
        _text_files(stdlib, {".py", ".txt", ".rst"}, skip_dirs={"site-packages"})
    )
    try:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield from split_document(topics[name])
    except ImportError:
        pass
    # Python's own documentation where a distribution ships it (e.g. Debian's NEWS).
    for prefix in (Path(sys.base_prefix, "share", "doc"), Path("/usr/share/doc")):
        for root in sorted([*prefix.glob("python3"), *prefix.glob("python3.*")]):
            yield from _documents_from_files(_text_files(root, {".txt", ".rst", ".md", ".gz"}))


def parquet_documents(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        table = pq.read_table(path, columns=["text"])
        for text in table.column("text").to_pylist():
            if text and text.strip():
                yield text


@dataclass
class Split:
    train: list[str]
    val: list[str]


def split_documents(documents: Iterable[str]) -> Split:
    """Deterministic train/validation split by content hash; exact duplicates dropped."""
    seen: set[int] = set()
    split = Split(train=[], val=[])
    for doc in documents:
        digest = zlib.crc32(doc.encode("utf-8", "surrogatepass"))
        key = hash((digest, len(doc), doc[:64]))
        if key in seen:
            continue
        seen.add(key)
        (split.val if digest % 100 < VAL_PERCENT else split.train).append(doc)
    if not split.val and len(split.train) > 1:
        split.val.append(split.train.pop())
    if not split.train or not split.val:
        raise PrepareError("the source has too little text (need at least two documents)")
    # Files arrive in directory order; shuffle so every shard mixes all sources.
    rng = random.Random(SPLIT_SEED)
    rng.shuffle(split.train)
    rng.shuffle(split.val)
    return split


def _write_shard(docs: list[str], path: Path) -> None:
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    partial = path.with_name(path.name + ".part")
    pq.write_table(table, partial, row_group_size=ROW_GROUP_DOCS, compression="zstd")
    partial.replace(path)


def write_corpus(split: Split, directory: Path, max_shards: int | None) -> tuple[list[Path], Path]:
    """Write SPLIT as training shards of about SHARD_CHARS plus the pinned validation shard."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    groups: list[list[str]] = [[]]
    size = 0
    for doc in split.train:
        if size >= SHARD_CHARS:
            if max_shards is not None and len(groups) >= max_shards:
                break
            groups.append([])
            size = 0
        groups[-1].append(doc)
        size += len(doc)
    train = [directory / f"shard_{index:05d}.parquet" for index in range(len(groups))]
    for docs, path in zip(groups, train, strict=True):
        _write_shard(docs, path)
    val = directory / VAL_SHARD
    _write_shard(split.val, val)
    return train, val


def _parquet_inputs(source: Path) -> list[Path]:
    if source.is_file():
        return [source] if source.suffix == ".parquet" else []
    return sorted(source.glob("*.parquet"))


def corpus_from_source(
    source: Path, directory: Path, max_shards: int | None
) -> tuple[list[Path], Path]:
    """Shards from local parquet files (a pinned validation shard kept as is) or text files."""
    if not source.exists():
        raise PrepareError(f"--source {source}: no such file or directory")
    inputs = _parquet_inputs(source)
    for path in inputs:
        _check_shard(path)
    pinned = [path for path in inputs if path.name == VAL_SHARD]
    if pinned:
        return _copy_parquet_layout(
            pinned[0], [p for p in inputs if p != pinned[0]], directory, max_shards
        )
    documents = parquet_documents(inputs) if inputs else local_text_documents(source)
    return write_corpus(split_documents(documents), directory, max_shards)


def _copy_parquet_layout(
    val: Path, train: list[Path], directory: Path, max_shards: int | None
) -> tuple[list[Path], Path]:
    """A source already in the climbmix layout keeps its split: copy the files."""
    if not train:
        raise PrepareError(f"{val.parent}: only the validation shard, no training shards")
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    chosen = train[:max_shards] if max_shards is not None else train
    copies = [directory / f"shard_{index:05d}.parquet" for index in range(len(chosen))]
    for original, copy in zip(chosen, copies, strict=True):
        shutil.copyfile(original, copy)
    shutil.copyfile(val, directory / VAL_SHARD)
    return copies, directory / VAL_SHARD


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def _tokenizer_texts(paths: list[Path], max_chars: int) -> Iterator[str]:
    total = 0
    for path in paths:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            for text in parquet.read_row_group(group, columns=["text"]).column(0).to_pylist():
                piece = text[:TOKENIZER_DOC_CHARS]
                yield piece
                total += len(piece)
                if total >= max_chars:
                    return


def train_tokenizer(train_shards: list[Path], vocab_size: int) -> tiktoken.Encoding:
    """Byte-level BPE learned by rustbpe on a bounded sample, as a tiktoken Encoding."""
    import rustbpe  # only preparation trains; train.py loads the saved ranks

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise PrepareError(
            f"--vocab-size {vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)}"
        )
    learner = rustbpe.Tokenizer()
    texts = _tokenizer_texts(train_shards, TOKENIZER_TRAIN_CHARS)
    learner.train_from_iterator(texts, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in learner.get_mergeable_ranks()}
    return _encoding(learner.get_pattern(), ranks)


def _encoding(pattern: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    first_special = len(ranks)
    specials = {name: first_special + index for index, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name="skylab-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
    )


def token_byte_lengths(encoding: tiktoken.Encoding) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special tokens count 0 bytes."""
    special_ids = {encoding.encode_single_token(name) for name in encoding.special_tokens_set}
    lengths = [
        0 if token in special_ids else len(encoding.decode_single_token_bytes(token))
        for token in range(encoding.n_vocab)
    ]
    return np.array(lengths, dtype=np.int32)


def save_tokenizer(encoding: tiktoken.Encoding, directory: Path) -> None:
    ranks = encoding._mergeable_ranks  # tiktoken keeps them; no public accessor
    payload = {
        "pattern": encoding._pat_str,
        "special_tokens": encoding._special_tokens,
        "bos_token": BOS_TOKEN,
        "mergeable_ranks": [
            [base64.b64encode(token).decode("ascii"), rank]
            for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        ],
    }
    _atomic_write(directory / TOKENIZER_FILE, json.dumps(payload).encode())
    buffer = io.BytesIO()
    np.save(buffer, token_byte_lengths(encoding))
    _atomic_write(directory / TOKEN_BYTES_FILE, buffer.getvalue())


class Tokenizer:
    """The prepared tokenizer: tiktoken encoding, BOS id, per-token byte lengths."""

    def __init__(self, encoding: tiktoken.Encoding, token_bytes: torch.Tensor, bos_token: str):
        self.encoding = encoding
        self.token_bytes = token_bytes  # int32 [vocab_size]: UTF-8 bytes per token, 0 = special
        self.bos_id = encoding.encode_single_token(bos_token)

    @classmethod
    def load(cls, directory: str | Path | None = None) -> Tokenizer:
        """Load from the data directory (see data_dir())."""
        root = data_dir(directory)
        read_manifest(root)
        payload = json.loads((root / TOKENIZER_FILE).read_text())
        ranks = {base64.b64decode(token): rank for token, rank in payload["mergeable_ranks"]}
        encoding = tiktoken.Encoding(
            name="skylab-bpe",
            pat_str=payload["pattern"],
            mergeable_ranks=ranks,
            special_tokens=payload["special_tokens"],
        )
        import torch

        token_bytes = torch.from_numpy(np.load(root / TOKEN_BYTES_FILE))
        return cls(encoding, token_bytes, payload["bos_token"])

    # autoresearch spelling, for code written against it
    from_directory = load

    @property
    def vocab_size(self) -> int:
        return int(self.encoding.n_vocab)

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def get_bos_token_id(self) -> int:
        return int(self.bos_id)

    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        """Token ids of TEXT (special-token strings in it are encoded as plain text)."""
        ids = self.encoding.encode_ordinary(text)
        return [self.bos_id, *ids] if prepend_bos else ids

    def encode_batch(
        self, texts: list[str], prepend_bos: bool = False, num_threads: int = 4
    ) -> list[list[int]]:
        batch = self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)
        if prepend_bos:
            for ids in batch:
                ids.insert(0, self.bos_id)
        return batch

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))


# ---------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing, prefetched in a background thread
# ---------------------------------------------------------------------------


def shard_paths(split: str, directory: str | Path | None = None) -> list[Path]:
    """Parquet files of SPLIT ("train" or "val") as listed by the READY manifest."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    root = data_dir(directory)
    manifest = read_manifest(root)
    shards = root / manifest["shard_dir"]
    names = manifest["train_shards"] if split == "train" else [manifest["val_shard"]]
    return [shards / name for name in names]


def _document_batches(
    paths: list[Path], rank: int = 0, world_size: int = 1, batch_docs: int = 128
) -> Iterator[tuple[list[str], int]]:
    """Endless batches of texts with the epoch (1, 2, ...) they belong to. Of the whole
    stream of batches, RANK gets every WORLD_SIZE-th one: data-parallel ranks read
    disjoint documents, and each tokenizes only its own share."""
    epoch = 1
    index = 0
    while True:
        for path in paths:
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                texts = parquet.read_row_group(group, columns=["text"]).column(0).to_pylist()
                for start in range(0, len(texts), batch_docs):
                    if index % world_size == rank:
                        yield texts[start : start + batch_docs], epoch
                    index += 1
        epoch += 1


def encode_threads() -> int:
    """Tokenizer threads for one loader: this process's share of the CPUs it may use
    (tiktoken releases the GIL while it encodes), at most 8. torchrun's
    LOCAL_WORLD_SIZE says how many ranks share the machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, min(8, (cpus or 1) // max(1, local_ranks)))


class _DocumentPool:
    """Tokenized documents kept sorted by length, so a best fit is one bisection away."""

    def __init__(self) -> None:
        self._lengths: list[int] = []
        self._docs: list[list[int]] = []

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, doc: list[int]) -> None:
        at = bisect_right(self._lengths, len(doc))
        self._lengths.insert(at, len(doc))
        self._docs.insert(at, doc)

    def take_longest_fitting(self, room: int) -> list[int] | None:
        at = bisect_right(self._lengths, room) - 1
        if at < 0:
            return None
        self._lengths.pop(at)
        return self._docs.pop(at)

    def take_shortest(self) -> list[int]:
        self._lengths.pop(0)
        return self._docs.pop(0)


def packed_rows(
    tokenizer: Tokenizer,
    paths: list[Path],
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[np.ndarray, int]]:
    """Endless [batch_size, seq_len + 1] token arrays with the current epoch, from this
    rank's share of the documents (see _document_batches).

    Every row starts at a BOS-prefixed document. Each slot takes the longest pooled
    document that still fits; when none fits, the shortest is cropped to fill the row,
    so there is no padding and every token is a real one.
    """
    width = seq_len + 1
    # Enough candidates for tight packing; more would only delay the first batch.
    pool_docs = POOL_DOCS_PER_ROW * batch_size
    batches = _document_batches(paths, rank, world_size)
    threads = encode_threads()
    pool = _DocumentPool()
    epoch = 1
    while True:
        rows = np.empty((batch_size, width), dtype=np.int64)
        for row in rows:
            filled = 0
            while filled < width:
                while len(pool) < pool_docs:
                    texts, epoch = next(batches)
                    for doc in tokenizer.encode_batch(texts, True, threads):
                        pool.add(doc)
                room = width - filled
                doc = pool.take_longest_fitting(room)
                if doc is None:
                    doc = pool.take_shortest()[:room]
                row[filled : filled + len(doc)] = doc
                filled += len(doc)
        yield rows, epoch


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class DataLoader:
    """Iterator of (inputs, targets, epoch) on DEVICE, produced by a background thread.

    inputs and targets are int64 [batch_size, seq_len]; targets are inputs shifted by
    one. On CUDA the batches are staged in pinned memory and copied non-blocking.
    wait_seconds adds up the time callers spent waiting for a batch: well above zero,
    the loader is slower than the consumer.
    """

    def __init__(self, rows: Iterator[tuple[np.ndarray, int]], device: torch.device, depth: int):
        self.device = device
        self.wait_seconds = 0.0
        self.epoch = 1  # of the last batch handed out
        self._pinned = device.type == "cuda"
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(rows,), daemon=True)
        self._thread.start()

    def _produce(self, rows: Iterator[tuple[np.ndarray, int]]) -> None:
        import torch

        try:
            for array, epoch in rows:
                staged = torch.from_numpy(np.stack([array[:, :-1], array[:, 1:]]))
                if self._pinned:
                    staged = staged.pin_memory()
                if not self._put((staged, epoch)):
                    return
        except BaseException as exc:
            self._put(_Failure(exc))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        batch = self._take().to(self.device, non_blocking=self._pinned)
        return batch[0], batch[1], self.epoch

    def skip(self) -> None:
        """Pass over the next batch without copying it to the device."""
        self._take()

    def _take(self) -> torch.Tensor:
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            started = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - started
        if isinstance(item, _Failure):
            raise RuntimeError("the dataloader thread failed") from item.error
        staged, self.epoch = item
        return staged

    def close(self) -> None:
        """Stop the producer thread and wait for it (it exits at its next queue
        operation). A thread still inside numpy or torch when the interpreter exits can
        abort the process after the summary has been printed."""
        self._stop.set()
        self._thread.join()


def make_dataloader(
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    split: str,
    device: str | torch.device = "cpu",
    *,
    directory: str | Path | None = None,
    prefetch: int = 4,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Endless (inputs, targets, epoch) batches of SPLIT, BOS-aligned and best-fit packed,
    from RANK's share of the documents when WORLD_SIZE ranks train data-parallel."""
    import torch

    paths = shard_paths(split, directory)
    rows = packed_rows(tokenizer, paths, batch_size, seq_len, rank, world_size)
    return DataLoader(rows, torch.device(device), prefetch)


# ---------------------------------------------------------------------------
# Evaluation (the fixed metric)
# ---------------------------------------------------------------------------


def _device_of(model: torch.nn.Module) -> torch.device:
    import torch

    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def evaluate_bpb(model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int) -> float:
    """Bits per byte on the first EVAL_TOKENS tokens of the validation shard.

    Contract: model(x, y, reduction="none") returns the cross-entropy in nats of every
    target token of y (any shape with x.numel() elements, in y's order). BPB is the sum
    of those losses over targets that are not special tokens, divided by ln 2 times the
    UTF-8 bytes of the same targets: independent of the vocabulary. Rows have
    MAX_SEQ_LEN tokens; max(1, EVAL_TOKENS // (batch_size * MAX_SEQ_LEN)) batches are
    scored (the shard wraps around if it is shorter). Run it under the autocast the
    model trains with.

    Under torch.distributed every rank calls it: each packs the same batches, scores
    every world_size-th one, and the sums are added up across ranks, so the result is
    the one a single process gets.
    """
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = _device_of(model)
    token_bytes = tokenizer.token_bytes.to(device)
    steps = max(1, EVAL_TOKENS // (batch_size * MAX_SEQ_LEN))
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val", device)
    # Accumulated on the device, read once: no host sync per batch.
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nats, bytes
    try:
        for step in range(steps):
            if step % world_size != rank:
                loader.skip()  # another rank's batch
                continue
            inputs, targets, _ = next(loader)
            with torch.no_grad():
                losses = model(inputs, targets, reduction="none").reshape(-1).float()
            nbytes = token_bytes[targets.reshape(-1)]
            counted = nbytes > 0
            sums[0] += torch.where(counted, losses, 0.0).sum(dtype=torch.float64)
            sums[1] += nbytes.sum(dtype=torch.float64)
    finally:
        loader.close()
    if distributed:
        dist.all_reduce(sums)
    total_nats, total_bytes = sums.tolist()
    return total_nats / (math.log(2) * total_bytes)


# ---------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    partial.replace(path)


def count_split(paths: list[Path], encoding: tiktoken.Encoding) -> dict[str, Any]:
    """Documents, characters and tokens (BOS included) of a split. Tokens are counted
    on the first EXACT_COUNT_CHARS characters and scaled up beyond: encoding a whole
    download would take minutes."""
    docs = chars = sampled_chars = sampled_tokens = 0
    for path in paths:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            texts = parquet.read_row_group(group, columns=["text"]).column(0)
            group_chars = int(pc.sum(pc.utf8_length(texts)).as_py() or 0)
            docs += len(texts)
            chars += group_chars
            if sampled_chars < EXACT_COUNT_CHARS:
                ids = encoding.encode_ordinary_batch(texts.to_pylist(), num_threads=4)
                sampled_tokens += sum(len(doc) + 1 for doc in ids)
                sampled_chars += group_chars
    exact = sampled_chars == chars
    tokens = sampled_tokens if exact else round(sampled_tokens * chars / max(sampled_chars, 1))
    return {"docs": docs, "chars": chars, "tokens": tokens, "tokens_exact": exact}


def _request(args: argparse.Namespace) -> dict[str, Any]:
    source = str(Path(args.source).resolve()) if args.source else None
    return {
        "source": source,
        "num_shards": args.num_shards,
        "vocab_size": args.vocab_size,
        "fallback": args.fallback,
    }


def _gather_shards(args: argparse.Namespace, root: Path) -> tuple[str, list[Path], Path]:
    """(source label, training shards, validation shard) as the arguments ask."""
    if args.source:
        train, val = corpus_from_source(Path(args.source), root / CORPUS_DIR, args.num_shards)
        return f"local:{Path(args.source).resolve()}", train, val
    base_url = args.base_url or os.environ.get("SKYLAB_DATA_URL") or BASE_URL
    num_shards = DEFAULT_NUM_SHARDS if args.num_shards is None else args.num_shards
    try:
        train, val = download_climbmix(root / DOWNLOAD_DIR, num_shards, base_url)
        return "climbmix", train, val
    except DownloadError as exc:
        if args.fallback != "stdlib":
            raise DownloadError(
                f"could not download the climbmix shards ({exc}); "
                "use --source DIR for local data or --fallback stdlib"
            ) from exc
        print(
            f"prepare: could not download the climbmix shards ({exc}); building the corpus "
            "from the Python standard library's sources and docs instead",
            file=sys.stderr,
            flush=True,
        )
    train, val = write_corpus(
        split_documents(stdlib_documents()), root / CORPUS_DIR, args.num_shards
    )
    return "stdlib", train, val


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Build the data directory; return the manifest (written to READY last)."""
    started = time.time()
    root = data_dir(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    request = _request(args)
    ready = root / READY
    if ready.exists() and not args.force:
        manifest = read_manifest(root)
        if manifest.get("request") == request and manifest.get("format") == MANIFEST_FORMAT:
            _log(f"{root} is already prepared ({manifest['source']}); --force redoes it")
            return manifest
    ready.unlink(missing_ok=True)  # from here on the directory is not usable until READY

    _log(f"data directory {root}")
    source, train, val = _gather_shards(args, root)
    _log(f"{len(train)} training shards + {VAL_SHARD} from {source}")
    tokenizer_started = time.time()
    encoding = train_tokenizer(train, args.vocab_size)
    _log(f"tokenizer: {encoding.n_vocab} tokens in {time.time() - tokenizer_started:.1f} s")
    save_tokenizer(encoding, root)
    probe = "Hello, world! 1234 — naïve café, 東京, emoji 🚀"
    if encoding.decode(encoding.encode_ordinary(probe)) != probe:
        raise PrepareError("tokenizer round trip failed")

    counts = {"train": count_split(train, encoding), "val": count_split([val], encoding)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "request": request,
        "shard_dir": train[0].parent.name,
        "train_shards": [path.name for path in train],
        "val_shard": val.name,
        "vocab_size": encoding.n_vocab,
        "bos_token": BOS_TOKEN,
        "special_tokens": SPECIAL_TOKENS,
        "tokenizer_file": TOKENIZER_FILE,
        "token_bytes_file": TOKEN_BYTES_FILE,
        "counts": counts,
        "prepare_seconds": round(time.time() - started, 1),
        "created_unix": int(time.time()),
    }
    _atomic_write(ready, json.dumps(manifest, indent=1).encode())
    _log(
        f"ready: {counts['train']['tokens']:,} training and {counts['val']['tokens']:,} "
        f"validation tokens, vocabulary {encoding.n_vocab}, in {manifest['prepare_seconds']} s"
    )
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for gpt-pretrain.")
    parser.add_argument("--data-dir", help="default: $SKYLAB_DATA_DIR or " + str(DEFAULT_DATA_DIR))
    parser.add_argument("--source", help="local text files or parquet files instead of a download")
    parser.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help=f"training shards to download (default {DEFAULT_NUM_SHARDS}) or at most to build",
    )
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument(
        "--fallback",
        choices=["none", "stdlib"],
        default="none",
        help="when the download fails: stop (none) or use the Python standard library's text",
    )
    parser.add_argument("--base-url", help="download base URL (default: $SKYLAB_DATA_URL or HF)")
    parser.add_argument("--force", action="store_true", help="redo even if READY matches")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.num_shards is not None and args.num_shards < 1:
        print("prepare: error: --num-shards must be at least 1", file=sys.stderr)
        return 2
    try:
        prepare(args)
    except PrepareError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
