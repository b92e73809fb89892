import subprocess
import sys
from pathlib import Path

from fedmla.protos.fedmla.v1 import types_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_protos():
    r = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_tensor_roundtrip_is_plain_bytes():
    t = types_pb2.Tensor(dtype=types_pb2.FLOAT32, shape=[2, 3], data=b"\x00" * 24)
    back = types_pb2.Tensor.FromString(t.SerializeToString())
    assert list(back.shape) == [2, 3] and back.dtype == types_pb2.FLOAT32 and len(back.data) == 24
