"""No code path that handles received bytes may unpickle or torch.load them (issue 9 item 6)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = re.compile(r"\b(pickle\.loads?|torch\.load|cPickle|dill\.loads?|marshal\.loads?|numpy\.load|np\.load)\s*\(")


def test_no_unpickling_in_received_byte_paths():
    hits = []
    for pkg in ("coordinator", "worker", "protos"):
        for p in (ROOT / pkg).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if FORBIDDEN.search(line.split("#", 1)[0]):
                    hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []
