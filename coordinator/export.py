"""``fedmla export``: a committed model version of a store as a Hugging Face checkpoint.

The folder holds config.json, model.safetensors and, for a run imported with ``--model
DIR``, DIR's tokenizer and generation files; ``transformers.AutoModelForCausalLM.
from_pretrained(folder)`` loads it as ``DeepseekV3ForCausalLM`` (or V2, as imported).
A run imported from DIR keeps DIR's config.json (fedmla's fields refreshed) and, by
default, each tensor's own dtype, so version 0 reproduces DIR's tensors bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedmla.mla_model import MLAConfig, parameter_shapes
from fedmla.mla_model.hf import HFCheckpointError
from fedmla.mla_model.hf_checkpoint import write_hf_checkpoint
from fedmla.protos.weights import load_safetensors_bytes

from .errors import StoreError
from .model_source import stored_files, stored_hf_config
from .store import Store

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def export_model(store_dir: str | Path, out_dir: str | Path, version: int | None = None,
                 dtype: str = "auto") -> dict:
    """Write model ``version`` (default: the latest committed) of the store at ``store_dir``
    into the new or empty folder ``out_dir``. ``dtype`` ``auto``: an imported run's own
    per-tensor dtypes, float32 for a preset run. Returns a summary dict."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"--out {out_dir} exists and is not an empty folder; choose a new one")
    store = Store(store_dir, create=False)
    try:
        cfg_json = store.meta("model_config")
        latest = store.latest_model()
        if cfg_json is None or latest is None:
            raise StoreError(f"store {store_dir} holds no model yet")
        cfg = MLAConfig.model_validate_json(cfg_json)
        rec = latest if version is None else store.model(version)
        if rec is None:
            raise StoreError(f"store {store_dir} has no checkpoint of model version {version} (latest is "
                             f"{latest.version}; older versions than the last keep_checkpoints are deleted, "
                             f"except version 0)")
        expected = {k: (s, torch.float32) for k, s in parameter_shapes(cfg).items()}
        try:
            state = load_safetensors_bytes(store.read_checkpoint(rec), expected, f"checkpoint {rec.path}")
        except ValueError as e:
            raise StoreError(str(e)) from None
        hf_config, dtypes = stored_hf_config(store)
        files = stored_files(store)
    finally:
        store.close()
    if dtype != "auto":
        dtypes = dtype
    write_hf_checkpoint(out_dir, state, cfg, hf_config, dtypes or "float32", files)
    return {"version": rec.version, "out": str(out_dir), "model_type": (hf_config or {}).get("model_type", "deepseek_v3"),
            "files": sorted(p.name for p in out_dir.iterdir())}


def register(app, bench) -> None:
    import typer

    @app.command("export")
    def export_cmd(
        store: Path = typer.Option(..., "--store", help="coordinator store directory"),
        out: Path = typer.Option(..., "--out", help="new (or empty) folder to write the checkpoint to"),
        version: int = typer.Option(None, "--version", min=0, help="model version (default: latest committed)"),
        dtype: str = typer.Option("auto", "--dtype", help="auto (the imported checkpoint's dtypes; float32 for a "
                                                           "preset run), float32, bfloat16 or float16"),
    ) -> None:
        """Write a committed model version as a Hugging Face checkpoint (config.json, model.safetensors and the
        run's tokenizer), loadable with transformers' AutoModelForCausalLM.from_pretrained."""
        try:
            res = export_model(store, out, version, dtype)
        except (StoreError, HFCheckpointError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        typer.echo(f"exported model version {res['version']} ({res['model_type']}) to {res['out']}: "
                   f"{', '.join(res['files'])}")
