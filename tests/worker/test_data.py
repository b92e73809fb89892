import os

import pytest
import torch

from fedmla.worker.data import DataError, load_folder, load_stdlib_corpus, repartition


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_stdlib_corpus_is_non_iid_and_deterministic():
    a = load_stdlib_corpus(3, seq_len=32, max_bytes_per_client=20_000, eval_windows_per_client=4)
    b = load_stdlib_corpus(3, seq_len=32, max_bytes_per_client=20_000, eval_windows_per_client=4)
    assert a.fingerprint() == b.fingerprint()
    assert len(a.clients) == 3 and len(set(a.names)) == 3
    assert a.validation.shape == (12, 33) and a.validation.dtype == torch.int64
    for c in a.clients:
        assert c.num_train_tokens + c.eval.numel() == 20_000   # capped stream, 10% tail held out
        assert c.eval.numel() == 2_000
        assert all("site-packages" not in f and "/test/" not in f for f in c.files)
    # validation windows are the first bytes of each client's tail, in name order
    first = sorted(a.clients, key=lambda c: c.name)[0]
    assert torch.equal(a.validation[0], first.eval[:33].long())


def test_stdlib_by_name_and_unknown_name():
    d = load_stdlib_corpus(names=["json", "email"], seq_len=32, max_bytes_per_client=5_000)
    assert d.names == ["email", "json"]
    with pytest.raises(DataError, match="no_such_pkg"):
        load_stdlib_corpus(names=["no_such_pkg"])


def test_folder_loading(tmp_path):
    write(tmp_path / "alice" / "a.txt", b"hello world " * 50)
    write(tmp_path / "alice" / "sub" / "b.txt", "caf\u00e9 ".encode() * 40)
    write(tmp_path / "bob" / "x.md", b"lorem ipsum " * 60)
    write(tmp_path / "bob" / ".hidden", b"\xff\xfe")          # hidden files are ignored
    d = load_folder(tmp_path, seq_len=16, eval_windows_per_client=2)
    assert d.names == ["alice", "bob"]
    assert d.client("alice").files[0].endswith("a.txt")
    assert d.validation.shape == (4, 17)


@pytest.mark.parametrize("setup,match", [
    (lambda p: write(p / "c1" / "f.txt", b"ok " * 100) or write(p / "c2" / "bad.txt", b"abc\xff\xfe" * 40),
     r"client 'c2': .*bad.txt is not UTF-8"),
    (lambda p: write(p / "c1" / "f.txt", b"ok " * 100) or (p / "empty").mkdir(), r"client 'empty' .*has no files"),
    (lambda p: write(p / "c1" / "f.txt", b"ok " * 100) or write(p / "tiny" / "f.txt", b"abc"),
     r"client 'tiny' has \d+ training bytes, fewer than one sequence"),
    (lambda p: write(p / "c1" / "f.txt", b"ok " * 100) or write(p / "blank" / "f.txt", b""), r"client 'blank' is empty"),
    (lambda p: write(p / "c1" / "f.txt", b"ok " * 100) or (p / "c3").mkdir() or os.symlink(p / "nowhere", p / "c3" / "gone.txt"),
     r"client 'c3': cannot read .*gone.txt"),
    (lambda p: None, r"has no client subfolders"),
])
def test_bad_folder_data_names_the_culprit(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(DataError, match=match):
        load_folder(tmp_path, seq_len=16)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_repartition_keeps_every_byte_and_is_seeded(scheme):
    d = load_stdlib_corpus(3, seq_len=32, max_bytes_per_client=20_000)
    a = repartition(d, 4, scheme, alpha=0.3, seed=1, chunk_bytes=500)
    b = repartition(d, 4, scheme, alpha=0.3, seed=1, chunk_bytes=500)
    c = repartition(d, 4, scheme, alpha=0.3, seed=2, chunk_bytes=500)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert sum(x.num_train_tokens for x in a.clients) == sum(x.num_train_tokens for x in d.clients)
    assert torch.equal(a.validation, d.validation)
    sizes = [x.num_train_tokens for x in a.clients]
    if scheme == "iid":
        assert max(sizes) - min(sizes) <= 500
    with pytest.raises(DataError, match="without data|fewer than one sequence"):
        repartition(d, 500, scheme, alpha=0.01, seed=0, chunk_bytes=20_000)
