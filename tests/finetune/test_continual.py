"""Continual learning end to end through `python -m finetune continual` on real DeepSpeed (gloo), real shards
and a real MLflow store: class-incremental replay (matrix, head growth, memory of references, nested runs),
resume in the middle of an experience (bit-identical), a 2-rank ZeRO-2 replay through the deepspeed launcher,
EWC's penalty under ZeRO-3 equal to ZeRO-2, and task-incremental PEFT experiences that cannot forget."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from ft_helpers import PY, REPO, base_env, free_port, ok, run_cli, run_ranks

CONFIG = REPO / "finetune" / "configs" / "tiny_cpu_continual.yaml"


def balanced_shards(folder: Path, domain: int = 0) -> Path:
    """4 classes × (4 train + 2 test) H.264 clips, 32 px, 16 frames, of one synthetic domain: balanced, so
    every experience has data; ids carry the domain so two sets have distinct keys."""
    from data_shards import format as fmt
    from data_shards.loader.fixtures import make_sample
    from data_shards.shardio import write_shard
    from data_shards.synth import MOTIONS, SynthSpec, render_clip

    folder.mkdir(parents=True, exist_ok=True)
    spec = SynthSpec(videos=200, classes=4, frames=16, size=32, codec="h264", seed=11, domain=domain)
    want = {"train": 4, "test": 2}
    picked: dict[str, list[int]] = {"train": [], "test": []}
    counts = {(s, c): 0 for s in want for c in range(4)}
    for i in range(spec.videos):
        label = MOTIONS.index(render_clip(i, spec)[1])
        split = next((s for s in want if counts[(s, label)] < want[s]), None)
        if split is not None:
            counts[(split, label)] += 1
            picked[split].append(i)
        if all(v == want[s] for (s, _), v in counts.items()):
            break
    infos, splits = [], {}
    for split, idx in picked.items():
        samples = [make_sample(i, spec, folder, prefix=f"d{domain}/") for i in idx]
        info = write_shard(folder / fmt.shard_name(split, 0), samples)
        infos.append(info)
        per_class = {MOTIONS[c]: want[split] for c in range(4)}
        splits[split] = fmt.SplitInfo(samples=info.samples, shards=1, bytes=info.bytes, per_class=per_class)
    fmt.Manifest(classes=list(MOTIONS[:4]), shards=infos, splits=splits).save(folder)
    return folder


@pytest.fixture(scope="module")
def cl_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return balanced_shards(tmp_path_factory.mktemp("cl_shards"))


def cl_args(run_dir: Path, shards: Path, strategy: str, *extra: str) -> list[str]:
    return [
        "continual",
        "--config",
        str(CONFIG),
        f"train.run_dir={run_dir}",
        f"data.shards={shards}",
        "data.backend=pyav",
        "data.num_workers=0",
        f"continual.strategy={strategy}",
        "continual.experiences=[[0,1],[2,3]]",
        "continual.classes_per_experience=null",
        "continual.memory_size=4",
        "continual.replay_batch_size=2",
        "continual.importance_samples=4",
        "train.steps=4",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "optim.warmup_steps=1",
        "eval.test_clips=1",
        *extra,
    ]


def result(run_dir: Path) -> dict:
    return json.loads((run_dir / "continual.json").read_text())


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_class_incremental_replay_end_to_end(tmp_path: Path, cl_shards: Path) -> None:
    run = tmp_path / "replay"
    (tmp_path / "store").mkdir()
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # the store the user set, by the environment
    r = run_cli(cl_args(run, cl_shards, "replay"), timeout=400, env={"MLFLOW_TRACKING_URI": store})
    ok(r)
    assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to the default store beside the run
    out = result(run)
    matrix = out["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[0][1] is None and all(v is not None for v in matrix[1])
    assert out["strategy"] == "replay" and out["memory_size"] == 4 and out["scenario"] == "class-incremental"
    assert sum(out["memory_per_class"].values()) == 4 and set(out["memory_per_class"]) <= {"0", "1", "2", "3"}
    assert out["forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])
    assert out["bwt"] == pytest.approx(-out["forgetting"])
    assert out["accuracy_before_training"][1] == 0.0  # class-incremental: no head for classes not seen yet
    assert (run / "accuracy_matrix.png").stat().st_size > 2000
    heads = [
        json.loads((run / f"experience_{k}" / "model" / "config.json").read_text())["class_names"]
        for k in (0, 1)
    ]
    assert heads[0] == ["move_right", "move_left"] and heads[1] == [
        "move_right",
        "move_left",
        "move_down",
        "move_up",
    ]
    state = json.loads((run / "continual_state.json").read_text())
    assert all(set(it) == {"shards", "ref", "label"} for it in state["memory"]["items"])  # references only
    rows = [json.loads(x) for x in (run / "experience_1" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/acc" in x for x in rows)
    assert "after 1" in r.stdout and "average accuracy" in r.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("tubelet-continual")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parent = next(x for x in runs if "mlflow.parentRunId" not in x.data.tags)
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert len(runs) == 3  # the parent and one run per experience, each once, all in the user's store
    assert parent.data.metrics["continual/average_accuracy"] == pytest.approx(out["average_accuracy"])
    assert {"continual.json", "accuracy_matrix.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }


@pytest.mark.slow  # 31 s (the default suite budget); exact resume stays in the default run through test_training
def test_resume_in_the_middle_of_an_experience_is_bit_identical(tmp_path: Path, cl_shards: Path) -> None:
    common = ["tracking.enabled=false", "train.steps=4"]
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    ok(run_cli(cl_args(straight, cl_shards, "replay_lwf", *common), timeout=400))
    r = run_cli(cl_args(paused, cl_shards, "replay_lwf", *common, "train.stop_at=2"), timeout=400)
    ok(r)
    assert "paused" in r.stdout and not (paused / "continual.json").exists()
    for _ in range(2):  # each experience pauses at step 2 once: resume until done
        ok(
            run_cli(
                [*cl_args(paused, cl_shards, "replay_lwf", *common, "train.stop_at=2"), "--resume", "auto"],
                timeout=400,
            )
        )
    assert result(paused)["accuracy_matrix"] == result(straight)["accuracy_matrix"]
    for k in (0, 1):
        assert losses(paused / f"experience_{k}") == losses(straight / f"experience_{k}")
    r = run_cli(cl_args(paused, cl_shards, "replay_lwf", *common), timeout=60)  # no --resume: refused
    assert r.returncode == 2 and "--resume auto" in r.stderr


@pytest.mark.slow  # 17 s (the default suite budget); 2-rank replay runs in test_update's slow round too
def test_two_rank_zero2_replay_through_the_deepspeed_launcher(tmp_path: Path, cl_shards: Path) -> None:
    run = tmp_path / "ds"
    ds = Path(PY).with_name("deepspeed")
    args = cl_args(
        run,
        cl_shards,
        "replay",
        "tracking.enabled=false",
        "deepspeed.zero_stage=2",
        "train.micro_batch_size=2",
        "continual.replay_batch_size=1",
    )
    cmd = [
        str(ds),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / "finetune.sh"),
        *args,
    ]
    ok(subprocess.run(cmd, env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=500))
    out = result(run)
    assert len(out["accuracy_matrix"]) == 2 and sum(out["memory_per_class"].values()) == 4
    cfg = json.loads((run / "experience_1" / "deepspeed.json").read_text())
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["zero_optimization"]["stage"] == 2


@pytest.mark.slow  # 18 s (the default suite budget); the EWC penalty gradient stays in test_continual_units
def test_ewc_penalty_under_zero3_equals_zero2(tmp_path: Path, cl_shards: Path) -> None:
    """The penalty's gradient is injected per module while ZeRO-3 has it gathered: same losses as ZeRO-2."""
    runs = {}
    for stage in (2, 3):
        run = tmp_path / f"z{stage}"
        extra = [
            "tracking.enabled=false",
            f"deepspeed.zero_stage={stage}",
            "train.micro_batch_size=2",
            "continual.ewc_lambda=5000",
        ]
        ok(run_ranks(cl_args(run, cl_shards, "ewc", *extra), 2, timeout=500))
        runs[stage] = run
    rows = [json.loads(x) for x in (runs[3] / "experience_1" / "metrics.jsonl").read_text().splitlines()]
    penalties = [x["train/penalty"] for x in rows if "train/penalty" in x]
    assert penalties[0] == 0.0 and penalties[-1] > 0  # starts at the anchor (warmup: LR 0), then pulls back
    assert (runs[3] / "experience_0" / "importance.safetensors").is_file()
    a, b = losses(runs[2] / "experience_1"), losses(runs[3] / "experience_1")
    assert a == pytest.approx(b, abs=1e-5), (a, b)


@pytest.mark.slow
def test_peft_per_experience_is_task_incremental_and_does_not_forget(
    tmp_path: Path, cl_shards: Path, mae_dir: Path
) -> None:
    run = tmp_path / "peft"
    ok(
        run_cli(
            cl_args(
                run, cl_shards, "peft_per_experience", "tracking.enabled=false", f"finetune.init={mae_dir}"
            ),
            timeout=400,
        )
    )
    out = result(run)
    assert out["forgetting"] == 0.0  # each experience keeps its own adapters and head
    heads = [
        json.loads((run / f"experience_{k}" / "model" / "config.json").read_text())["class_names"]
        for k in (0, 1)
    ]
    assert heads == [["move_right", "move_left"], ["move_down", "move_up"]]
    assert (
        json.loads((run / "experience_1" / "model" / "config.json").read_text())["extra"]["finetune"][
            "method"
        ]
        == "lora"
    )


@pytest.mark.slow  # 7 s; class-incremental replay end to end stays in the default run
def test_domain_incremental_replay_spans_shard_sets(tmp_path: Path, cl_shards: Path) -> None:
    other = balanced_shards(tmp_path / "domain1", domain=1)
    run = tmp_path / "domains"
    args = cl_args(
        run, cl_shards, "replay", "tracking.enabled=false", f"continual.domains=[{other}]", "train.steps=3"
    )
    args = [a for a in args if not a.startswith("continual.experiences")]
    ok(run_cli(args, timeout=400))
    out = result(run)
    assert out["scenario"] == "domain-incremental" and [e["shards"] for e in out["experiences"]] == [
        str(cl_shards),
        str(other),
    ]
    assert len(out["accuracy_matrix"]) == 2 and out["accuracy_before_training"][1] is not None
    for k in (0, 1):  # one head over every class from the start
        assert (
            len(json.loads((run / f"experience_{k}" / "model" / "config.json").read_text())["class_names"])
            == 4
        )
    state = json.loads((run / "continual_state.json").read_text())
    assert {it["shards"] for it in state["memory"]["items"]} <= {str(cl_shards), str(other)}
