"""Client data tokenized with a Hugging Face tokenizer (trained here with `tokenizers`)."""

from __future__ import annotations

import pytest
import torch

from hf_testlib import TEXT, train_tokenizer

from fedmla.mla_model import MLAConfig
from fedmla.worker.data import (DataError, TextTokenizer, check_tokenizer_fits, load_folder, load_stdlib_corpus,
                                model_tokenizer, repartition)
from fedmla.worker.trainer import LocalTrainer, TrainerConfig, init_global_state


@pytest.fixture
def tok_file(tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    train_tokenizer(300).save(str(path))
    return path


def _folder(tmp_path):
    for name in ("alice", "bob"):
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name / "a.txt").write_text(TEXT * 3 + name)
    return tmp_path / "data"


def test_folder_is_tokenized_with_the_tokenizer(tmp_path, tok_file):
    tok = TextTokenizer.from_path(tok_file.parent)          # a checkpoint folder works as well as the file
    assert tok.vocab_size <= 300
    data_b = load_folder(_folder(tmp_path), seq_len=16)
    data_t = load_folder(_folder(tmp_path), seq_len=16, tokenizer=tok)
    alice_b, alice_t = data_b.client("alice"), data_t.client("alice")
    assert alice_b.train.dtype == torch.uint8 and alice_t.train.dtype == torch.int32
    # BPE merges: fewer tokens than bytes, and the ids decode back to the text
    n_b = alice_b.train.numel() + alice_b.eval.numel()
    n_t = alice_t.train.numel() + alice_t.eval.numel()
    assert n_t < n_b
    ids = torch.cat([alice_t.train, alice_t.eval]).tolist()
    assert tok.tokenizer.decode(ids) == TEXT * 3 + "alice"
    assert int(alice_t.train.max()) > 255                   # ids past the byte range are used
    assert "tokenized with" in data_t.source
    assert data_t.fingerprint() != data_b.fingerprint()
    assert data_t.validation.dtype == torch.int64 and int(data_t.validation.max()) < tok.vocab_size
    re = repartition(data_t, 3, "iid", chunk_bytes=64)
    assert all(c.train.dtype == torch.int32 and c.eval.dtype == torch.int32 for c in re.clients)


def test_byte_fingerprint_unchanged_by_the_tokenizer_support(tmp_path):
    """Byte-level data hashes its validation windows as uint8, as it always did."""
    import hashlib
    data = load_folder(_folder(tmp_path), seq_len=16)
    h = hashlib.sha256()
    for c in data.clients:
        h.update(c.name.encode())
        h.update(c.train.numpy().tobytes())
    h.update(data.validation.to(torch.uint8).numpy().tobytes())
    assert data.fingerprint() == h.hexdigest()


def test_builtin_corpus_tokenized(tok_file):
    data = load_stdlib_corpus(2, seq_len=32, max_bytes_per_client=20_000, tokenizer=TextTokenizer.from_path(tok_file))
    assert all(c.train.dtype == torch.int32 for c in data.clients)


def test_trainer_refuses_ids_past_the_vocabulary(tmp_path, tok_file):
    tok = TextTokenizer.from_path(tok_file)
    data = load_folder(_folder(tmp_path), seq_len=16, tokenizer=tok)
    cfg = MLAConfig.preset("tiny")                       # 256 tokens: the tokenizer has more
    with pytest.raises(DataError, match="vocab_size is 256"):
        check_tokenizer_fits(tok, cfg.vocab_size)
    trainer = LocalTrainer(cfg, TrainerConfig(seq_len=16, local_steps=1, batch_size=2))
    with pytest.raises(DataError, match="client 'alice' has token id .* 256 tokens"):
        trainer.train(init_global_state(cfg, 0), data.client("alice"))
    ok = MLAConfig.preset("tiny", vocab_size=300)
    res = LocalTrainer(ok, TrainerConfig(seq_len=16, local_steps=1, batch_size=2)).train(
        init_global_state(ok, 0), data.client("alice"))
    assert res.metrics["train_loss"] > 0


def test_tokenizer_errors(tmp_path):
    assert model_tokenizer(None) is None and model_tokenizer(tmp_path) is None
    with pytest.raises(DataError, match="cannot read tokenizer"):
        TextTokenizer.from_path(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        TextTokenizer.from_path(tmp_path)
