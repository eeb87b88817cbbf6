"""Several shard folders as one split, subsets by key or label, the index's stored frame counts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data_shards import format as fmt
from data_shards.loader import LoaderError, SamplingSpec, build_loader
from data_shards.loader.fixtures import make_sample, make_shard_set
from data_shards.loader.index import list_samples
from data_shards.shardio import write_shard
from data_shards.synth import SynthSpec
from data_shards.verify import verify

SPEC = SamplingSpec(frames=4, stride=2, size=16)
SMALL = dict(codec="vp9", shards=1, per_shard=6, frames=12, size=32)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 6-clip sets with the same classes and distinct keys (as two experiences would be)."""
    a = make_shard_set(tmp_path_factory.mktemp("a"), seed=1, prefix="a/", **SMALL)
    b = make_shard_set(tmp_path_factory.mktemp("b"), seed=2, prefix="b/", **SMALL)
    return a, b


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_refs_carry_stored_frames_size_and_label(vp9_set: Path) -> None:
    refs, _ = list_samples(vp9_set, "train")
    stored = {s.key: s for t in sorted(vp9_set.glob("*.tar")) for s in fmt.iter_tar_samples(t)}
    assert [r.index for r in refs] == list(range(12))
    for r in refs:
        s = stored[r.key]
        assert (r.frames, r.height, r.width, r.label) == (s.meta["frames"], 64, 64, s.label)
    assert sorted(r.frames for r in refs)[0] == 10  # the short clip: its own count, not the set's


def test_several_folders_read_as_one_split(two_sets: tuple[Path, Path]) -> None:
    a, b = two_sets
    both = build_loader([a, b], "train", batch_size=3, spec=SPEC, backend="pyav", num_workers=0)
    assert both.num_samples == 12 and [r.index for r in both.refs] == list(range(12))
    assert [r.shard for r in both.refs[:6]] == [str(a / "train-000000.tar")] * 6
    only_a = _keys(build_loader(a, "train", batch_size=3, spec=SPEC, backend="pyav", num_workers=0))
    only_b = _keys(build_loader(b, "train", batch_size=3, spec=SPEC, backend="pyav", num_workers=0))
    got = _keys(both)
    assert sorted(got) == sorted(only_a + only_b) and len(set(got)) == 12


def test_folders_must_agree_on_classes(two_sets: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_sets
    other = tmp_path / "other"
    shutil.copytree(b, other)
    m = fmt.load_manifest(other)
    m.classes = ["w", "x", "y", "z"]
    m.save(other)
    with pytest.raises(fmt.FormatError, match=r"disagree on classes.*'w'"):
        build_loader([a, other], "train", batch_size=2, spec=SPEC, backend="pyav")


@pytest.mark.parametrize("backend", ["pyav", "dali"])
def test_select_by_keys_and_labels(two_sets: tuple[Path, Path], backend: str) -> None:
    a, b = two_sets
    full = build_loader([a, b], "train", batch_size=2, spec=SPEC, backend="pyav")
    memory = [full.refs[i].key for i in (9, 1, 4)] + [full.refs[7].ref]  # plain keys and shard:key
    replay = build_loader(
        [a, b], "train", batch_size=2, spec=SPEC, backend=backend, keys=memory, num_workers=0, drop_last=False
    )
    assert [r.key for r in replay.refs] == [full.refs[i].key for i in (1, 4, 7, 9)]  # the split's order
    assert sorted(_keys(replay)) == sorted(full.refs[i].key for i in (1, 4, 7, 9))
    labels = {0, 2}
    exp = build_loader(
        [a, b], "train", batch_size=2, spec=SPEC, backend=backend, labels=labels, num_workers=0
    )
    assert exp.refs and all(r.label in labels for r in exp.refs)
    assert len(exp.refs) == sum(r.label in labels for r in full.refs)
    for batch in exp:
        assert set(batch["label"].tolist()) <= labels
    both = build_loader([a, b], "train", batch_size=2, spec=SPEC, backend="synthetic", labels={1})
    assert all(r.label == 1 for r in both.refs)


def test_selection_errors(two_sets: tuple[Path, Path]) -> None:
    a, _ = two_sets
    with pytest.raises(ValueError, match="not in this split"):
        build_loader(a, "train", batch_size=2, spec=SPEC, backend="pyav", keys=["vnope"])
    with pytest.raises(ValueError, match="no sample matches"):
        build_loader(a, "train", batch_size=2, spec=SPEC, backend="pyav", labels=[99])
    with pytest.raises(ValueError, match="several shard folders"):
        key = build_loader(a, "train", batch_size=2, spec=SPEC, backend="pyav").refs[0].key
        build_loader([a, a], "train", batch_size=2, spec=SPEC, backend="pyav", keys=[key])


def test_subset_resume_and_rank_split(two_sets: tuple[Path, Path]) -> None:
    a, b = two_sets

    def make(rank: int = 0, world: int = 1, labels: set[int] | None = None):
        return build_loader(
            [a, b], "train", batch_size=1, spec=SPEC, backend="pyav", labels=labels or {0, 1, 2},
            rank=rank, world_size=world, num_workers=0, seed=4,
        )  # fmt: skip

    ref = [(x["key"], x["video"]) for x in make()]
    first = make()
    it = iter(first)
    next(it), next(it)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    rest = [(x["key"], x["video"]) for x in resumed]
    assert [k for k, _ in rest] == [k for k, _ in ref[2:]]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(rest, ref[2:]))
    with pytest.raises(LoaderError, match=r"num_samples|samples_digest"):
        make(labels={0, 1, 3}).load_state_dict(first.state_dict())
    ranks = [_keys(make(r, 2)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == len(ref) // 2


def test_stream_shorter_than_stored_count_is_skipped(tmp_path: Path) -> None:
    spec = SynthSpec(videos=4, frames=12, size=32, codec="vp9")
    samples = [make_sample(i, spec, tmp_path) for i in range(3)]
    liar = make_sample(3, spec, tmp_path, frames=6, stored_frames=12)
    info = write_shard(tmp_path / "train-000000.tar", [*samples, liar])
    split = fmt.SplitInfo(samples=4, shards=1, bytes=info.bytes)
    fmt.Manifest(classes=list("abcd"), shards=[info], splits={"train": split}).save(tmp_path)
    late = SamplingSpec(frames=4, stride=3, size=16, train=False)  # frames 0..9: past the liar's 6
    loader = build_loader(
        tmp_path, "train", batch_size=2, spec=late, backend="pyav", num_workers=0, max_skip_fraction=0.5
    )
    assert len(_keys(loader)) == 3 and loader.stats["skipped"] == 1
    assert loader.stats["skipped_keys"] == [f"{tmp_path / 'train-000000.tar'}:{liar.key}"]
    problems, _ = verify(tmp_path, decode=True)  # verify --decode catches the lie before training does
    assert f"train-000000.tar: {liar.key}: decodes to 6 frames, metadata says 12" in problems


def test_metadata_without_frames_is_a_format_error(tmp_path: Path) -> None:
    spec = SynthSpec(videos=1, frames=8, size=32, codec="vp9")
    s = make_sample(0, spec, tmp_path)
    old = fmt.Sample(s.key, s.video, s.video_ext, s.label, {"id": "x", "codec": "vp9"})
    info = write_shard(tmp_path / "train-000000.tar", [old])
    split = fmt.SplitInfo(samples=1, shards=1, bytes=info.bytes)
    fmt.Manifest(classes=["a"], shards=[info], splits={"train": split}).save(tmp_path)
    with pytest.raises(fmt.FormatError, match=rf"train-000000.tar: sample {s.key}: .*frames.*rebuild"):
        build_loader(tmp_path, "train", batch_size=1, spec=SPEC, backend="pyav")


def _copy_without_listings(src: Path, dst: Path) -> Path:
    """`src` as a set built before listings existed: no listing files, none named in the manifest."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(f"*{fmt.LISTING_SUFFIX}"))
    manifest = fmt.load_manifest(dst)
    for info in manifest.shards:
        info.listing = ""
    manifest.save(dst)
    return dst


def test_a_shard_is_listed_from_its_listing_and_an_older_set_from_its_members(
    vp9_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from data_shards import storage

    old = _copy_without_listings(vp9_set, tmp_path / "old")
    from_members, _ = list_samples(old, "train")
    with monkeypatch.context() as m:  # two reads a shard (index, listing): no member is read
        m.setattr(storage, "read_ranges", lambda *a, **k: pytest.fail("a member was read to list the split"))
        from_listing, manifest = list_samples(vp9_set, "train")
    assert all(info.listing == fmt.listing_name(info.path) for info in manifest.shards)
    assert [(r.key, r.label, r.frames, r.height, r.width) for r in from_listing] == [
        (r.key, r.label, r.frames, r.height, r.width) for r in from_members
    ]
    assert [r.video_offset for r in from_listing] == [r.video_offset for r in from_members]
    assert verify(old) == verify(vp9_set)  # an older set is as valid as a new one (no listing problem)

    gone = tmp_path / "gone"
    shutil.copytree(vp9_set, gone)
    (gone / fmt.listing_name("train-000001.tar")).unlink()
    with caplog.at_level("WARNING", logger="data_shards.loader"):
        assert [r.key for r in list_samples(gone, "train")[0]] == [r.key for r in from_members]
    assert "train-000001.listing.jsonl: missing" in caplog.text
    assert "train-000001.listing.jsonl: missing listing" in verify(gone)[0]
    (gone / "train-000000.tar").unlink()  # the listing and index are there, the shard is not
    with pytest.raises(fmt.FormatError, match=r"train-000000.tar: listed in the manifest but missing"):
        list_samples(gone, "train")


def test_a_listing_that_disagrees_with_its_tar_is_refused_and_verify_names_it(
    vp9_set: Path, tmp_path: Path
) -> None:
    from data_shards.verify import LISTING_FIX

    bad = tmp_path / "bad"
    shutil.copytree(vp9_set, bad)
    path = bad / fmt.listing_name("train-000000.tar")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # two samples swapped
    with pytest.raises(fmt.FormatError, match=r"train-000000.listing.jsonl: does not list the samples of .*"
                       r"train-000000.tar .*delete it and re-run the build command"):  # fmt: skip
        list_samples(bad, "train")
    mismatch = (
        "train-000000.listing.jsonl: does not match train-000000.tar from sample {} on (" + LISTING_FIX + ")"
    )
    assert mismatch.format(1) in verify(bad)[0]

    row = fmt.parse_listing(lines[2].encode(), "x")[0]
    changed = fmt.listing_line(row[0], row[1], {**row[2], "frames": row[2]["frames"] + 1})
    path.write_text("\n".join([*lines[:2], changed, *lines[3:]]) + "\n")  # a frame count not the tar's
    assert mismatch.format(3) in verify(bad)[0]
    path.write_text("not json\n")
    with pytest.raises(fmt.FormatError, match=r"train-000000.listing.jsonl: line 1 is not a listing entry"):
        list_samples(bad, "train")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(fmt.FormatError, match=r"train-000000.listing.jsonl: not a listing \(not UTF-8"):
        list_samples(bad, "train")
    (bad / "train-000009.listing.jsonl").write_text("")
    assert (
        "train-000009.listing.jsonl: not listed in the manifest (re-running the build lists or removes it)"
        in (verify(bad)[0])
    )


def test_a_listing_keeps_every_character_of_ids_and_class_names(tmp_path: Path) -> None:
    """U+2028 / U+2029 / U+0085 are line breaks to str.splitlines: a listing escapes them, so an id holding
    one still lists (and verifies) like any other."""
    spec = SynthSpec(videos=2, frames=8, size=32, codec="vp9")
    samples = []
    for i, odd in enumerate(["clip\u2028one é", "clip\u2029two\x85"]):
        s = make_sample(i, spec, tmp_path)
        samples.append(
            fmt.Sample(s.key, s.video, s.video_ext, s.label, {**s.meta, "id": odd, "label_name": odd})
        )
    info = write_shard(tmp_path / "train-000000.tar", samples)
    assert (tmp_path / info.listing).read_bytes().isascii()
    split = fmt.SplitInfo(samples=2, shards=1, bytes=info.bytes)
    fmt.Manifest(classes=list("abcd"), shards=[info], splits={"train": split}).save(tmp_path)
    refs, _ = list_samples(tmp_path, "train")
    assert [r.key for r in refs] == [s.key for s in samples]
    assert not [p for p in verify(tmp_path)[0] if "listing" in p]
