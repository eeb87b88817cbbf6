"""Config loading, validation and DeepSpeed JSON generation: no process group is ever started here."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as td
from engine_helpers import PY, REPO, TINY, base_env

from pretrain.config import PretrainConfig
from pretrain.engine.config import (
    ConfigError,
    EngineConfig,
    deepspeed_config,
    load_config,
    parse_overrides,
    peak_lr,
    resume_key,
    resume_signature,
    signature_diff,
)


@dataclass
class PeftSection:
    method: str = resume_key("lora")
    rank: int = resume_key(8)
    targets: list[str] = field(default_factory=lambda: ["qkv"])


@dataclass
class FinetuneConfig(EngineConfig):
    peft: PeftSection = field(default_factory=PeftSection)


CONFIGS = sorted((REPO / "pretrain" / "configs").glob("*.yaml"))


def load(*overrides: str, world: int = 1) -> PretrainConfig:
    # the tests' own geometry (the demo config's batch and length may change)
    pinned = [
        "train.steps=200",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "optim.warmup_steps=20",
    ]
    cfg = load_config(PretrainConfig, TINY, ["data.backend=synthetic", *pinned, *overrides])
    cfg.validate(world)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_validate(path) -> None:
    cfg = load_config(PretrainConfig, path, ["data.shards=/data/shards"])
    cfg.validate(1 if path.stem == "tiny_cpu" else 8)


def test_overrides_parse_like_yaml() -> None:
    assert parse_overrides(["optim.lr=1e-3", "a.b=true", "c=[1,2]", "d=null", "e=abc"]) == {
        "optim": {"lr": 1e-3},
        "a": {"b": True},
        "c": [1, 2],
        "d": None,
        "e": "abc",
    }
    cfg = load("optim.lr=1e-3", "optim.betas=[0.8,0.9]", "deepspeed.bf16=true", "train.steps=70")
    assert (
        cfg.optim.lr == 1e-3
        and cfg.optim.betas == (0.8, 0.9)
        and cfg.deepspeed.bf16
        and cfg.train.steps == 70
    )


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown key train\.stepz \(did you mean train\.steps\?\)"):
        load("train.stepz=3")
    with pytest.raises(ConfigError, match=r"unknown key optimm \(did you mean optim\?\)"):
        load("optimm.lr=1")
    with pytest.raises(ConfigError, match=r"unknown key model\.encoder\.depht"):
        load("model.encoder.depht=3")


def test_a_number_given_for_a_name_is_the_name() -> None:
    """YAML reads `18` as an int; a string field (a preset name) takes it as "18", and in `str | int` an
    int stays an int."""
    cfg = load("model.activation_checkpointing=2", "tracking.experiment=123")
    assert (cfg.model.activation_checkpointing, cfg.tracking.experiment) == (2, "123")
    assert load("model.activation_checkpointing=all").model.activation_checkpointing == "all"
    with pytest.raises(ConfigError, match=r"model\.preset: unknown preset '18'"):  # a name, not a type error
        load("model.preset=18")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=abc", r"train\.steps: 'abc' is not int or None"),
        ("deepspeed.zero_stage=two", r"deepspeed\.zero_stage: expected an integer"),
        ("deepspeed.bf16=3", r"deepspeed\.bf16: expected true or false"),
        ("optim.betas=[0.9]", r"optim\.betas: expected 2 values"),
        ("data.backend=pyv", r"data\.backend: 'pyv' is not one of .* \(did you mean 'pyav'\?\)"),
        ("train=3", r"train: expected a section"),
    ],
)
def test_wrong_types_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(override)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["deepspeed.bf16=true", "deepspeed.fp16=true"], 1, r"bf16 and deepspeed\.fp16 are both true"),
        (["deepspeed.fp16=true", "train.device=cpu"], 1, r"deepspeed\.fp16=true needs a GPU"),
        (["deepspeed.offload_optimizer=cpu", "deepspeed.zero_stage=0"], 1, r"offload_optimizer needs"),
        (["train.global_batch_size=12", "train.micro_batch_size=4"], 2, r"not divisible .* multiple of 8"),
        (["train.epochs=3"], 1, r"exactly one of train\.steps and train\.epochs"),
        (["optim.warmup_steps=500"], 1, r"optim\.warmup_steps=500 >= train\.steps=200"),
        (["deepspeed.zero_stage=5"], 1, r"zero_stage must be 0, 1, 2 or 3"),
        (["train.global_batch_size=0"], 1, r"train\.global_batch_size must be >= 1, got 0"),
        (["optim.warmup_steps=-5"], 1, r"optim\.warmup_steps and optim\.warmup_epochs must be >= 0"),
        (
            ["tracking.register_as=clf", "tracking.enabled=false"],
            1,
            r"tracking\.register_as='clf' needs tracking\.enabled=true and tracking\.log_model=true",
        ),
        (["data.backend=auto"], 1, r"data\.shards is not set"),
        (["model.preset=vit-z"], 1, r"model\.preset: unknown preset 'vit-z'"),
        (["model.img_size=30"], 1, r"model: img_size=30 must be a multiple of patch_size=8"),
        (
            ["train.micro_batch_size=3", "train.global_batch_size=6", "clip.clips_per_video=2"],
            1,
            r"multiple of clip\.clips_per_video",
        ),
    ],
)
def test_impossible_combinations(overrides: list[str], world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(*overrides, world=world)
    assert not td.is_initialized()


def test_cli_config_error_exits_before_any_process_group(tmp_path) -> None:
    r = subprocess.run(
        [PY, "-m", "pretrain", "--config", str(TINY), f"train.run_dir={tmp_path}/r", "train.stepz=3"],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 2
    assert "unknown key train.stepz (did you mean train.steps?)" in r.stderr
    assert not (tmp_path / "r").exists()  # nothing built, nothing written


def test_a_folder_tracking_store_is_a_config_error_not_an_untracked_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3 refuses a folder store (`./mlruns`): the run used to warn once and go on untracked."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("mlruns", "/tmp/x/mlruns", "file:///tmp/x/mlruns"):
        with pytest.raises(ConfigError, match=rf"tracking\.uri={uri}: a folder store.*sqlite:///.*mlflow\.db"):
            load(f"tracking.uri={uri}")
    for uri in ("sqlite:///tmp/x.db", "http://127.0.0.1:5000", "databricks"):
        load(f"tracking.uri={uri}")
    load("tracking.uri=mlruns", "tracking.enabled=false")  # not used: fine
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI=\./mlruns: a folder store"):
        load()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out keeps it
    load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_asked_for_on_a_machine_without_it_is_a_config_error() -> None:
    from pretrain.engine.dist import prepare_env

    with pytest.raises(ConfigError, match=r"train\.device=cuda, but torch .* sees no CUDA device here"):
        prepare_env("cuda")


@pytest.mark.parametrize("module", ["pretrain", "finetune"])
def test_a_folder_that_is_not_a_shard_set_is_one_data_error_line(tmp_path, module: str) -> None:
    config = REPO / module / "configs" / "tiny_cpu.yaml"
    r = subprocess.run(
        [PY, "-m", module, "--config", str(config), f"train.run_dir={tmp_path}/r", f"data.shards={tmp_path}",
         "tracking.enabled=false"],
        env=base_env(), capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"data error: {tmp_path}/manifest.json: no manifest ({tmp_path} is not a shard folder" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  steps: [1, 2\n", r"x\.yaml: not valid YAML at line 3, column 1: expected ',' or ']'"),
        ("train:\n  steps: 3\nmodel:\n  preset: tiny\ntrain:\n  steps: 2\n",
         r"x\.yaml: key 'train' is given twice in one mapping \(lines 1 and 5\)"),
        ("\n  \n", r"--config .*x\.yaml: the file is empty"),
        (b"\xff\xfe train: 1", r"--config .*x\.yaml: not UTF-8 text"),
    ],
)  # fmt: skip
def test_a_malformed_config_file_is_one_config_error_naming_it(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, path)


def test_an_override_that_is_not_yaml_names_the_override() -> None:
    with pytest.raises(ConfigError, match=r"override 'train\.steps=\[1,': not valid YAML"):
        parse_overrides(["train.steps=[1,"])


def test_loader_works_on_any_dataclass_tree() -> None:
    """A later stage adds its own sections to the engine's (what finetune does)."""

    cfg = load_config(
        FinetuneConfig,
        None,
        ["peft.rank=4", "peft.targets=[qkv,proj]", "train.steps=3"],
    )
    cfg.validate(1)
    assert cfg.peft.rank == 4 and cfg.peft.targets == ["qkv", "proj"]
    with pytest.raises(ConfigError, match=r"unknown key peft\.rnak \(did you mean peft\.rank\?\)"):
        load_config(FinetuneConfig, None, ["peft.rnak=4"])
    sig = resume_signature(cfg)
    assert sig["peft.rank"] == 4 and "peft.targets" not in sig


def test_resume_signature_covers_shape_keys_only() -> None:
    a, b = load(), load("train.steps=500", "train.log_every=7", "optim.lr=5e-3", "checkpoint.every=3")
    assert signature_diff(resume_signature(a), resume_signature(b)) == []
    c = load("model.decoder_depth=2", "train.global_batch_size=16", "deepspeed.zero_stage=3")
    diff = signature_diff(resume_signature(a), resume_signature(c))
    assert any(d.startswith("model.decoder_depth") for d in diff)
    assert any(d.startswith("train.global_batch_size") for d in diff)
    # what is re-partitioned on resume is not part of the signature (and older checkpoints that had it pass)
    d = load("deepspeed.zero_stage=3", "train.micro_batch_size=2")
    assert signature_diff(resume_signature(a), resume_signature(d)) == []
    older = {**resume_signature(a), "deepspeed.zero_stage": 1, "train.micro_batch_size": 1}
    assert signature_diff(older, resume_signature(a)) == []


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_json_is_generated(stage: int) -> None:
    cfg = load(
        f"deepspeed.zero_stage={stage}",
        "deepspeed.bf16=true",
        "optim.grad_clip=0.5",
        "train.global_batch_size=16",
    )
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert "optimizer" not in ds and "scheduler" not in ds  # built by the engine, passed in
    assert ("stage3_prefetch_bucket_size" in ds["zero_optimization"]) == (stage == 3)


def test_linear_lr_scaling_rule() -> None:
    cfg = load_config(PretrainConfig, REPO / "pretrain/configs/vitb_videomae.yaml", ["data.shards=/x"])
    assert peak_lr(cfg) == pytest.approx(1.5e-4 * 1024 / 256)
    assert peak_lr(load("optim.lr=0.01")) == 0.01


def _marker(tmp_path: Path, signature: dict, world: int, stage: int, micro: int) -> Path:
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    marker = {"signature": signature, "world_size": world, "zero_stage": stage, "micro_batch_size": micro}
    (ckpt / "complete").write_text(json.dumps({**marker, "step": 4, "epoch": 0, "samples": 32}))
    return ckpt


@pytest.mark.parametrize(
    ("now", "universal", "same_ranks", "bit_exact", "says"),
    [
        ((2, 2, 4), False, True, True, "bit-exact continuation"),
        ((1, 2, 8), True, False, False, "per-rank random streams restart"),
        ((2, 3, 4), True, True, False, "universal checkpoint"),
        ((2, 2, 2), False, True, False, "as saved"),
    ],
)
def test_resume_plan_says_what_a_layout_change_keeps(
    tmp_path: Path, now: tuple, universal: bool, same_ranks: bool, bit_exact: bool, says: str
) -> None:
    from pretrain.engine.checkpoint import plan_resume

    sig = resume_signature(load())
    world, stage, micro = now
    plan = plan_resume(
        _marker(tmp_path, sig, 2, 2, 4), sig, world_size=world, zero_stage=stage, micro_batch_size=micro
    )
    assert (plan.universal, plan.same_ranks, plan.bit_exact) == (universal, same_ranks, bit_exact)
    assert says in plan.describe() and ("sample-exact" in plan.describe()) == (not bit_exact)


def test_resume_plan_refuses_stage_0_changes_and_signature_changes(tmp_path: Path) -> None:
    from pretrain.engine.checkpoint import plan_resume

    sig = resume_signature(load())
    ckpt = _marker(tmp_path, sig, 2, 0, 4)
    assert not plan_resume(ckpt, sig, world_size=1, zero_stage=0, micro_batch_size=8).universal  # 0 → 0
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage=0, this run has 2"):
        plan_resume(ckpt, sig, world_size=2, zero_stage=2, micro_batch_size=4)
    other = resume_signature(load("train.global_batch_size=16"))
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: checkpoint 8 vs now 16"):
        plan_resume(ckpt, other, world_size=2, zero_stage=0, micro_batch_size=4)


def test_model_compile_compiles_each_block_the_task_builds() -> None:
    from pretrain.task import MaskedVideoTask

    model = MaskedVideoTask(load("model.compile=true")).build_model()
    blocks = [*model.encoder.blocks, *model.decoder.blocks]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)  # compiled on first call
    assert model._compiled_call_impl is None  # the step's gathers and mask ids stay eager
    plain = MaskedVideoTask(load()).build_model()
    assert all(b._compiled_call_impl is None for b in plain.encoder.blocks)
