"""Forward+backward time of tubelet's MaskedVideoAutoencoder vs transformers' VideoMAEForPreTraining.

Same config, same weights (exported with ``to_hf_model``), same batch and mask, same process; the two
models alternate and the median of ``--iters`` timed steps is reported. Not part of the default test run:

    .venv/bin/python tests/bench/bench_models.py [--preset vit-s --frames 8 --size 112 --batch 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pretrain.models import MAEConfig, MaskedVideoAutoencoder, make_mask
from pretrain.models.hf import to_hf_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="vit-s")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = MAEConfig.from_preset(args.preset, num_frames=args.frames, img_size=args.size)
    cfg.decoder_final_norm_eps = 1e-5  # HF's fixed value, so the two models compute the same function
    ours = MaskedVideoAutoencoder(cfg).train()
    hf = to_hf_model(ours).train()
    g = torch.Generator().manual_seed(0)
    x_BCTHW = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=g)
    x_BTCHW = x_BCTHW.permute(0, 2, 1, 3, 4).contiguous()
    mask = make_mask("tube", args.batch, cfg.encoder.grid_size, args.mask_ratio, g)

    def step_ours() -> float:
        ours.zero_grad(set_to_none=True)
        loss = ours(x_BCTHW, mask).loss
        loss.backward()
        return loss.item()

    def step_hf() -> float:
        hf.zero_grad(set_to_none=True)
        loss = hf(x_BTCHW, bool_masked_pos=mask).loss
        loss.backward()
        return loss.item()

    l_ours, l_hf = step_ours(), step_hf()  # warm-up, and a sanity check that both compute the same loss
    if abs(l_ours - l_hf) > 1e-3:
        raise SystemExit(
            f"bench_models: losses differ (ours {l_ours:.6f}, hf {l_hf:.6f}): not the same model"
        )
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(args.iters):
        for name, fn in (("ours", step_ours), ("hf", step_hf)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ours_ms = statistics.median(times["ours"]) * 1e3
    hf_ms = statistics.median(times["hf"]) * 1e3
    print(
        f"bench_models: ours {ours_ms:.1f} ms, hf {hf_ms:.1f} ms, ratio hf/ours {hf_ms / ours_ms:.2f} (target >1) "
        f"[{args.preset} {args.frames}x{args.size} batch {args.batch} mask {args.mask_ratio}, "
        f"hf attn={hf.config._attn_implementation}, {args.threads} threads, median of {args.iters}]"
    )


if __name__ == "__main__":
    main()
