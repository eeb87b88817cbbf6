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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
    "no_audio_stream": 422,
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


@dataclass(frozen=True)
class Heard:
    """The decoded views of an audio-visual model's input: the pictures and the sound of each view (its
    length is the number of views, like a views tensor's)."""

    video: torch.Tensor  # [V, 3, T, S, S]
    audio: torch.Tensor  # [V, n_mels, steps]

    def __len__(self) -> int:
        return len(self.video)


Views = torch.Tensor | Heard  # what `Predictor.decode` returns: views, or views and their sound


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

    @property
    def listens(self) -> bool:
        """An audio-visual model: its input is the views and their sound (`Heard`)."""
        return self.spec.audio is not None

    def decode(self, data: bytes) -> Views:
        """A video file's bytes → its eval views `views_VCTHW` (float, normalized), and their sound for an
        audio-visual model (`Heard`). Raises `VideoInputError` for empty input, non-videos, files without a
        video stream (or, for a model that listens, a sound track), truncated or undecodable ones, and files
        over `limits` (frame pixels, duration): refused from the headers, before any frame is decoded."""
        import av

        from data_shards.loader.pyav import VideoDecodeError, decode_views, decode_views_and_sound

        if not data:
            raise VideoInputError("empty", "empty input: send the bytes of a video file")
        try:
            if self.listens:
                return Heard(*decode_views_and_sound(data, self.spec, strict=True, limits=self.limits))
            return decode_views(data, self.spec, None, strict=True, limits=self.limits)
        except VideoDecodeError as e:
            raise VideoInputError(e.reason, str(e)) from None
        except av.FFmpegError as e:
            raise VideoInputError("undecodable", f"the video does not decode: {e}") from None

    def clip_outputs(
        self, clips_NCTHW: torch.Tensor, features: bool, audio: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per clip: softmax probabilities [N, K], or pooled features [N, D] (`features`); float32. `audio`:
        the clips' sound, for a model that listens."""
        with torch.inference_mode():
            x = clips_NCTHW.to(self.device)
            if features:
                return self.model.forward_features(x).float()
            sound = () if audio is None else (audio.to(self.device),)
            return self.head.clip_scores(self.model(x, *sound))

    def _forward(self, videos: Sequence[Views], features: bool) -> list[torch.Tensor]:
        """One forward over the views of every video (the batch); per-video means, in order."""
        if not videos:
            return []
        heard = [v for v in videos if isinstance(v, Heard)]
        if heard and len(heard) != len(videos):
            raise ValueError("a batch mixes decodes with and without sound")
        if heard:
            video, audio = torch.cat([h.video for h in heard]), torch.cat([h.audio for h in heard])
            out = self.clip_outputs(video, features, audio)
        else:
            out = self.clip_outputs(torch.cat(list(videos)), features)
        combine = (lambda part: part.mean(0)) if features else self.head.combine_views
        return [combine(part).cpu() for part in out.split([len(v) for v in videos])]

    def probabilities(self, videos: Sequence[Views]) -> list[torch.Tensor]:
        """Class probabilities per video [K]: softmax per view, averaged over the video's views (as evaluate)."""
        return self._forward(videos, features=False)

    def embeddings(self, videos: Sequence[Views]) -> list[torch.Tensor]:
        """Clip embedding per video [D]: the classifier's pooled features (before the head), mean over views."""
        self.check_embeds()
        return self._forward(videos, features=True)

    def check_embeds(self) -> None:
        """ValueError for a model whose pooled features are no clip embedding: an audio-visual model's are
        per time step and paired with the sound."""
        if self.listens:
            raise ValueError(
                f"{self.model_dir} is an audio-visual model: its features are per time step and paired with "
                "sound; embed with a video classifier"
            )

    def top(self, probs: torch.Tensor, k: int = 5) -> list[dict[str, Any]]:
        """[{"label", "score", "index"}, ...], best first; `k` clipped to [1, number of classes]."""
        return self.head.top(probs, self.labels, k)

    @property
    def temporal(self) -> bool:
        """A model with labels per time step: a video's answer is its segments (`segments`)."""
        return not self.head.per_video

    @property
    def threshold(self) -> float:
        """Multi-label decision threshold: the one best on val at training (`extra.threshold`), else 0.5."""
        return float(self.extra.get("threshold") or 0.5)

    def answer(self, probs: torch.Tensor, k: int = 5) -> list[dict[str, Any]]:
        """What predict / serve / pyfunc return for a video: its top `k` classes, or (multi-label) every
        label scored at or above the threshold, best first."""
        return self.head.answer(probs, self.labels, k, self.threshold)

    def segments(self, data: bytes, hop: int | None = None) -> dict[str, Any]:
        """A temporal model on a whole video: windows slid over it (`hop` source frames apart, default half
        a window), per-frame scores, and the labelled segments they make, best first:
        {"segments": [{"start", "end", "label", "score"}, ...], "duration", "windows"}."""
        import av

        from data_shards.loader.pyav import VideoDecodeError, decode_windows
        from finetune.temporal import frame_scores, segments_of

        if not data:
            raise VideoInputError("empty", "empty input: send the bytes of a video file")
        try:
            w = decode_windows(data, self.spec, hop, strict=True, limits=self.limits)
        except VideoDecodeError as e:
            raise VideoInputError(e.reason, str(e)) from None
        except av.FFmpegError as e:
            raise VideoInputError("undecodable", f"the video does not decode: {e}") from None
        scores = torch.cat([self.clip_outputs(part, False).cpu() for part in w.views.split(8)])
        per_frame = frame_scores(scores, w.starts, self.spec.frames, self.spec.stride, w.frames)
        token = max(1, round(self.spec.frames / scores.shape[1] * self.spec.stride))
        found = segments_of(per_frame, w.fps, min_frames=token)
        return {
            "segments": [s.to_json(self.labels) for s in found],
            "duration": round(w.frames / w.fps, 3),
            "windows": len(w.starts),
        }

    def describe(self) -> dict[str, Any]:
        """Labels, input geometry and sampling, architecture and training facts (a server's /metadata)."""
        s = self.spec
        return {
            "labels": self.labels,
            "num_classes": len(self.labels),
            "head": self.head.kind,  # single_label: top k; multi_label: labels ≥ threshold; temporal: segments
            **({"threshold": self.threshold} if self.head.thresholded else {}),
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
    summary: tuple[Path, float] | None = None,
) -> Iterator[dict[str, Any]]:
    """One result per file, in order: {"video", "top": [{"label", "score", "index"}...]} (multi-label: and
    "labels", every label at or above the threshold), {"video", "segments": [...], ...} (a temporal model),
    or {"video", "error"}. `summary` = (folder, seconds): a temporal model's summary clip of each video
    (`write_summary`), its path in "summary"."""
    predictor = Predictor(model_dir, clips=clips, crops=crops, stride=stride, limits=limits)
    if summary is not None and not predictor.temporal:
        raise ValueError(f"--summary needs a temporal model; {model_dir} has a {predictor.head.kind} head")
    for video in videos:
        try:
            data = Path(video).read_bytes()
            if predictor.temporal:
                found = predictor.segments(data)
                if summary is not None:
                    out = summary[0] / f"{Path(video).stem}_summary.mp4"
                    found["summary"] = write_summary(data, found["segments"], out, summary[1])
                yield {"video": video, **found}
                continue
            views = predictor.decode(data)
        except (OSError, VideoInputError) as e:  # unreadable, truncated, not a video: report it and go on
            yield {"video": video, "error": f"{type(e).__name__}: {e}"}
            continue
        (probs,) = predictor.probabilities([views])
        out = {"video": video, "top": predictor.top(probs, top_k), **predictor.head.verdict(probs)}
        if predictor.head.thresholded:
            out["labels"] = predictor.answer(probs)
        yield out


def write_summary(data: bytes, segments: list[dict[str, Any]], out: Path, seconds: float) -> str | None:
    """A video summary: the best-scoring segments (best first in `segments`), `seconds` in all at most (the
    last one shortened to fit), cut from the video and joined in time order into one H.264 clip at `out`.
    None (nothing written) when the model found no segment."""
    from data_shards.codec import VideoWriter
    from data_shards.loader.pyav import decode_frames, frames_and_rate

    chosen, left = [], seconds
    for s in segments:
        if left <= 0:
            break
        chosen.append((s["start"], min(s["end"], s["start"] + left)))
        left -= chosen[-1][1] - chosen[-1][0]
    if not chosen:
        return None
    n, fps = frames_and_rate(data)
    index = [
        i for a, b in sorted(chosen) for i in range(int(a * fps), min(n, max(int(b * fps), int(a * fps) + 1)))
    ]
    frames = decode_frames(data, np.array(index, dtype=np.int64))
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    out.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(out, "h264", fps, w, h) as writer:
        for rgb in frames:
            writer.write_rgb(np.ascontiguousarray(rgb[:h, :w]))
    return str(out)


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
        elif "segments" in r:
            segs = "  ".join(
                f"{s['start']:.2f}-{s['end']:.2f}s {s['label']} {s['score']:.3f}" for s in r["segments"]
            )
            print(f"{r['video']} ({r['duration']:.2f}s): {segs or 'no action'}", flush=True)
            if r.get("summary"):
                print(f"  summary: {r['summary']}", flush=True)
        else:
            shown = r.get("labels", r["top"])
            tops = "  ".join(f"{t['label']} {t['score']:.3f}" for t in shown)
            said = (
                f"offset {r['offset']:+.2f}s ({'in sync' if r['in_sync'] else 'out of sync'})  "
                if "offset" in r
                else ""
            )
            print(f"{r['video']}: {said}{tops or 'no label above the threshold'}", flush=True)
    return failed
