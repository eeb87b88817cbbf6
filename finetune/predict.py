"""Classify and embed raw videos with a model directory: the one inference path of `predict`, `serve`, `embed`
and the MLflow pyfunc model.

`Predictor` = model directory → decoded views → class probabilities / clip embeddings. Decoding and sampling
are the loader's own functions (`data_shards.loader.pyav.decode_views`: demux → `plan_video` → decode →
`views_from_frames`) with the eval `SamplingSpec` of the model (`finetune.model_dir.sampling_for`: the model's
frames/size, the training stride and mean/std, the test clips × crops recorded at export), so a file is seen
exactly as a test-split clip is. Bytes are decoded from memory: nothing is written to disk.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from data_shards.loader.pyav import DecodeLimits

# HTTP status a server answers for each kind of bad input (the reason is also the JSON error code)
INPUT_ERROR_STATUS = {
    "bad_request": 400,
    "empty": 400,
    "too_large": 413,
    "too_long": 422,
    "not_a_video": 415,
    "no_video_stream": 422,
    "truncated": 422,
    "undecodable": 422,
}


class VideoInputError(ValueError):
    """Input that is not a usable video. `reason`: one word (a key of INPUT_ERROR_STATUS); the message says
    what is wrong in words; `status`: the HTTP status for it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = INPUT_ERROR_STATUS.get(reason, 422)


class Predictor:
    """A fine-tuned classifier directory, ready for raw videos.

    `decode(bytes)` → views [V, C, T, H, W]; `probabilities([views, ...])` / `embeddings([views, ...])` run one
    forward over every view of every video given (what a server's batch is) and average per video; `top(probs,
    k)` is the `pipeline("video-classification")` shape. `clips` / `crops` / `stride` override the exported
    test sampling (fewer views = faster, less accurate)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        clips: int | None = None,
        crops: int | None = None,
        stride: int | None = None,
        device: str = "cpu",
        limits: DecodeLimits | None = None,
    ) -> None:
        from finetune.model_dir import open_model_dir

        self.limits = limits if limits is not None else DecodeLimits()
        self.device = torch.device(device)
        opened = open_model_dir(model_dir, device=self.device, clips=clips, crops=crops, stride=stride)
        self.model_dir, self.model, self.extra, self.head = (
            opened.path,
            opened.model,
            opened.extra,
            opened.head,
        )
        self.spec, self.labels = opened.spec, opened.labels
        self.frames, self.size = opened.geometry

    @property
    def views_per_video(self) -> int:
        return self.spec.views_per_video

    def decode(self, data: bytes) -> torch.Tensor:
        """A video file's bytes → its eval views `views_VCTHW` (float, normalized). Raises `VideoInputError`
        for empty input, non-videos, files without a video stream, truncated or undecodable ones, and files
        over `limits` (frame pixels, duration): refused from the headers, before any frame is decoded."""
        import av

        from data_shards.loader.pyav import VideoDecodeError, decode_views

        if not data:
            raise VideoInputError("empty", "empty input: send the bytes of a video file")
        try:
            return decode_views(data, self.spec, None, strict=True, limits=self.limits)
        except VideoDecodeError as e:
            raise VideoInputError(e.reason, str(e)) from None
        except av.FFmpegError as e:
            raise VideoInputError("undecodable", f"the video does not decode: {e}") from None

    def clip_outputs(self, clips_NCTHW: torch.Tensor, features: bool) -> torch.Tensor:
        """Per clip: softmax probabilities [N, K], or pooled features [N, D] (`features`); float32."""
        with torch.inference_mode():
            x = clips_NCTHW.to(self.device)
            if features:
                return self.model.forward_features(x).float()
            return self.head.clip_scores(self.model(x))

    def _forward(self, videos: Sequence[torch.Tensor], features: bool) -> list[torch.Tensor]:
        """One forward over the views of every video (the batch); per-video means, in order."""
        if not videos:
            return []
        out = self.clip_outputs(torch.cat(list(videos)), features)
        combine = (lambda part: part.mean(0)) if features else self.head.combine_views
        return [combine(part).cpu() for part in out.split([len(v) for v in videos])]

    def probabilities(self, videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Class probabilities per video [K]: softmax per view, averaged over the video's views (as evaluate)."""
        return self._forward(videos, features=False)

    def embeddings(self, videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Clip embedding per video [D]: the classifier's pooled features (before the head), mean over views."""
        return self._forward(videos, features=True)

    def top(self, probs: torch.Tensor, k: int = 5) -> list[dict[str, Any]]:
        """[{"label", "score", "index"}, ...], best first; `k` clipped to [1, number of classes]."""
        return self.head.top(probs, self.labels, k)

    def describe(self) -> dict[str, Any]:
        """Labels, input geometry and sampling, architecture and training facts (a server's /metadata)."""
        s = self.spec
        return {
            "labels": self.labels,
            "num_classes": len(self.labels),
            "architecture": type(self.model).__name__,
            "embedding_dim": int(self.model.feature_dim),
            "input": {
                "layout": "BCTHW",
                "frames": self.frames,
                "size": self.size,
                "stride": s.stride,
                "clips": s.eval_clips,
                "crops": s.eval_crops,
                "views_per_video": s.views_per_video,
                "mean": list(s.mean),
                "std": list(s.std),
            },
            "finetune": self.extra.get("finetune", {}),
            "step": self.extra.get("step"),
            "limits": {"max_pixels": self.limits.max_pixels, "max_decode_seconds": self.limits.max_seconds},
        }


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Files as given; a folder → its videos (by extension, sorted, recursively); a pattern the shell did not
    expand (`'clips/*.mp4'`) → its matches. A folder without videos or a pattern without matches is an error
    naming it (a missing plain file is reported per file by `predict_files`)."""
    import glob

    from data_shards.inputs import VIDEO_SUFFIXES

    out: list[str] = []
    for item in items:
        if Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise FileNotFoundError(
                    f"{item}: a folder without videos ({', '.join(sorted(VIDEO_SUFFIXES))})"
                )
            out += found
        elif glob.has_magic(item) and not Path(item).exists():
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise FileNotFoundError(f"{item}: no file matches this pattern")
            out += found
        else:
            out.append(item)
    return out


def predict_files(
    model_dir: str | Path,
    videos: list[str],
    *,
    top_k: int = 5,
    clips: int | None = None,
    crops: int | None = None,
    stride: int | None = None,
    limits: DecodeLimits | None = None,
) -> Iterator[dict[str, Any]]:
    """One result per file, in order: {"video", "top": [{"label", "score", "index"}...]} or {"video", "error"}."""
    predictor = Predictor(model_dir, clips=clips, crops=crops, stride=stride, limits=limits)
    for video in videos:
        try:
            views = predictor.decode(Path(video).read_bytes())
        except (OSError, VideoInputError) as e:  # unreadable, truncated, not a video: report it and go on
            yield {"video": video, "error": f"{type(e).__name__}: {e}"}
            continue
        (probs,) = predictor.probabilities([views])
        yield {"video": video, "top": predictor.top(probs, top_k)}


def print_predictions(results: Iterator[dict[str, Any]], as_json: bool) -> int:
    """Print each result (JSON lines or text); returns the number of failed files."""
    failed = 0
    for r in results:
        if "error" in r:
            failed += 1
            if as_json:
                print(json.dumps(r), flush=True)
            print(f"error: {r['video']}: {r['error']}", file=sys.stderr, flush=True)
            continue
        if as_json:
            print(json.dumps(r), flush=True)
        else:
            tops = "  ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"])
            print(f"{r['video']}: {tops}", flush=True)
    return failed
