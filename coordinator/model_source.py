"""Where a run's model comes from: a preset with a seeded initialisation, or a Hugging
Face DeepSeek-V2/V3 checkpoint folder (``settings.model_dir``, ``--model DIR``).

An imported checkpoint also leaves in the store what an export needs to write it back as
it came (:data:`META_HF_CONFIG`, :data:`META_HF_DTYPES`, :data:`META_HF_FILES`): its
config.json, the stored dtype of every tensor and its tokenizer/generation files.
Workers never see DIR: they receive the model config with the task and the weights
through the ordinary download, like any other model.
"""

from __future__ import annotations

import base64
import json

import torch

from fedmla.mla_model import MLAConfig, MLATransformer
from fedmla.mla_model.hf import HFCheckpointError, config_from_hf
from fedmla.mla_model.hf_checkpoint import read_hf_checkpoint, read_hf_config

from .errors import StoreError
from .settings import CoordinatorSettings
from .store import Store

META_HF_CONFIG = "hf_config"     # the imported config.json (JSON text)
META_HF_DTYPES = "hf_dtypes"     # {fedmla tensor name: "float32" | "bfloat16" | "float16"} of the import
META_HF_FILES = "hf_files"       # {file name: base64 bytes}: tokenizer.json and friends


def initial_model(settings: CoordinatorSettings, store: Store) -> tuple[MLAConfig, dict[str, torch.Tensor] | None,
                                                                         bytes | None]:
    """(model config, initial fp32 state, tokenizer.json bytes or None) of the run.

    The initial state is None when ``store`` already holds a model: a resumed run keeps
    its own weights, and a resumed import takes its config from the config.json kept in
    the store (``--model`` may be left out then; given, it must be the same model). For
    an import into an empty store the checkpoint's config, dtypes and files are recorded
    in the store's meta.
    """
    fresh = store.latest_model() is None
    stored_hf, _ = stored_hf_config(store)
    if not fresh and stored_hf is not None:
        # A resumed import: the store has the config.json it came with; DIR is not needed
        # (when given, bind_run still refuses a DIR whose model differs from the store's).
        cfg = config_from_hf(stored_hf, f"store {store.root} (imported config.json)")
        if settings.model_dir is not None:
            try:
                _, given = read_hf_config(settings.model_dir)
            except HFCheckpointError as e:
                raise StoreError(f"--model {settings.model_dir}: {e}") from None
            if given != cfg:
                raise StoreError(f"store {store.root} was started from another checkpoint than --model "
                                 f"{settings.model_dir} (the config.json files differ); use a new --store")
        return cfg, None, stored_files(store).get("tokenizer.json")
    if settings.model_dir is None:
        cfg = MLAConfig.preset(settings.preset)
        if not fresh:
            return cfg, None, stored_files(store).get("tokenizer.json")
        model = MLATransformer(cfg)
        model.reset_parameters(torch.Generator().manual_seed(settings.init_seed))
        return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}, None
    if not fresh:
        raise StoreError(f"store {store.root} holds a run started from a preset, not from a checkpoint; "
                         f"--model {settings.model_dir} needs a new --store")
    try:
        ckpt = read_hf_checkpoint(settings.model_dir)
    except HFCheckpointError as e:
        raise StoreError(f"--model {settings.model_dir}: {e}") from None
    store.set_meta(META_HF_CONFIG, json.dumps(ckpt.hf_config, sort_keys=True))
    store.set_meta(META_HF_DTYPES, json.dumps(ckpt.dtypes, sort_keys=True))
    store.set_meta(META_HF_FILES, json.dumps({k: base64.b64encode(v).decode() for k, v in ckpt.files.items()}))
    return ckpt.cfg, ckpt.state, ckpt.tokenizer_json


def stored_files(store: Store) -> dict[str, bytes]:
    """The tokenizer/generation files an imported run keeps (empty for a preset run)."""
    raw = store.meta(META_HF_FILES)
    return {k: base64.b64decode(v) for k, v in json.loads(raw).items()} if raw else {}


def stored_hf_config(store: Store) -> tuple[dict | None, dict[str, str] | None]:
    """The imported config.json and per-tensor dtypes, or (None, None) for a preset run."""
    cfg, dtypes = store.meta(META_HF_CONFIG), store.meta(META_HF_DTYPES)
    return (json.loads(cfg) if cfg else None), (json.loads(dtypes) if dtypes else None)
