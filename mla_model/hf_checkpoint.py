"""Reading and writing Hugging Face checkpoint folders (config.json + safetensors +
tokenizer files) for fedmla's MLA transformer; the mapping itself is :mod:`.hf`.

Weights are read with ``safetensors`` only (never pickle) and kept in their stored dtype
on the way in; :func:`read_hf_checkpoint` also returns them in fp32, the dtype fedmla
trains and stores in. bf16/fp16 -> fp32 is exact, so writing version 0 back in the
checkpoint's own dtypes reproduces its files' tensors bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MLAConfig
from .hf import HFCheckpointError, config_from_hf, hf_config_from_mla, state_from_hf, state_to_hf

# Files copied verbatim from an imported checkpoint into an export (tokenizer and generation defaults).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFCheckpoint:
    """An imported checkpoint: the model config, fp32 weights under fedmla's names, the
    config.json dict as read, each tensor's stored dtype (by fedmla name) and the carried
    files (name -> bytes; ``tokenizer.json`` among them when the folder has one)."""

    cfg: MLAConfig
    state: dict[str, torch.Tensor]
    hf_config: dict
    dtypes: dict[str, str]
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def tokenizer_json(self) -> bytes | None:
        return self.files.get("tokenizer.json")


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise HFCheckpointError(f"dtype {dtype} is not supported (use float32, bfloat16 or float16)")


def read_hf_config(model_dir: str | Path) -> tuple[dict, MLAConfig]:
    """config.json of ``model_dir`` as a dict and the MLAConfig it maps to (weights unread)."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise HFCheckpointError(f"model folder {model_dir} does not exist or is not a directory")
    try:
        hf = json.loads(path.read_text())
    except OSError as e:
        raise HFCheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise HFCheckpointError(f"{path}: must hold a JSON object")
    return hf, config_from_hf(hf, str(path))


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        files = sorted(set(weight_map.values()))
        bad = [f for f in files if Path(f).name != f or not f.endswith(".safetensors")]
        if bad:
            raise HFCheckpointError(f"{index}: weight_map names files outside the folder or not safetensors: {bad[:3]}")
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise HFCheckpointError(f"{index}: weight files {missing[:3]} are missing from {model_dir}")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pt = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" ({pt[0]} is a pickle checkpoint, which fedmla never loads)" if pt else ""
        raise HFCheckpointError(f"{model_dir}: no *.safetensors weight files{hint}")
    return files


def read_hf_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, by HF name, in its stored dtype."""
    from safetensors import safe_open
    model_dir = Path(model_dir)
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if k in out:
                        raise HFCheckpointError(f"{f}: tensor {k} also appears in another weight file")
                    out[k] = sf.get_tensor(k)
        except HFCheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise HFCheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def read_hf_checkpoint(model_dir: str | Path) -> HFCheckpoint:
    """Import a transformers DeepSeek-V2/V3 folder; refuses what fedmla cannot run exactly."""
    model_dir = Path(model_dir)
    hf, cfg = read_hf_config(model_dir)
    raw = state_from_hf(read_hf_state(model_dir), cfg, hf, f"{model_dir} (weights)")
    dtypes = {k: dtype_name(v.dtype) for k, v in raw.items()}
    state = {k: v.to(torch.float32).contiguous() for k, v in raw.items()}
    files = {}
    for name in CARRIED_FILES:
        p = model_dir / name
        if p.is_file():
            files[name] = p.read_bytes()
    return HFCheckpoint(cfg, state, hf, dtypes, files)


def write_hf_checkpoint(out_dir: str | Path, state: dict[str, torch.Tensor], cfg: MLAConfig,
                        hf_config: dict | None = None, dtypes: dict[str, str] | str = "float32",
                        files: dict[str, bytes] | None = None) -> Path:
    """Write ``out_dir``/config.json, model.safetensors and ``files`` (tokenizer ...).

    ``hf_config``: the config.json a run was imported from (kept apart from the fields
    fedmla owns), or None for a fresh dense ``deepseek_v3`` config. ``dtypes``: one dtype
    name for every tensor, or a per-tensor map (fedmla names), e.g. an import's own.
    """
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    if isinstance(dtypes, str):
        dtypes = {k: dtypes for k in state}
    used = sorted(set(dtypes.values()))
    for d in used:
        if d not in _DTYPES:
            raise HFCheckpointError(f"dtype {d!r} is not supported (use {', '.join(_DTYPES)})")
    hf = hf_config_from_mla(cfg, used[0] if len(used) == 1 else "float32", hf_config)
    hf_state = state_to_hf({k: v.to(_DTYPES[dtypes.get(k, "float32")]) for k, v in state.items()}, cfg, hf)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    for name, data in (files or {}).items():
        if name not in CARRIED_FILES:
            raise HFCheckpointError(f"will not write {name!r}: only {', '.join(CARRIED_FILES)} are carried")
        (out_dir / name).write_bytes(data)
    return out_dir
