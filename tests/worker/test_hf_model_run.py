"""Bring your own model, end to end: a tiny DeepSeek-V3 checkpoint and tokenizer made here
by transformers and `tokenizers`, two rounds of `fedmla simulate --model`, then `fedmla
export` of version 0 (bit for bit the input) and of the trained version (loaded by
transformers with no missing keys, same logits as fedmla)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from hf_testlib import safetensors_tensors, save_checkpoint, transformers

from fedmla.mla_model import MLAConfig, MLATransformer, parameter_shapes
from fedmla.protos.weights import load_safetensors_bytes
from fedmla.worker.apps.cli import app


def _store_model(store, version=None) -> MLATransformer:
    from fedmla.coordinator.store import Store
    s = Store(store, create=False)
    try:
        cfg = MLAConfig.model_validate_json(s.meta("model_config"))
        rec = s.latest_model() if version is None else s.model(version)
        state = load_safetensors_bytes(s.read_checkpoint(rec),
                                       {k: (v, torch.float32) for k, v in parameter_shapes(cfg).items()})
    finally:
        s.close()
    model = MLATransformer(cfg).eval()
    model.load_state_dict(state)
    return model


def test_simulate_from_checkpoint_then_export(tmp_path):
    ckpt, store = tmp_path / "ckpt", tmp_path / "store"
    save_checkpoint(ckpt, "deepseek_v3", tokenizer=True)
    runner = CliRunner()
    out = tmp_path / "sim.json"
    r = runner.invoke(app, ["simulate", "--model", str(ckpt), "--clients", "2", "--clients-per-round", "2",
                            "--rounds", "2", "--local-steps", "2", "--actors", "1", "--store", str(store),
                            "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["rounds"] == 2
    assert "tokenized with" in res["data_source"] and "tokenizer.json" in res["data_source"]
    assert all(c["hash"] == res["coordinator_hash"] for c in res["clients"].values() if c["rounds"])

    # Version 0 goes out as it came in: same tensors, same dtypes, the same tokenizer file.
    e0 = tmp_path / "export-v0"
    r = runner.invoke(app, ["export", "--store", str(store), "--version", "0", "--out", str(e0)])
    assert r.exit_code == 0, r.output
    a, b = safetensors_tensors(ckpt), safetensors_tensors(e0)
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert (e0 / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()

    # The trained model: transformers loads it whole and agrees with fedmla on the logits.
    e2 = tmp_path / "export-latest"
    r = runner.invoke(app, ["export", "--store", str(store), "--out", str(e2)])
    assert r.exit_code == 0, r.output
    assert "version 2" in r.output
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(e2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    trained = _store_model(store)
    assert not torch.equal(trained.state_dict()["layers.0.attn.wkv_b.weight"],
                           _store_model(store, 0).state_dict()["layers.0.attn.wkv_b.weight"])
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf.eval()(tokens).logits, trained(tokens)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(e2 / "tokenizer.json"))
    assert tok.decode(tok("def add(a, b):")["input_ids"]) == "def add(a, b):"


def test_export_refusals(tmp_path):
    ckpt, store = tmp_path / "ckpt", tmp_path / "store"
    save_checkpoint(ckpt, "deepseek_v3")
    from fedmla.coordinator.rounds import Coordinator
    from fedmla.coordinator.settings import CoordinatorSettings
    c = Coordinator(CoordinatorSettings(store=store, model_dir=ckpt))
    c.store.close()
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--store", str(store), "--version", "5", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no checkpoint of model version 5" in r.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    r = runner.invoke(app, ["export", "--store", str(store), "--out", str(tmp_path / "full")])
    assert r.exit_code == 2 and "not an empty folder" in r.output
    r = runner.invoke(app, ["export", "--store", str(tmp_path / "nostore"), "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "no fedmla store" in r.output


def test_coordinator_refuses_a_moe_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, "deepseek_v3")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "first_k_dense_replace": 1}))
    r = CliRunner().invoke(app, ["coordinator", "--model", str(ckpt), "--store", str(tmp_path / "store"),
                                 "--port", "0"])
    assert r.exit_code == 2
    assert "config.json: first_k_dense_replace=1 < num_hidden_layers=2: MoE layers are not supported" in r.output


def test_coordinator_resumes_an_imported_run(tmp_path):
    """A restarted coordinator keeps its own weights and reads only config.json again."""
    ckpt, store = tmp_path / "ckpt", tmp_path / "store"
    save_checkpoint(ckpt, "deepseek_v2", q_lora_rank=None, tie_word_embeddings=True)
    from fedmla.coordinator.rounds import Coordinator
    from fedmla.coordinator.settings import CoordinatorSettings
    first = Coordinator(CoordinatorSettings(store=store, model_dir=ckpt))
    sha = first.model_sha
    first.store.close()
    for f in ckpt.glob("*.safetensors"):
        f.unlink()                                  # weights gone: a resume must not need them
    again = Coordinator(CoordinatorSettings(store=store, model_dir=ckpt))
    assert again.model_sha == sha and again.cfg.tie_word_embeddings and again.cfg.q_lora_rank == 0
    again.store.close()


def test_bench_comm_from_checkpoint(tmp_path):
    """`fedmla bench comm --model DIR`: both arms start from the checkpoint's weights and train on
    text tokenized with its tokenizer."""
    from test_bench_comm import micro_config
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, "deepseek_v3", tokenizer=True)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(micro_config().model_dump_json())
    r = CliRunner().invoke(app, ["bench", "comm", "--config", str(cfg), "--model", str(ckpt),
                                 "--json", str(tmp_path / "out.json"), "--no-ablation"])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["config"]["model_dir"] == str(ckpt)
    assert "tokenized with" in out["data"]["source"]
    n = sum(t.numel() for t in safetensors_tensors(ckpt).values())
    assert out["model_parameters"] == n
    assert all(r["hash_ok"] for r in out["fedmla"]["per_round"])


def test_resume_without_model_and_mismatches(tmp_path):
    """The store of an imported run is enough to resume it; another checkpoint or a preset
    store with --model is refused."""
    from fedmla.coordinator.errors import StoreError
    from fedmla.coordinator.rounds import Coordinator
    from fedmla.coordinator.settings import CoordinatorSettings
    import pytest
    ckpt, other, store = tmp_path / "ckpt", tmp_path / "other", tmp_path / "store"
    save_checkpoint(ckpt, "deepseek_v3", tokenizer=True)
    save_checkpoint(other, "deepseek_v3", q_lora_rank=None)
    first = Coordinator(CoordinatorSettings(store=store, model_dir=ckpt))
    first.store.close()
    again = Coordinator(CoordinatorSettings(store=store))
    assert again.cfg == first.cfg and again.model_sha == first.model_sha
    assert again.tokenizer_json == (ckpt / "tokenizer.json").read_bytes()
    again.store.close()
    with pytest.raises(StoreError, match="another checkpoint"):
        Coordinator(CoordinatorSettings(store=store, model_dir=other))
    preset_store = tmp_path / "preset-store"
    Coordinator(CoordinatorSettings(store=preset_store)).store.close()
    with pytest.raises(StoreError, match="started from a preset"):
        Coordinator(CoordinatorSettings(store=preset_store, model_dir=ckpt))
    with pytest.raises(ValueError, match="either preset or model_dir"):
        CoordinatorSettings(store=store, model_dir=ckpt, preset="small")
    r = CliRunner().invoke(app, ["simulate", "--model", str(ckpt), "--preset", "tiny"])
    assert r.exit_code == 2 and "not both" in r.output
