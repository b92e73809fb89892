"""`fedmla bench kernels`: attention and decode figures on the current device, as JSON.

- attention: forward+backward time of MLA training attention through the naive
  reference, SDPA's math path (v not padded, dims differ) and the dispatched path
  (CUDA: Triton; CPU: the causal block path up to T=1024, SDPA with v zero-padded above), and
  the padded-v SDPA path alone, per sequence length;
  plus an MHA of the same width (H heads of d_h = dim / H) through SDPA.
- decode: one decode step of one attention layer over a filled cache, per context:
  a naive per-head KV cache (K (B, S, H, dn+dr) and V (B, S, H, dv), MHA-style, read
  per head with einsum) against the absorbed latent cache (B, S, c) + (B, S, dr) read
  once for all heads (W_UK / W_UV absorption included in its time), plus the same
  naive cache stored head-major (B, H, S, D), and the equal-width MHA;
  tokens/s = B / step time, and the cache bytes.
- throughput: the attention rows carry their matmul FLOPs and the dispatched path's
  TFLOP/s; the decode rows the achieved cache-read bandwidth (GB/s) of the absorbed and
  naive steps. On CUDA these are the figures to hold against the GPU's peak.

Shapes default to the ``base`` preset (H=8, dn=128, dr=64, dv=128, c=512, dim=512).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fedmla.mla_model.config import MLAConfig

from fedmla.kernels.mla_attention import mla_attention, mla_attention_naive, mla_attention_sdpa
from fedmla.kernels.mla_decode import mla_decode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Best of ``repeats`` wall-clock runs in milliseconds (the best is the least noisy
    estimate on a shared machine)."""
    return time_interleaved({"f": fn}, device, repeats, warmup)["f"]


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 3,
                     warmup: int = 1) -> dict[str, float]:
    """Best-of-``repeats`` milliseconds for each function, timed in alternation (a, b, c,
    a, b, c, ...) so that load from other processes falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: t * 1e3 for name, t in best.items()}


def machine_info(device: torch.device) -> dict:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_1min": load,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def attention_fwd_bwd_flops(batch: int, T: int, heads: int, d_qk: int, d_v: int) -> int:
    """Matmul FLOPs of causal attention forward + backward: the forward's QK^T (d_qk) and
    PV (d_v) over the T(T+1)/2 unmasked pairs, 2 FLOPs per multiply-add; the backward
    recomputes nothing and does twice the forward's matmuls (dQ, dK from dS; dP, dV)."""
    pairs = T * (T + 1) // 2
    fwd = 2 * batch * heads * pairs * (d_qk + d_v)
    return 3 * fwd


def bench_attention(cfg: MLAConfig, seq_lens, batch: int, device: torch.device, dtype: torch.dtype,
                    repeats: int, naive_max_len: int) -> list[dict]:
    H, dn, dr, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    scale = cfg.softmax_scale
    d_h = max(cfg.dim // H, 1)
    rows = []
    for T in seq_lens:
        g = torch.Generator(device=device).manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype).requires_grad_(True)  # noqa: E731
        q, kn, kp, v = mk(batch, T, H, dn + dr), mk(batch, T, H, dn), mk(batch, T, dr), mk(batch, T, H, dv)
        do = torch.randn(batch, T, H, dv, generator=g, device=device, dtype=dtype)

        def step(f):
            def run():
                for t in (q, kn, kp, v):
                    t.grad = None
                f().backward(do)
            return run

        row = {"T": T, "batch": batch, "heads": H}
        mq, mkk, mv = mk(batch, H, T, d_h), mk(batch, H, T, d_h), mk(batch, H, T, d_h)
        mdo = torch.randn(batch, H, T, d_h, generator=g, device=device, dtype=dtype)

        def mha():
            for t in (mq, mkk, mv):
                t.grad = None
            F.scaled_dot_product_attention(mq, mkk, mv, is_causal=True).backward(mdo)

        times = time_interleaved({
            "dispatched_ms": step(lambda: mla_attention(q, kn, kp, v, scale)),
            "sdpa_math_ms": step(lambda: mla_attention_sdpa(q, kn, kp, v, scale, pad_v=False)),
            "padded_sdpa_ms": step(lambda: mla_attention_sdpa(q, kn, kp, v, scale)),
            "mha_sdpa_ms": mha,
        }, device, repeats)
        row.update(times)
        if T <= naive_max_len:
            # The reference is slow and memory-hungry: fewer runs at long T.
            row["naive_ms"] = time_ms(step(lambda: mla_attention_naive(q, kn, kp, v, scale)), device,
                                      max(1, repeats // 2) if T >= 1024 else repeats)
        else:
            row["naive_ms"] = None
        row["mha_head_dim"] = d_h
        row["fwd_bwd_flops"] = attention_fwd_bwd_flops(batch, T, H, dn + dr, dv)
        row["dispatched_tflop_per_s"] = row["fwd_bwd_flops"] / (row["dispatched_ms"] * 1e-3) / 1e12
        row["speedup_dispatched_vs_math"] = row["sdpa_math_ms"] / row["dispatched_ms"]
        if row["naive_ms"] is not None:
            row["speedup_dispatched_vs_naive"] = row["naive_ms"] / row["dispatched_ms"]
        rows.append(row)
        del q, kn, kp, v, do, mq, mkk, mv, mdo
    return rows


def bench_decode(cfg: MLAConfig, contexts, batch: int, device: torch.device, dtype: torch.dtype,
                 repeats: int) -> list[dict]:
    H, dn, dr, dv, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    d_h = max(cfg.dim // H, 1)
    scale = cfg.softmax_scale
    esz = torch.empty((), dtype=dtype).element_size()
    rows = []
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(0)
        rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
        wkv_b = rnd(H, dn + dv, c) * c ** -0.5
        w_uk, w_uv = wkv_b[:, :dn], wkv_b[:, dn:]
        for S in contexts:
            latent, pe = rnd(batch, S, c), rnd(batch, S, dr)
            q_nope, q_pe = rnd(batch, H, dn), rnd(batch, H, dr)
            new_latent = rnd(batch, c)

            # Naive per-head cache: what MHA-style decoding of MLA keeps, K and V per head.
            k_cache = torch.cat([torch.einsum("bsc,hdc->bshd", latent, w_uk),
                                 pe.unsqueeze(2).expand(batch, S, H, dr)], dim=-1).contiguous()
            v_cache = torch.einsum("bsc,hdc->bshd", latent, w_uv).contiguous()
            q_full = torch.cat([q_nope, q_pe], dim=-1)

            def naive_step():
                # Project the new token's latent to its per-head key/value (as a naive cache must),
                # then attend per head over the expanded cache.
                torch.einsum("bc,hdc->bhd", new_latent, wkv_b)
                scores = torch.einsum("bhd,bshd->bhs", q_full, k_cache) * scale
                return torch.einsum("bhs,bshd->bhd", scores.float().softmax(-1).to(dtype), v_cache)

            def absorbed_step():
                ql = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)  # fold W_UK into the query
                o = mla_decode(ql, q_pe, latent, pe, None, scale=scale)
                return torch.einsum("bhc,hdc->bhd", o, w_uv)  # and W_UV into the output

            # The same per-head cache stored head-major (B, H, S, D), its fastest CPU layout:
            # reported beside the (B, S, H, D) cache for context.
            k_hm, v_hm = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()

            def naive_head_major_step():
                torch.einsum("bc,hdc->bhd", new_latent, wkv_b)
                scores = torch.matmul(q_full.unsqueeze(2), k_hm.mT) * scale
                return torch.matmul(scores.float().softmax(-1).to(dtype), v_hm)

            mk_, mv_ = rnd(batch, H, S, d_h), rnd(batch, H, S, d_h)
            mq = rnd(batch, H, 1, d_h)

            def mha_step():
                return F.scaled_dot_product_attention(mq, mk_, mv_)

            times = time_interleaved({"naive": naive_step, "naive_hm": naive_head_major_step,
                                      "absorbed": absorbed_step, "mha": mha_step}, device, repeats)
            naive_ms, naive_hm_ms, absorbed_ms, mha_ms = (times[k] for k in ("naive", "naive_hm", "absorbed", "mha"))
            naive_bytes = (k_cache.numel() + v_cache.numel()) * esz
            latent_bytes = (latent.numel() + pe.numel()) * esz
            mha_bytes = (mk_.numel() + mv_.numel()) * esz
            rows.append({
                "context": S, "batch": batch, "element_size": esz,
                "naive_cache": {"tokens_per_s": batch / naive_ms * 1e3, "step_ms": naive_ms, "cache_bytes": naive_bytes},
                "naive_cache_head_major": {"tokens_per_s": batch / naive_hm_ms * 1e3, "step_ms": naive_hm_ms,
                                           "cache_bytes": naive_bytes},
                "absorbed_latent": {"tokens_per_s": batch / absorbed_ms * 1e3, "step_ms": absorbed_ms,
                                    "cache_bytes": latent_bytes},
                "mha_equal_width": {"head_dim": d_h, "tokens_per_s": batch / mha_ms * 1e3, "step_ms": mha_ms,
                                    "cache_bytes": mha_bytes},
                # Achieved bandwidth: the cache bytes each step must read, over its time.
                "absorbed_cache_gb_per_s": latent_bytes / (absorbed_ms * 1e-3) / 1e9,
                "naive_cache_gb_per_s": naive_bytes / (naive_ms * 1e-3) / 1e9,
                "speedup_absorbed_vs_naive": naive_ms / absorbed_ms,
                "speedup_absorbed_vs_naive_head_major": naive_hm_ms / absorbed_ms,
                "cache_ratio_absorbed_vs_naive": latent_bytes / naive_bytes,
                "cache_ratio_formula": (c + dr) / (2 * H * max(dn + dr, dv)),
            })
            del latent, pe, k_cache, v_cache, k_hm, v_hm, mk_, mv_
    return rows


def run_benchmarks(preset: str = "base", seq_lens=(256, 1024, 2048), contexts=(1024, 4096, 16384),
                   batch: int = 4, decode_batch: int = 4, repeats: int = 3, naive_max_len: int = 2048,
                   device: str | None = None, dtype: str = "float32") -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    cfg = MLAConfig.preset(preset)
    out = {"machine": machine_info(dev), "preset": preset, "dtype": dtype, "batch": batch, "decode_batch": decode_batch,
           "shapes": {"heads": cfg.n_heads, "qk_nope": cfg.qk_nope_head_dim, "qk_rope": cfg.qk_rope_head_dim,
                      "v": cfg.v_head_dim, "kv_lora_rank": cfg.kv_lora_rank, "dim": cfg.dim},
           "dispatched_backend": "triton" if dev.type == "cuda" else
           "torch (causal block path for T <= 1024, SDPA with v zero-padded above)"}
    out["attention_fwd_bwd"] = bench_attention(cfg, list(seq_lens), batch, dev, dt, repeats, naive_max_len)
    out["decode"] = bench_decode(cfg, list(contexts), decode_batch, dev, dt, repeats)
    att = {r["T"]: r for r in out["attention_fwd_bwd"]}
    dec = {r["context"]: r for r in out["decode"]}
    out["targets"] = {
        "attention_speedup_vs_math_at_1024": att[1024]["speedup_dispatched_vs_math"] if 1024 in att else None,
        "attention_target": 1.6,
        "decode_speedup_at_4096": dec[4096]["speedup_absorbed_vs_naive"] if 4096 in dec else None,
        "decode_target": 3.0,
    }
    return out


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"expected positive integers, got {text!r}")
    return vals


def register(app, bench) -> None:
    import typer
    from rich.console import Console
    from rich.table import Table

    @bench.command("kernels")
    def bench_kernels(
        json_path: str = typer.Option(None, "--json", help="write the figures to this JSON file"),
        preset: str = typer.Option("base", help="model preset whose attention shapes to use"),
        seq_lens: str = typer.Option("256,1024,2048", help="training sequence lengths"),
        contexts: str = typer.Option("1024,4096,16384", help="decode context lengths"),
        batch: int = typer.Option(4, min=1, help="batch for the attention benchmark"),
        decode_batch: int = typer.Option(4, min=1, help="requests per decode step"),
        repeats: int = typer.Option(3, min=1, help="timed runs per figure (the best is kept)"),
        dtype: str = typer.Option("float32", help="float32 or bfloat16"),
        threads: int = typer.Option(0, min=0, help="torch CPU threads (0: torch's default). On a loaded "
                                    "machine 1 thread avoids stalls at OpenMP barriers and measures steadier"),
    ) -> None:
        """MLA attention fwd+bwd (naive / SDPA math / dispatched) and decode (naive cache / latent cache)."""
        if dtype not in ("float32", "bfloat16"):
            raise typer.BadParameter("choose float32 or bfloat16", param_hint="--dtype")
        if threads:
            torch.set_num_threads(threads)
        try:
            lens, ctxs = _ints(seq_lens), _ints(contexts)
            res = run_benchmarks(preset, lens, ctxs, batch, decode_batch, repeats, dtype=dtype)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        con = Console()
        t = Table(title=f"MLA attention fwd+bwd, ms ({res['machine']['device']}, B={batch}, preset {preset})")
        for col in ("T", "naive", "SDPA math", "dispatched", "MHA SDPA", "x vs math"):
            t.add_column(col, justify="right")
        for r in res["attention_fwd_bwd"]:
            t.add_row(str(r["T"]), "-" if r["naive_ms"] is None else f"{r['naive_ms']:.1f}", f"{r['sdpa_math_ms']:.1f}",
                      f"{r['dispatched_ms']:.1f}", f"{r['mha_sdpa_ms']:.1f}", f"{r['speedup_dispatched_vs_math']:.2f}")
        con.print(t)
        t = Table(title=f"decode step, one layer, B={decode_batch}: tokens/s (cache MiB)")
        for col in ("context", "naive per-head cache", "same, head-major", "absorbed latent", "MHA equal width",
                    "x speedup", "cache ratio"):
            t.add_column(col, justify="right")
        for r in res["decode"]:
            f = lambda d: f"{d['tokens_per_s']:.0f} ({d['cache_bytes'] / 2**20:.1f})"  # noqa: E731
            t.add_row(str(r["context"]), f(r["naive_cache"]), f(r["naive_cache_head_major"]), f(r["absorbed_latent"]),
                      f(r["mha_equal_width"]),
                      f"{r['speedup_absorbed_vs_naive']:.2f}", f"{r['cache_ratio_absorbed_vs_naive']:.3f}")
        con.print(t)
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(res, fh, indent=2)
            con.print(f"wrote {json_path}")
