"""experiments/gpt-pretrain/prepare.py: corpus building, tokenizer, dataloader, val_bpb.

Everything runs on small local corpora (vocabulary 512). The only "downloads" go to a
local HTTP server or to a closed localhost port: no test touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt_pretrain import UNICODE_LINES, write_text_corpus

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "gpt-pretrain"
VOCAB = 512


def load_prepare() -> ModuleType:
    """prepare.py as a module of its own (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("gpt_pretrain_prepare", EXPERIMENT / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare() -> ModuleType:
    return load_prepare()


@pytest.fixture(scope="module")
def prepared(prepare: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory prepared from the text corpus, shared by the module's tests."""
    base = tmp_path_factory.mktemp("prepared")
    source = write_text_corpus(base / "source")
    data = base / "data"
    assert (
        prepare.main(["--data-dir", str(data), "--source", str(source), "--vocab-size", "512"]) == 0
    )
    return data


@pytest.fixture
def tokenizer(prepare: ModuleType, prepared: Path) -> Any:
    return prepare.Tokenizer.load(prepared)


@pytest.fixture
def in_data_dir(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SKYLAB_DATA_DIR pointing at the prepared directory, as train.py would find it."""
    monkeypatch.setenv("SKYLAB_DATA_DIR", str(prepared))
    return prepared


def test_ready_manifest_lists_usable_shards(prepare: ModuleType, prepared: Path) -> None:
    manifest = json.loads((prepared / "READY").read_text())
    assert manifest["vocab_size"] == VOCAB
    assert manifest["val_shard"] == "shard_06542.parquet"
    assert manifest["source"].startswith("local:")
    for name in [*manifest["train_shards"], manifest["val_shard"]]:
        table = pq.read_table(prepared / manifest["shard_dir"] / name)
        assert table.column_names == ["text"] and table.num_rows > 0
    for split in ("train", "val"):
        counts = manifest["counts"][split]
        assert counts["docs"] > 0 and counts["chars"] > 0 and counts["tokens"] > 0
    # Same request again: nothing is redone.
    ready_before = (prepared / "READY").read_bytes()
    args = ["--data-dir", str(prepared), "--source", manifest["request"]["source"]]
    assert prepare.main([*args, "--vocab-size", "512"]) == 0
    assert (prepared / "READY").read_bytes() == ready_before


def test_tokenizer_round_trip(tokenizer: Any) -> None:
    texts = [*UNICODE_LINES, "def f(x):\n    return x ** 2  # tabs\tand\r\nCRLF", "", " " * 7]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    batch = tokenizer.encode_batch(texts, prepend_bos=True)
    assert [ids[0] for ids in batch] == [tokenizer.bos_id] * len(texts)
    assert [tokenizer.decode(ids[1:]) for ids in batch] == texts
    assert tokenizer.vocab_size == VOCAB
    # The BOS string in text is ordinary text, never the special token.
    assert tokenizer.bos_id not in tokenizer.encode("<|bos|>")
    assert max(tokenizer.encode("".join(texts))) < VOCAB - 4  # specials are the last ids


def test_special_tokens_have_zero_bytes(tokenizer: Any) -> None:
    table = tokenizer.token_bytes
    assert table.shape == (VOCAB,) and table.dtype == torch.int32
    specials = {
        tokenizer.encoding.encode_single_token(s) for s in tokenizer.encoding.special_tokens_set
    }
    assert tokenizer.bos_id in specials and len(specials) == 4
    for token in range(VOCAB):
        expected = (
            0 if token in specials else len(tokenizer.encoding.decode_single_token_bytes(token))
        )
        assert table[token].item() == expected
    assert (table[: VOCAB - 4] > 0).all()


def test_dataloader_rows_start_with_bos_and_targets_shift(
    prepare: ModuleType, tokenizer: Any, in_data_dir: Path
) -> None:
    loader = prepare.make_dataloader(tokenizer, 4, 64, "train", "cpu")
    try:
        for _ in range(5):
            inputs, targets, epoch = next(loader)
            assert inputs.shape == targets.shape == (4, 64)
            assert inputs.dtype == targets.dtype == torch.int64
            assert (inputs[:, 0] == tokenizer.bos_id).all()
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            assert epoch >= 1
    finally:
        loader.close()


def test_packing_fills_rows_with_whole_documents_first(
    prepare: ModuleType, tokenizer: Any, in_data_dir: Path
) -> None:
    # Rows wide enough for several short notes: each row holds whole documents (each
    # starting with BOS) and is only cropped at its end.
    paths = prepare.shard_paths("train")
    rows, _ = next(prepare.packed_rows(tokenizer, paths, 8, 255))
    documents = set(prepare.parquet_documents(paths))
    whole = 0
    for row in rows.tolist():
        assert row[0] == tokenizer.bos_id
        starts = [i for i, token in enumerate(row) if token == tokenizer.bos_id]
        pieces = [row[a + 1 : b] for a, b in zip(starts, [*starts[1:], len(row)], strict=True)]
        for piece in pieces[:-1]:  # all but the last piece are complete documents
            assert tokenizer.decode(piece) in documents
            whole += 1
        cropped = tokenizer.encoding.decode_bytes(pieces[-1])  # may end inside a character
        assert any(doc.encode().startswith(cropped) for doc in documents)
    assert whole >= 8, "short documents should be packed whole"


def test_validation_batches_are_deterministic(
    prepare: ModuleType, tokenizer: Any, in_data_dir: Path
) -> None:
    first = [prepare.make_dataloader(tokenizer, 2, 32, "val") for _ in range(2)]
    try:
        a, b = (next(loader)[0] for loader in first)
        assert torch.equal(a, b)
        # skip() passes over a batch as next() would: the loaders stay in step
        first[0].skip()
        next(first[1])
        c, d = (next(loader)[0] for loader in first)
        assert torch.equal(c, d) and not torch.equal(a, c)
    finally:
        for loader in first:
            loader.close()


def test_data_parallel_ranks_read_disjoint_shares_of_the_documents(
    prepare: ModuleType, prepared: Path
) -> None:
    paths = prepare.shard_paths("train", prepared)

    def batches(rank: int, world_size: int, count: int) -> list[list[str]]:
        stream = prepare._document_batches(paths, rank, world_size, batch_docs=8)
        return [next(stream)[0] for _ in range(count)]

    whole = batches(0, 1, 6)
    assert batches(0, 2, 3) == whole[0::2]
    assert batches(1, 2, 3) == whole[1::2]


class UniformModel(nn.Module):
    """Equal logits for every token: each target costs ln(V) nats."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))  # only tells evaluate_bpb the device

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = torch.zeros(*x.shape, self.vocab_size) + self.anchor
        return F.cross_entropy(logits.view(-1, self.vocab_size), y.reshape(-1), reduction=reduction)


def test_evaluate_bpb_of_uniform_model_is_analytic(
    prepare: ModuleType, tokenizer: Any, in_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch, seq_len, steps = 4, 200, 2
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", seq_len)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", batch * seq_len * steps + 5)
    bpb = prepare.evaluate_bpb(UniformModel(VOCAB), tokenizer, batch)

    loader = prepare.make_dataloader(tokenizer, batch, seq_len, "val")
    counted = total_bytes = all_targets = 0
    for _ in range(steps):
        _, targets, _ = next(loader)
        nbytes = tokenizer.token_bytes[targets.reshape(-1)]
        counted += int((nbytes > 0).sum())
        total_bytes += int(nbytes.sum())
        all_targets += targets.numel()
    loader.close()
    assert counted < all_targets, "the validation rows should contain BOS targets"
    expected = math.log(VOCAB) * counted / (math.log(2) * total_bytes)
    assert bpb == pytest.approx(expected, rel=1e-4)


def write_parquet(path: Path, texts: list[str]) -> None:
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, path)


def generated_documents(count: int, tag: str) -> list[str]:
    return [
        f"{tag} document {i}: " + " ".join(f"word{(i * j) % 97}" for j in range(60)) + " ∑ é"
        for i in range(count)
    ]


def test_source_parquet_file_is_split_deterministically(
    prepare: ModuleType, tmp_path: Path
) -> None:
    source = tmp_path / "corpus.parquet"
    write_parquet(source, generated_documents(400, "pq"))
    manifests = []
    for name in ("one", "two"):
        data = tmp_path / name
        assert (
            prepare.main(["--data-dir", str(data), "--source", str(source), "--vocab-size", "300"])
            == 0
        )
        manifests.append(json.loads((data / "READY").read_text()))
        tokenizer = prepare.Tokenizer.load(data)
        assert tokenizer.decode(tokenizer.encode("pq document 7: ∑ é")) == "pq document 7: ∑ é"
    counts = [m["counts"] for m in manifests]
    assert counts[0] == counts[1]
    assert counts[0]["train"]["docs"] + counts[0]["val"]["docs"] == 400
    assert 0 < counts[0]["val"]["docs"] < 100
    val = [pq.read_table(tmp_path / n / "corpus" / "shard_06542.parquet") for n in ("one", "two")]
    assert sorted(val[0].column("text").to_pylist()) == sorted(val[1].column("text").to_pylist())


def test_source_in_climbmix_layout_keeps_its_validation_shard(
    prepare: ModuleType, tmp_path: Path
) -> None:
    source = tmp_path / "layout"
    source.mkdir()
    for index in range(3):
        write_parquet(source / f"shard_{index:05d}.parquet", generated_documents(50, f"t{index}"))
    val_texts = generated_documents(30, "val")
    write_parquet(source / "shard_06542.parquet", val_texts)
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--source", str(source), "--num-shards", "2"]
    assert prepare.main([*args, "--vocab-size", "300"]) == 0
    manifest = json.loads((data / "READY").read_text())
    assert manifest["train_shards"] == ["shard_00000.parquet", "shard_00001.parquet"]
    kept = pq.read_table(data / manifest["shard_dir"] / "shard_06542.parquet")
    assert kept.column("text").to_pylist() == val_texts


def test_missing_source_is_a_one_line_error(
    prepare: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert prepare.main(["--data-dir", str(tmp_path), "--source", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or directory" in err
    assert not (tmp_path / "READY").exists()


@pytest.fixture
def shard_server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server of climbmix-named shards; yields its URL and the paths requested."""
    root = tmp_path / "served"
    (root / "files").mkdir(parents=True)
    write_parquet(root / "files" / "shard_00000.parquet", generated_documents(120, "served"))
    write_parquet(root / "files" / "shard_06542.parquet", generated_documents(30, "served-val"))
    requested: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/files", requested
    finally:
        server.shutdown()
        server.server_close()


def test_download_skips_complete_files(
    prepare: ModuleType, tmp_path: Path, shard_server: tuple[str, list[str]]
) -> None:
    url, requested = shard_server
    data = tmp_path / "data"
    (data / "climbmix").mkdir(parents=True)
    # A complete file already there is kept; a stale partial one is replaced.
    write_parquet(data / "climbmix" / "shard_06542.parquet", generated_documents(30, "local-val"))
    (data / "climbmix" / "shard_00000.parquet.part").write_bytes(b"truncated")
    args = ["--data-dir", str(data), "--num-shards", "1", "--vocab-size", "300", "--base-url", url]
    assert prepare.main(args) == 0
    assert requested == ["/files/shard_00000.parquet"]
    manifest = json.loads((data / "READY").read_text())
    assert manifest["source"] == "climbmix" and manifest["shard_dir"] == "climbmix"
    assert not list((data / "climbmix").glob("*.part"))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_prepare_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SKYLAB_DATA_URL", "SKYLAB_DATA_DIR")}
    return subprocess.run(
        [sys.executable, "prepare.py", *args],
        cwd=EXPERIMENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_offline_without_fallback_fails_in_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = run_prepare_cli("--data-dir", str(tmp_path), "--base-url", url, "--fallback", "none")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "could not download" in result.stderr and "--fallback stdlib" in result.stderr
    assert not (tmp_path / "READY").exists()


def test_offline_with_stdlib_fallback_builds_a_corpus(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = run_prepare_cli(
        "--data-dir", str(tmp_path), "--base-url", url, "--fallback", "stdlib",
        "--num-shards", "1", "--vocab-size", "512",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notice = [line for line in result.stderr.splitlines() if "could not download" in line]
    assert len(notice) == 1 and "standard library" in notice[0]
    assert "Connection refused" in notice[0]
    manifest = json.loads((tmp_path / "READY").read_text())
    assert manifest["source"] == "stdlib" and manifest["train_shards"] == ["shard_00000.parquet"]
    assert manifest["counts"]["val"]["tokens"] > 100_000
    texts = pq.read_table(tmp_path / "corpus" / "shard_00000.parquet").column("text").to_pylist()
    assert any("def " in text for text in texts)
