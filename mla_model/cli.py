"""`fedmla model ...` commands."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from .config import PRESETS, MLAConfig
from .stats import (mha_cache_bytes_per_token, mha_flops_per_token, mha_head_dim, mha_param_count,
                    mla_cache_bytes_per_token, mla_flops_per_token, mla_param_count)


def model_info(cfg: MLAConfig, element_size: int = 2) -> dict:
    """Sizes of the MLA config beside a multi-head attention of the same width and heads."""
    mla_cache = mla_cache_bytes_per_token(cfg, element_size)
    mha_cache = mha_cache_bytes_per_token(cfg, element_size)
    return {
        "config": cfg.model_dump(),
        "element_size": element_size,
        "mla": {"parameters": mla_param_count(cfg), "flops_per_token": mla_flops_per_token(cfg),
                "kv_cache_bytes_per_token": mla_cache},
        "mha": {"head_dim": mha_head_dim(cfg), "parameters": mha_param_count(cfg),
                "flops_per_token": mha_flops_per_token(cfg), "kv_cache_bytes_per_token": mha_cache},
        "kv_cache_ratio": mla_cache / mha_cache,
    }


def register(app: typer.Typer, bench: typer.Typer) -> None:
    model_app = typer.Typer(help="Inspect MLA model configurations.", no_args_is_help=True)
    app.add_typer(model_app, name="model")

    @model_app.command("info")
    def info(
        preset: str = typer.Option("small", help=f"model preset: {', '.join(PRESETS)}"),
        element_size: int = typer.Option(2, help="bytes per cached element (2 for bf16/fp16, 4 for fp32)"),
        json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    ) -> None:
        """Parameters, FLOPs per token and KV-cache bytes per token, MLA beside MHA."""
        if preset not in PRESETS:
            raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", param_hint="--preset")
        cfg = MLAConfig.preset(preset)
        info = model_info(cfg, element_size)
        if json_out:
            typer.echo(json.dumps(info, indent=2))
            return
        t = Table(title=f"preset {preset!r}: d={cfg.dim}, L={cfg.n_layers}, H={cfg.n_heads}, "
                        f"kv_lora_rank={cfg.kv_lora_rank}, rope={cfg.qk_rope_head_dim}")
        t.add_column("")
        t.add_column("MLA", justify="right")
        t.add_column(f"MHA (d_h={info['mha']['head_dim']})", justify="right")
        for key, label in [("parameters", "parameters"), ("flops_per_token", f"FLOPs/token @ {cfg.max_seq_len} ctx"),
                           ("kv_cache_bytes_per_token", f"KV cache bytes/token ({element_size} B/elem)")]:
            t.add_row(label, f"{info['mla'][key]:,}", f"{info['mha'][key]:,}")
        Console().print(t)
        Console().print(f"MLA cache is {info['kv_cache_ratio']:.3f}x the MHA cache.")
