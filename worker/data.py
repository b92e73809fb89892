"""Client data for federated training: byte-level token streams, one per client.

Two sources, one shape of result (:class:`FederatedData`):

- the built-in corpus, :func:`load_stdlib_corpus`: the ``.py`` sources of this Python's
  standard library (no download), one client per top-level module or package, so the
  split is naturally non-IID (``email`` reads nothing like ``ctypes``);
- a user folder, :func:`load_folder`: ``DIR/<client>/**/*`` text files, one
  subfolder per client.

Tokens are raw UTF-8 bytes (vocabulary 256, uint8) by default; with a
:class:`TextTokenizer` (a Hugging Face ``tokenizer.json``, e.g. the one of a model imported
with ``--model DIR``) each client's stream is tokenized with it instead (int32 ids). Each
client's files are read in sorted path order and joined with a newline into one stream.

Held-out set (fixed and documented): the last ``eval_fraction`` of every *source*
client's stream, cut before any re-partitioning. The global validation set is a fixed
list of non-overlapping ``(seq_len + 1)``-token windows taken from the start of each
client's tail, at most ``eval_windows_per_client`` per client, in client-name order.
Nothing random is involved, so every run, partitioning and method is evaluated on
exactly the same tokens.

:func:`repartition` redistributes the *training* part of any source IID or by a
Dirichlet(alpha) mixture over the source clients (seeded; our own implementation,
because flwr-datasets partitioners operate on Hugging Face ``Dataset`` objects and
pulling that stack in would make loading slow for a few hundred KB of bytes).

Bad data raises :class:`DataError` naming the file or client at fault.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DataError(ValueError):
    """Client data cannot be used; the message names the file or client at fault."""


# Directory names never read from the standard library: test suites and installed packages.
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib",
                "lib2to3", "pydoc_data", "encodings", "ensurepip", "turtledemo"}


@dataclass
class ClientData:
    """One client's tokens: ``train`` (N,) and ``eval`` (M,), uint8 bytes or int32 token ids."""

    name: str
    train: torch.Tensor
    eval: torch.Tensor
    files: list[str] = field(default_factory=list)

    @property
    def num_train_tokens(self) -> int:
        return int(self.train.numel())

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse token ids the model has no embedding for (a tokenizer larger than the model)."""
        top = max((int(t.max()) for t in (self.train, self.eval) if t.numel()), default=-1)
        if top >= vocab_size:
            raise DataError(f"client {self.name!r} has token id {top}, but the model's vocabulary has {vocab_size} "
                            f"tokens; tokenize with the model's own tokenizer")

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size, seq_len + 1) int64 windows at random offsets of the training stream."""
        n = self.train.numel() - (seq_len + 1)
        if n < 0:
            raise DataError(f"client {self.name!r} has {self.train.numel()} training tokens, fewer than one "
                            f"sequence of {seq_len + 1}")
        starts = torch.randint(0, n + 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        return self.train[idx].long()


@dataclass
class FederatedData:
    """Clients (in a fixed order) plus the fixed validation windows (V, seq_len + 1) int64."""

    clients: list[ClientData]
    validation: torch.Tensor
    seq_len: int
    source: str

    def __post_init__(self) -> None:
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise DataError(f"duplicate client names in {self.source}: {sorted(names)}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.clients]

    def client(self, name: str) -> ClientData:
        for c in self.clients:
            if c.name == name:
                return c
        raise DataError(f"no client named {name!r} in {self.source} (have {', '.join(self.names)})")

    def fingerprint(self) -> str:
        """SHA-256 over client names, training and validation tokens: same data, same hash."""
        h = hashlib.sha256()
        for c in self.clients:
            h.update(c.name.encode())
            h.update(c.train.numpy().tobytes())
        # Validation windows are int64; hash them in the clients' token dtype (uint8 for bytes).
        h.update(self.validation.to(self.clients[0].train.dtype).numpy().tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        return {"source": self.source, "seq_len": self.seq_len, "validation_windows": int(self.validation.size(0)),
                "clients": {c.name: {"train_tokens": c.num_train_tokens, "eval_tokens": int(c.eval.numel()),
                                     "files": len(c.files)} for c in self.clients}}


# ---- tokenizing --------------------------------------------------------------------------------

class TextTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from ``tokenizer.json`` bytes.

    Called on a client's UTF-8 stream, returns its ids as an int32 tensor. ``sha256``
    identifies the file (it enters the data source's description).
    """

    def __init__(self, tokenizer_json: bytes, where: str = "tokenizer.json"):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"{where}: tokenizing needs the `tokenizers` package (pip install 'fedmla[hf]')") from None
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own exception type
            raise DataError(f"{where}: not a valid tokenizer.json ({e})") from None
        self.where = where
        self.sha256 = hashlib.sha256(tokenizer_json).hexdigest()
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_path(cls, path: str | Path) -> "TextTokenizer":
        """From a ``tokenizer.json`` file, or a folder holding one (a model checkpoint)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        try:
            return cls(p.read_bytes(), str(p))
        except OSError as e:
            raise DataError(f"cannot read tokenizer {p}: {e.strerror or e}") from None

    def __call__(self, stream: bytes) -> torch.Tensor:
        # A byte cap can cut the last character in two; the fragment is dropped.
        ids = self.tokenizer.encode(stream.decode("utf-8", errors="ignore"), add_special_tokens=False).ids
        return torch.tensor(ids, dtype=torch.int32)

    def describe(self) -> str:
        return f"{self.where} (sha256 {self.sha256[:12]}, {self.vocab_size} tokens)"


def model_tokenizer(model_dir: str | Path | None) -> TextTokenizer | None:
    """The tokenizer of a Hugging Face checkpoint folder, or None (no folder, or a folder
    without ``tokenizer.json``: byte-level data, as for fedmla's own presets)."""
    if model_dir is None or not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    return TextTokenizer.from_path(Path(model_dir) / "tokenizer.json")


def check_tokenizer_fits(tokenizer: TextTokenizer | None, vocab_size: int) -> None:
    """A tokenizer whose ids reach past the model's vocabulary is refused up front."""
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(f"{tokenizer.where} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{vocab_size}; use the model's own tokenizer")


# ---- reading ---------------------------------------------------------------------------------

def _read_text(path: Path, client: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"client {client!r}: cannot read {path}: {e.strerror or e}") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"client {client!r}: {path} is not UTF-8 text (bad byte at offset {e.start})") from None
    return raw


def _join_capped(chunks: list[bytes], max_bytes: int | None) -> bytes:
    out = b"\n".join(chunks)
    return out if max_bytes is None else out[:max_bytes]


def _split_client(name: str, stream: bytes, files: list[str], eval_fraction: float, seq_len: int,
                  tokenizer: TextTokenizer | None = None) -> ClientData:
    if not stream:
        raise DataError(f"client {name!r} is empty (no text in {len(files)} file(s))")
    if tokenizer is None:
        t = torch.frombuffer(bytearray(stream), dtype=torch.uint8).clone()
    else:
        t = tokenizer(stream)
    unit = "bytes" if tokenizer is None else "tokens"
    n_eval = int(round(t.numel() * eval_fraction))
    train, ev = t[: t.numel() - n_eval], t[t.numel() - n_eval:]
    if train.numel() < seq_len + 1:
        raise DataError(f"client {name!r} has {train.numel()} training {unit}, fewer than one sequence of "
                        f"{seq_len + 1} (seq_len={seq_len}); give it more text or lower seq_len")
    return ClientData(name=name, train=train, eval=ev, files=files)


def _validation(clients: list[ClientData], seq_len: int, per_client: int) -> torch.Tensor:
    w = seq_len + 1
    rows = []
    for c in sorted(clients, key=lambda c: c.name):
        k = min(per_client, c.eval.numel() // w)
        if k:
            rows.append(c.eval[: k * w].view(k, w))
    if not rows:
        raise DataError(f"no client has a held-out tail of at least {w} bytes; raise eval_fraction or lower seq_len")
    return torch.cat(rows).long()


def _finish(streams: dict[str, tuple[bytes, list[str]]], source: str, seq_len: int, eval_fraction: float,
            eval_windows_per_client: int, tokenizer: TextTokenizer | None = None) -> FederatedData:
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    clients = [_split_client(n, s, f, eval_fraction, seq_len, tokenizer) for n, (s, f) in sorted(streams.items())]
    if not clients:
        raise DataError(f"{source}: no clients")
    if tokenizer is not None:
        source = f"{source}, tokenized with {tokenizer.describe()}"
    return FederatedData(clients, _validation(clients, seq_len, eval_windows_per_client), seq_len, source)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_clients(root: Path | None = None) -> dict[str, list[Path]]:
    """Top-level module/package name -> its ``.py`` files (sorted), test suites excluded."""
    root = root or stdlib_dir()
    out: dict[str, list[Path]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name in _STDLIB_SKIP or entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.endswith(".py"):
            out.setdefault(entry.name[:-3], []).append(Path(entry.path))
        elif entry.is_dir() and (Path(entry.path) / "__init__.py").exists():
            files = []
            for dirpath, dirnames, filenames in os.walk(entry.path):
                dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
                files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
            if files:
                out.setdefault(entry.name, []).extend(sorted(files))
    return out


def load_stdlib_corpus(num_clients: int | None = 8, seq_len: int = 64, max_bytes_per_client: int = 200_000,
                       eval_fraction: float = 0.1, eval_windows_per_client: int = 16,
                       names: list[str] | None = None, tokenizer: TextTokenizer | None = None) -> FederatedData:
    """The built-in corpus: one client per top-level stdlib module/package.

    ``names`` picks clients by name; otherwise the ``num_clients`` largest (by bytes,
    ties by name; ``None`` = all). Each stream is capped at ``max_bytes_per_client``
    bytes so loading takes well under a second. Files that are not UTF-8 are skipped
    (this is our own corpus, not user data). ``tokenizer``: tokenize instead of bytes.
    """
    groups = stdlib_clients()
    if names is not None:
        missing = [n for n in names if n not in groups]
        if missing:
            raise DataError(f"no stdlib module or package named {missing} (e.g. {', '.join(list(groups)[:8])}, ...)")
        chosen = list(names)
    else:
        sizes = {n: sum(p.stat().st_size for p in fs) for n, fs in groups.items()}
        chosen = sorted(groups, key=lambda n: (-sizes[n], n))
        chosen = chosen[:num_clients] if num_clients is not None else chosen
    streams = {}
    for n in chosen:
        chunks, files, total = [], [], 0
        for p in groups[n]:
            try:
                raw = _read_text(p, n)
            except DataError:
                continue
            chunks.append(raw)
            files.append(str(p))
            total += len(raw) + 1
            if total >= max_bytes_per_client:
                break
        streams[n] = (_join_capped(chunks, max_bytes_per_client), files)
    return _finish(streams, f"stdlib {stdlib_dir()}", seq_len, eval_fraction, eval_windows_per_client, tokenizer)


def load_folder(root: str | Path, seq_len: int = 64, max_bytes_per_client: int | None = 2_000_000,
                eval_fraction: float = 0.1, eval_windows_per_client: int = 16,
                tokenizer: TextTokenizer | None = None) -> FederatedData:
    """User data: ``root/<client>/...`` text files (any depth, sorted), one subfolder per client.

    Every file must be UTF-8 text; hidden files are ignored; a client without text or
    with fewer training tokens than one sequence is an error naming it.
    ``max_bytes_per_client`` caps the text read (bytes, before any tokenizing).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"data folder {root} has no client subfolders (expected {root}/<client>/<files>)")
    streams = {}
    for d in subdirs:
        paths = sorted(p for p in d.rglob("*") if not p.is_dir() and not any(part.startswith(".")
                                                                          for part in p.relative_to(d).parts))
        if not paths:
            raise DataError(f"client {d.name!r} ({d}) has no files")
        chunks, total = [], 0
        for p in paths:
            raw = _read_text(p, d.name)
            chunks.append(raw)
            total += len(raw) + 1
            if max_bytes_per_client is not None and total >= max_bytes_per_client:
                break
        streams[d.name] = (_join_capped(chunks, max_bytes_per_client), [str(p) for p in paths])
    return _finish(streams, f"folder {root}", seq_len, eval_fraction, eval_windows_per_client, tokenizer)


# ---- re-partitioning ---------------------------------------------------------------------------

def repartition(data: FederatedData, num_clients: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
                chunk_bytes: int = 2048) -> FederatedData:
    """Redistribute the training bytes of ``data`` over ``num_clients`` new clients.

    The training streams are cut into ``chunk_bytes`` chunks (of tokens, for tokenized data), each labelled with its
    source client. ``iid``: chunks shuffled and dealt round-robin. ``dirichlet``: for
    each source, the share going to each new client is drawn from Dirichlet(alpha)
    (small alpha = very skewed), as in Hsu et al. 2019. The validation set is untouched.
    New clients are named ``client-000`` ...; chunk order inside a client follows the source order.
    """
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if scheme not in ("iid", "dirichlet"):
        raise DataError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")
    if scheme == "dirichlet" and alpha <= 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    g = torch.Generator().manual_seed(seed)
    chunks: list[tuple[int, torch.Tensor]] = []
    for si, c in enumerate(data.clients):
        for s in range(0, c.train.numel(), chunk_bytes):
            chunks.append((si, c.train[s: s + chunk_bytes]))
    assign = torch.empty(len(chunks), dtype=torch.long)
    if scheme == "iid":
        perm = torch.randperm(len(chunks), generator=g)
        assign[perm] = torch.arange(len(chunks)) % num_clients
    else:
        conc = torch.full((num_clients,), float(alpha), dtype=torch.float64)
        for si in range(len(data.clients)):
            idx = torch.tensor([i for i, (s, _) in enumerate(chunks) if s == si], dtype=torch.long)
            # Dirichlet via normalised Gamma draws from our seeded generator.
            gam = _gamma(conc, g)
            p = gam / gam.sum()
            owner = torch.multinomial(p, idx.numel(), replacement=True, generator=g)
            assign[idx] = owner
    new = []
    for k in range(num_clients):
        parts = [chunks[i][1] for i in (assign == k).nonzero().flatten().tolist()]
        name = f"client-{k:03d}"
        if not parts:
            raise DataError(f"{scheme} partition (alpha={alpha}, seed={seed}) left {name} without data; "
                            f"use fewer clients, a larger alpha or smaller chunk_bytes")
        train = torch.cat(parts)
        if train.numel() < data.seq_len + 1:
            raise DataError(f"{scheme} partition left {name} with {train.numel()} bytes, fewer than one sequence")
        new.append(ClientData(name=name, train=train, eval=torch.empty(0, dtype=train.dtype)))
    return FederatedData(new, data.validation, data.seq_len, f"{data.source} ({scheme}, {num_clients} clients, seed {seed})")


def _gamma(conc: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gamma(conc, 1) samples from a seeded generator (Marsaglia-Tsang, with the
    alpha < 1 boost), so Dirichlet partitions are reproducible from the seed alone."""
    out = torch.empty_like(conc)
    for i, a in enumerate(conc.tolist()):
        boost = a < 1.0
        d = (a + 1.0 if boost else a) - 1.0 / 3.0
        c = 1.0 / (9.0 * d) ** 0.5
        while True:
            x = float(torch.randn((), generator=g, dtype=torch.float64))
            v = (1.0 + c * x) ** 3
            if v <= 0:
                continue
            u = float(torch.rand((), generator=g, dtype=torch.float64))
            if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
                val = d * v
                break
        if boost:
            val *= float(torch.rand((), generator=g, dtype=torch.float64)) ** (1.0 / a)
        out[i] = val
    return out
