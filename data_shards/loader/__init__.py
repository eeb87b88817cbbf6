"""Video batches from shards: one contract, three backends (DALI, PyAV, synthetic), resumable, rank-aware.

    loader = build_loader("shards/", "train", batch_size=8, spec=SamplingSpec(frames=16, stride=4))
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:            # {"video": float32 [B, 3, T, S, S], "label": int64 [B], "key": [str],
            ...                         #  "index", "epoch", "view": int64 [B], "labels": int64 [B, L]}
            ...
        ckpt["loader"] = loader.state_dict()   # load_state_dict(...) on resume continues mid-epoch

Batches: B counts *clips*. A decoded video yields V clips, consecutive in the batch: K =
`clips_per_video` independently augmented views of one temporal window in train (VideoMAE V2 repeated
augmentation), N x M (`eval_clips` x `eval_crops`) views in eval, with "view" (int64 [B]: the train view
0..K-1, the eval index clip * M + crop) so evaluation can average per video. "index" (int64 [B], the global
sample index) and "epoch" (int64 [B]) let a task key its own per-sample draws (masks, mixup) by
(seed, epoch, index, view) like the loader's. A batch holds batch_size // V whole videos.

Order: a permutation of the whole split per (seed, epoch) (train; eval keeps shard order), identical on
every rank, then cut into batches of consecutive samples dealt to the ranks in turn (rank r takes batches
r, r + world, ...): a micro-batch holds the same samples on 2 ranks as in one of 2 accumulation steps on 1
rank. Remainder: `drop_last` (default: True for train) gives each rank the same number of full batches --
the dropped tail changes with the shuffle every epoch; drop_last=False pads the order with its first samples
so all ranks get ceil(N / world), marked in "pad" (bool [B]) for evaluation to ignore, and keeps a partial
last batch (the last round of batches is cut into `world` equal parts).

Resume: `state_dict()` = {version, backend, epoch, position, seed, num_samples, drop_last, shuffle,
samples_digest, skipped, world_size, videos_per_batch}. `position` is global: the samples of the epoch's
order all ranks together have taken (a prefix of the order, since the ranks take batches in turn), so
a state taken at a training step boundary continues the epoch on *any* number of ranks and batch size: the
rest of the order is re-split over the new ranks, no sample repeated or left out. Everything random is a
pure function of (seed, epoch, sample index), so on the same ranks and batch size the next iteration after
`load_state_dict` yields exactly the batches (keys, frames, crops) the interrupted run had not consumed yet;
on others, the same samples with the same frames and crops, in the same global order, batched differently.

Several shard folders (`shards=[a, b]`, manifests agreeing on classes) read as one split, concatenated in
the order given; `keys=` / `labels=` select a subset (in the split's stable order), so a replay memory of
sample references or one class-incremental experience is a plain loader with the same order, rank split
and resume. Labels: "label" is a sample's class (a multi-label sample's first, a segments sample's dominant
one); "labels" its label set (-1 padded); a segments set adds "frame_label" (int64 [B, T]: the class at
each sampled frame's time, 0 = background), computed from the same frame plan as the pixels. `loader.refs` lists the samples (`SampleRef`: shard, key, label, stored frames and size).

Failures: an undecodable video is left out of its batch (the batch is smaller, never refilled with
another sample), logged with its shard and key, counted in `stats["skipped"]`; a LoaderError is raised
once skipped > max_skip_fraction x max(samples seen, samples per epoch). DALI graph failures are fatal
and name the shard and key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from typing import Any

import torch

from data_shards import format as fmt
from data_shards import storage
from data_shards.loader.base import LoaderError, VideoLoader
from data_shards.loader.cache import SampleCache
from data_shards.loader.index import SampleRef, as_folders, list_split, select_samples
from data_shards.loader.sampling import SamplingSpec

__all__ = [
    "BACKENDS",
    "LoaderError",
    "SampleRef",
    "SamplingSpec",
    "VideoLoader",
    "build_loader",
    "choose_backend",
]

Shards = str | os.PathLike | Sequence[str | os.PathLike]

log = logging.getLogger("data_shards.loader")

BACKENDS = ("auto", "dali", "pyav", "synthetic")
SYNTHETIC_DEFAULT_SAMPLES = 1024


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def choose_backend(codecs: set[str], device: str | torch.device = "cpu") -> tuple[str, str, str]:
    """(backend, dali_device, why) for `auto`: DALI-mixed on a GPU, DALI-CPU when every codec is one
    DALI decodes on CPU, else PyAV."""
    from data_shards.loader.dali import dali_available

    device = torch.device(device)
    if not dali_available():
        return "pyav", "", "nvidia-dali is not importable"
    if _cuda(device):
        unsupported = codecs - fmt.DALI_GPU_CODECS
        if not unsupported:
            return "dali", "mixed", f"CUDA device {device} and codecs {sorted(codecs)} are NVDEC-decodable"
        return "pyav", "", f"codecs {sorted(unsupported)} are not NVDEC-decodable"
    if codecs and codecs <= fmt.DALI_CPU_CODECS:
        return "dali", "cpu", f"no GPU; codecs {sorted(codecs)} are all DALI-CPU decodable"
    other = sorted(codecs - fmt.DALI_CPU_CODECS) or ["unknown"]
    return (
        "pyav",
        "",
        f"no GPU and codecs {other} need NVDEC: DALI-CPU decodes only {sorted(fmt.DALI_CPU_CODECS)}",
    )


def _synthetic_refs(shards: Shards, split: str, options: dict[str, Any]) -> list[SampleRef]:
    """Synthetic samples: as many as the split has when there are manifests, else `num_samples`."""
    from data_shards.loader.synthetic import synthetic_refs

    n, classes = options.get("num_samples"), options.get("num_classes")
    manifests = [
        fmt.load_manifest(f) for f in as_folders(shards) if storage.isfile(storage.join(f, fmt.MANIFEST_NAME))
    ]
    if manifests:
        n = n or sum(m.splits[split].samples for m in manifests if split in m.splits) or None
        classes = classes or manifests[0].num_classes
    return synthetic_refs(int(n or SYNTHETIC_DEFAULT_SAMPLES), int(classes or 10))


def _auto_backend(codecs: set[str], device: torch.device, shards: Shards, split: str) -> tuple[str, str, str]:
    backend, dali_device, why = choose_backend(codecs, device)
    log.info(
        "auto chose %s%s for %s/%s: %s",  # the logger's name is the formatter's to add
        backend,
        f"-{dali_device}" if backend == "dali" else "",
        shards if isinstance(shards, (str, os.PathLike)) else [os.fspath(s) for s in shards],
        split,
        why,
    )
    return backend, dali_device, why


def _warn_dali_cpu(codecs: set[str], shards: Shards, split: str) -> None:
    if not codecs <= fmt.DALI_CPU_CODECS:
        log.warning(
            "DALI-CPU decodes only %s; %s/%s has %s (decoding will fail)",
            sorted(fmt.DALI_CPU_CODECS),
            shards,
            split,
            sorted(codecs),
        )


def _check_sound(modes: dict[str, str]) -> None:
    """A loader that returns sound needs shard folders built with it."""
    silent = sorted(f for f, mode in modes.items() if mode == "drop")
    if silent:
        raise fmt.FormatError(
            f"{', '.join(silent)}: built without sound, and this run needs it (audio); rebuild with "
            "`python -m data_shards build ... --audio keep`"
        )


def build_loader(
    shards: Shards,
    split: str,
    *,
    batch_size: int,
    spec: SamplingSpec,
    backend: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_workers: int = 2,
    drop_last: bool | None = None,
    max_skip_fraction: float = 0.01,
    epoch: int = 0,
    keys: Collection[str] | None = None,
    labels: Collection[int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_bytes: int = 0,
    batches_per_step: int = 1,
    **backend_options: Any,
) -> VideoLoader:
    """A loader over `split` of one shard folder or several (see the module docstring for the contract).

    keys/labels: only those samples (keys as `key`, or `shard:key` when a key is in several folders).
    cache_dir / cache_bytes: a local cache, bounded in bytes, of samples read from shards at URLs.
    batches_per_step: a step's accumulation steps; drop_last keeps whole steps (`epoch_plan`).
    backend_options: `dali_device` ("cpu"/"mixed", forces it), `num_threads` (DALI), `num_classes` and
    `num_samples` (synthetic, when there is no manifest).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    common: dict[str, Any] = dict(
        split=split,
        batch_size=batch_size,
        spec=spec,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
        drop_last=drop_last,
        max_skip_fraction=max_skip_fraction,
        epoch=epoch,
        cache=SampleCache(cache_dir, cache_bytes) if cache_dir else None,
        batches_per_step=batches_per_step,
    )
    selected = keys is not None or labels is not None
    if backend == "synthetic":
        from data_shards.loader.synthetic import SyntheticLoader

        refs = _synthetic_refs(shards, split, backend_options)
        refs = select_samples(refs, keys, labels) if selected else refs
        return SyntheticLoader(refs, reason="requested", **common)

    listing = list_split(shards, split, common["cache"])
    refs = select_samples(listing.refs, keys, labels) if selected else listing.refs
    common["label_kind"], codecs = listing.kind, listing.codecs
    if spec.audio is not None:
        _check_sound(listing.audio)
    dali_device = backend_options.pop("dali_device", None)
    why = "requested"
    if backend == "auto":
        backend, auto_device, why = _auto_backend(codecs, device, shards, split)
        dali_device = dali_device or auto_device
    if backend == "dali":
        from data_shards.loader.dali import DaliLoader

        dali_device = dali_device or ("mixed" if _cuda(device) else "cpu")
        if dali_device == "cpu":
            _warn_dali_cpu(codecs, shards, split)
        num_threads = int(backend_options.get("num_threads", 2))
        return DaliLoader(refs, dali_device=dali_device, num_threads=num_threads, reason=why, **common)
    from data_shards.loader.pyav import PyAVLoader

    return PyAVLoader(refs, num_workers=num_workers, reason=why, **common)
