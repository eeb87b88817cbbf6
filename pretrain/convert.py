"""Convert checkpoints between tubelet model dirs, HF transformers VideoMAE and original VideoMAE .pth.

python -m pretrain.convert from-hf HF_DIR OUT_DIR
python -m pretrain.convert to-hf MODEL_DIR OUT_HF_DIR
python -m pretrain.convert from-videomae CKPT.pth OUT_DIR [--num-frames 16 --img-size 224 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.models import count_parameters, load_model, save_model
from pretrain.models.hf import from_hf, from_videomae_checkpoint, stored_extra, to_hf
from pretrain.models.io import read_model_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser(
        "from-hf", help="HF save_pretrained dir (VideoMAEForPreTraining/…Classification) → model dir"
    )
    a.add_argument("hf_dir", type=Path)
    a.add_argument("out_dir", type=Path)
    b = sub.add_parser("to-hf", help="tubelet model dir → HF save_pretrained dir")
    b.add_argument("model_dir", type=Path)
    b.add_argument("out_dir", type=Path)
    c = sub.add_parser("from-videomae", help="original VideoMAE / VideoMAE V2 .pth → model dir")
    c.add_argument("ckpt", type=Path)
    c.add_argument("out_dir", type=Path)
    c.add_argument("--num-frames", type=int, default=16, help="frames per clip the model was trained on")
    c.add_argument(
        "--img-size", type=int, default=None, help="input size (default 224, or from a learned pos_embed)"
    )
    c.add_argument(
        "--num-heads", type=int, default=None, help="encoder heads (default: by width, as published)"
    )
    c.add_argument("--decoder-num-heads", type=int, default=None)
    c.add_argument("--no-norm-pix-loss", action="store_true", help="the checkpoint was trained on raw pixels")
    c.add_argument("--class-names", type=Path, default=None, help="text file, one class name per line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "from-hf":
        model = from_hf(args.hf_dir)  # a tubelet export's own config and extra come back (tubelet_extra)
        extra = {**stored_extra(args.hf_dir), "converted_from": f"hf:{args.hf_dir}"}
        out = save_model(model, args.out_dir, extra=extra)
    elif args.command == "to-hf":
        model = load_model(args.model_dir)
        out = to_hf(model, args.out_dir, read_model_config(args.model_dir)[2].get("extra"))
    else:
        names = args.class_names.read_text().splitlines() if args.class_names else None
        model = from_videomae_checkpoint(
            args.ckpt,
            num_frames=args.num_frames,
            img_size=args.img_size,
            num_heads=args.num_heads,
            decoder_num_heads=args.decoder_num_heads,
            norm_pix_loss=not args.no_norm_pix_loss,
            class_names=[n for n in names if n] if names else None,
        )
        out = save_model(model, args.out_dir, extra={"converted_from": f"videomae:{args.ckpt.name}"})
    print(
        f"convert {args.command}: {type(model).__name__} ({count_parameters(model) / 1e6:.2f}M params) → {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
