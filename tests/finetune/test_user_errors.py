"""What a new user hits, each pinned by the command a user runs: a registry lookup that creates no store, registry
versions cached by version and reported by name, one error line (not a traceback) for a split or classes the
shards do not have, folders and patterns as `predict` input, an embeddings index queried only by its own model,
and the learning rate and layer decay chosen per backbone family."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from ft_helpers import PY, TINY, Registry, base_env, ok, run_cli


@pytest.fixture(scope="module")
def no_val_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 train + 4 test clips, no val split."""
    from data_shards import format as fmt
    from data_shards.loader.fixtures import make_sample
    from data_shards.shardio import write_shard
    from data_shards.synth import MOTIONS, SynthSpec

    folder = tmp_path_factory.mktemp("no_val")
    spec = SynthSpec(videos=8, classes=4, frames=16, size=32, codec="h264", seed=3)
    infos = [
        write_shard(folder / fmt.shard_name(split, 0), [make_sample(i, spec, folder) for i in ids])
        for split, ids in (("train", range(4)), ("test", range(4, 8)))
    ]
    splits = {i.split: fmt.SplitInfo(samples=i.samples, shards=1, bytes=i.bytes) for i in infos}
    fmt.Manifest(classes=list(MOTIONS[:4]), shards=infos, splits=splits).save(folder)
    return folder


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    return line


def test_registry_lookup_without_a_store_creates_nothing(tmp_path: Path, raw_videos: list[Path]) -> None:
    env = {k: v for k, v in base_env().items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [PY, "-m", "finetune", "predict", "--model", "models:/tubelet-demo@champion", str(raw_videos[0])]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "MLFLOW_TRACKING_URI" in error_line(r)
    missing = tmp_path / "elsewhere" / "mlflow.db"
    r = subprocess.run(
        [*cmd, "--tracking-uri", f"sqlite:///{missing}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert f"no MLflow store at {missing}" in error_line(r)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # no ./mlflow.db, no folder made


def test_registry_versions_are_downloaded_once_and_reported_by_name(
    registry: Registry, tmp_path: Path, model_cache: Path
) -> None:
    from finetune.registry import resolve_model

    source = f"models:/{registry.name}/1"
    first = resolve_model(source, registry.uri, tmp_path)
    again = resolve_model(f"models:/{registry.name}@champion", registry.uri, tmp_path)
    assert again.model_dir == first.model_dir and first.model_dir.is_relative_to(tmp_path)
    (store,) = (tmp_path / "models").iterdir()
    assert [p.name for p in (store / registry.name).iterdir()] == ["1"]
    assert len(list((store / registry.name / "1").iterdir())) == 1  # one copy, no temporary leftovers
    where = ["--shards", str(registry.shards), "--split", "test", "--backend", "pyav"]
    r = run_cli(
        ["evaluate", "--model", source, *where, "--tracking-uri", registry.uri, "--json", "--no-mlflow"]
    )
    ok(r)
    (line,) = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert line["model"] == source and Path(line["model_dir"]).is_relative_to(model_cache)


def test_the_model_cache_keeps_the_newest_versions_of_each_model(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server following @champion downloads every promoted version: the cache keeps the newest
    TUBELET_MODEL_CACHE_KEEP of each model (it kept them all), and one asked for again comes back."""
    from mlflow import MlflowClient

    from finetune.registry import resolve_model

    path = tmp_path / "mlflow.db"
    shutil.copy(registry.uri.removeprefix("sqlite:///"), path)
    uri, cache = f"sqlite:///{path}", tmp_path / "cache"
    client = MlflowClient(uri, registry_uri=uri)
    second = client.get_model_version(registry.name, "2")
    client.create_model_version(registry.name, second.source, run_id=second.run_id)  # version 3
    monkeypatch.setenv("TUBELET_MODEL_CACHE_KEEP", "2")
    for v in (1, 2, 3):
        resolve_model(f"models:/{registry.name}/{v}", uri, cache)
    (store,) = (cache / "models").iterdir()
    assert sorted(p.name for p in (store / registry.name).iterdir()) == ["2", "3"]
    again = resolve_model(f"models:/{registry.name}/1", uri, cache)  # a rollback further back
    assert (again.model_dir / "config.json").is_file()
    assert sorted(p.name for p in (store / registry.name).iterdir()) == [
        "1",
        "2",
        "3",
    ]  # the one in use stays


def test_a_store_made_again_at_the_same_path_never_gets_the_old_stores_cached_copy(
    registry: Registry, tmp_path: Path
) -> None:
    """`rm -rf demo && bash launch/demo.sh`: the new store's version 1 is another model than the cached one."""
    from mlflow import MlflowClient

    from finetune.registry import resolve_model

    path = tmp_path / "mlflow.db"
    shutil.copy(registry.uri.removeprefix("sqlite:///"), path)
    uri, source = f"sqlite:///{path}", f"models:/{registry.name}/1"
    old = resolve_model(source, uri, tmp_path / "cache")
    client = MlflowClient(uri, registry_uri=uri)
    second = client.get_model_version(registry.name, "2")
    client.delete_registered_model(registry.name)  # the store starts over: its version 1 is the other model
    client.create_registered_model(registry.name)
    client.create_model_version(registry.name, second.source, run_id=second.run_id)
    new = resolve_model(source, uri, tmp_path / "cache")
    assert new.run_id == second.run_id != old.run_id and new.model_dir != old.model_dir
    weights = "model.safetensors"  # the other model's weights, not the first store's version 1
    two = resolve_model(f"models:/{registry.name}/2", registry.uri, tmp_path / "other").model_dir
    assert (new.model_dir / weights).read_bytes() == (two / weights).read_bytes()
    assert (new.model_dir / weights).read_bytes() != (old.model_dir / weights).read_bytes()


def test_a_split_or_classes_the_shards_lack_is_one_error_line(
    tiny_classifier: Path, no_val_shards: Path, shards: Path, tmp_path: Path
) -> None:
    common = ["--model", str(tiny_classifier), "--backend", "pyav"]
    r = run_cli(["evaluate", *common, "--shards", str(no_val_shards), "--split", "val"])
    assert "no shards for split 'val'" in error_line(r) and "'test', 'train'" in error_line(r)
    r = run_cli(["embed", *common, "--shards", str(no_val_shards), "--split", "val"])
    assert "no shards for split 'val'" in error_line(r)
    renamed = tmp_path / "renamed"
    shutil.copytree(shards, renamed)
    manifest = json.loads((renamed / "manifest.json").read_text())
    manifest["classes"] = ["a", "b", "c", "d"]
    (renamed / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli(["evaluate", *common, "--shards", str(renamed), "--split", "test"])
    line = error_line(r)
    assert "trained on classes ['move_right'" in line and "the shards have ['a', 'b', 'c', 'd']" in line
    # more classes than the model's (a continual model on the classes so far): scored, with a note
    manifest["classes"] = [*json.loads((shards / "manifest.json").read_text())["classes"], "zebra"]
    (renamed / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli(["evaluate", *common, "--shards", str(renamed), "--split", "test", "--no-mlflow"])
    ok(r)
    assert "note: the shards' classes ['zebra'] are not the model's: their videos count as wrong" in r.stdout


def test_predict_takes_folders_and_patterns_and_refuses_top_k_below_1(
    tiny_classifier: Path, raw_videos: list[Path]
) -> None:
    folder = raw_videos[0].parent
    r = run_cli(["predict", "--model", str(tiny_classifier), str(folder), "--json"])
    assert r.returncode == 1  # broken.mp4 is reported, the others predicted
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert sorted(Path(x["video"]).name for x in rows) == ["broken.mp4", "good0.mp4", "good1.webm"]
    r = run_cli(["predict", "--model", str(tiny_classifier), f"{folder}/good*", "--json", "--top-k", "2"])
    ok(r)
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [Path(x["video"]).name for x in rows] == ["good0.mp4", "good1.webm"]
    assert all(len(x["top"]) == 2 for x in rows)
    for k in ("0", "-1"):
        r = run_cli(["predict", "--model", str(tiny_classifier), str(raw_videos[0]), "--top-k", k])
        assert r.returncode == 2 and "give an integer >= 1" in r.stderr
    # `predict --json | head -1`: the reader leaves after one line; no BrokenPipeError traceback
    p = subprocess.Popen([PY, "-m", "finetune", "predict", "--model", str(tiny_classifier), str(folder),
                          "--json"], env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline().startswith("{")
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipeError" not in err, err[-2000:]
    r = run_cli(["predict", "--model", str(tiny_classifier), f"{folder}/*.nothing"])
    assert "no file matches this pattern" in error_line(r)


@pytest.mark.slow  # 9 s
def test_an_embeddings_index_is_queried_only_by_the_model_that_built_it(
    tiny_classifier: Path, shards: Path, raw_videos: list[Path], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tiny_classifier, other)
    weights = load_file(str(other / "model.safetensors"))
    save_file(
        {k: v + 0.01 * torch.randn_like(v) for k, v in weights.items()}, str(other / "model.safetensors")
    )
    index = tmp_path / "index.parquet"
    build = ["embed", "--model", str(tiny_classifier), "--shards", str(shards), "--split", "test"]
    ok(run_cli([*build, "--backend", "pyav", "--out", str(index)]))
    query = ["--index", str(index), "--query", str(raw_videos[0])]
    ok(run_cli(["embed", "--model", str(tiny_classifier), *query]))  # its own model: answered
    line = error_line(run_cli(["embed", "--model", str(other), *query]))
    assert f"built by {tiny_classifier}" in line and f"not by {other}" in line


@pytest.mark.parametrize(
    ("over", "lr", "layer_decay"),
    [
        ([], 1e-3, 0.75),
        (["model.backbone=r2plus1d"], 3e-3, 1.0),
        (["model.backbone=cnn_rnn", "optim.lr=5e-4"], 5e-4, 1.0),  # what the user sets wins
        (["model.backbone=r3d", "optim.layer_decay=0.9"], 3e-3, 0.9),
    ],
)
def test_learning_rate_and_layer_decay_follow_the_backbone_family(
    shards: Path, over: list[str], lr: float, layer_decay: float
) -> None:
    from finetune.config import FinetuneConfig
    from pretrain.engine import load_config

    cfg = load_config(FinetuneConfig, TINY, [f"data.shards={shards}", "model.preset=tiny", *over])
    cfg.validate()
    assert (cfg.optim.lr, cfg.optim.layer_decay) == (pytest.approx(lr), pytest.approx(layer_decay))
    family = "vit" if not over else "cnn"
    assert f"the {family} backbones' recipe" in cfg.optim_note


def test_the_chosen_recipe_is_printed_and_saved(tmp_path: Path, shards: Path) -> None:
    from ft_helpers import ft_args

    run = tmp_path / "cnn"
    r = run_cli(ft_args(run, shards, None, "model.backbone=r2plus1d", "train.steps=2"))
    ok(r)
    assert "optim.lr=0.003 optim.layer_decay=1: the cnn backbones' recipe" in r.stdout
    saved = (run / "config.yaml").read_text()
    assert "lr: 0.003" in saved and "layer_decay: 1.0" in saved


@pytest.mark.parametrize("module", ["finetune", "pretrain"])
def test_help_lists_every_command_and_each_one_answers_its_own_help(
    module: str, capsys: pytest.CaptureFixture
) -> None:
    """A new user's first `python -m finetune --help` shows every job, not only training."""
    import importlib

    main = importlib.import_module(f"{module}.cli" if module == "finetune" else "pretrain.__main__").main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    listed = capsys.readouterr().out.split(f"other commands (python -m {module} COMMAND --help):\n")[1]
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    assert (
        names
        and ("export" in names)
        and (module == "pretrain" or {"evaluate", "serve", "update"} <= set(names))
    )
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m {module} {name}"), name
    # a mistyped command is named as one, not answered with "--config is required"
    assert main(["exprot", "a", "b"]) == 2
    assert f"python -m {module}: unknown command 'exprot' (did you mean export?)" in capsys.readouterr().err


def test_fewer_classes_than_the_shards_have_is_a_config_error(shards: Path) -> None:
    """model.num_classes below the shards' classes failed mid-run with an index error from the loss."""
    from finetune.config import FinetuneConfig
    from pretrain.engine import ConfigError, load_config

    cfg = load_config(
        FinetuneConfig, TINY, [f"data.shards={shards}", "model.num_classes=2", "finetune.init=null"]
    )
    with pytest.raises(
        ConfigError, match=r"model\.num_classes=2 is below the 4 classes of .*set it to at least 4"
    ):
        cfg.validate()
    load_config(
        FinetuneConfig, TINY, [f"data.shards={shards}", "model.num_classes=6", "finetune.init=null"]
    ).validate()


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--model", "m", "--shards", "s", "--batch-size", "0"],
        ["evaluate", "--model", "m", "--shards", "s", "--clips", "0"],
        ["predict", "--model", "m", "v.mp4", "--clips", "0"],
        ["embed", "--model", "m", "--shards", "s", "--num-workers", "-1"],
    ],
)
def test_a_count_below_its_range_is_refused_by_name_not_replaced_by_the_default(
    argv: list[str], capsys: pytest.CaptureFixture
) -> None:
    from finetune.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    flag = argv[-2]
    assert f"argument {flag}: {argv[-1]}: give an integer >= " in capsys.readouterr().err


def test_serve_refuses_a_model_that_is_not_a_classifier_before_starting_ray(mae_dir: Path) -> None:
    """A pretrained MAE given to `serve` failed inside a replica ("Deploying application tubelet failed");
    predict and evaluate named it. The driver's source check names it too."""
    from finetune.registry import check_source

    with pytest.raises(
        ValueError, match=r"holds a MaskedVideoAutoencoder, not a classifier: fine-tune it first"
    ):
        check_source(str(mae_dir))


@pytest.mark.parametrize("capture", ["foo://x", "a-file"])
def test_serve_refuses_a_capture_destination_it_cannot_write_before_starting_ray(
    tiny_classifier: Path, tmp_path: Path, capture: str
) -> None:
    """An unusable --capture started the server anyway: every capture then failed, seen only in /metadata."""
    from data_shards.storage import StorageError
    from finetune.serve import ServeConfig, run
    from pretrain.engine import ConfigError

    if capture == "a-file":
        capture = str(tmp_path / "a-file")
        Path(capture).write_text("x")
    with pytest.raises(
        (StorageError, ConfigError), match=r"foo:// locations are not supported|a file, not a folder"
    ):
        run(ServeConfig(model=str(tiny_classifier), capture=capture))


def test_evaluate_out_with_several_models_and_a_missing_embeddings_index_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from finetune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", "a", "--model", "b", "--shards", "s", "--out", "x"])
    assert e.value.code == 2 and "--out takes one model" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["export", "run", str(tmp_path / "m"), "--hf", str(tmp_path / "f")])
    assert e.value.code == 2 and "f: a file; give a folder for the HF model" in capsys.readouterr().err
    from finetune.embed import load

    with pytest.raises(FileNotFoundError, match=r"nope\.parquet: no such embeddings file"):
        load(tmp_path / "nope.parquet")
