"""The training loop in process, against a fake engine (tests/engine/fakes.py): gradient accumulation, the
veto of a step with a non-finite loss, the stop after too many, the evaluation / checkpoint schedule (the
last step evaluates and saves once), early stopping, preemption, `train.stop_at` and an exact resume.
Milliseconds each; the real DeepSpeed runs are in test_training.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fakes import FakeRuntime, ToyTask

from pretrain.engine import ConfigError, EngineConfig, Outcome, Trainer, TrainingStopped, load_config
from pretrain.engine.optim import lr_at


def config(run_dir: Path, *overrides: str) -> EngineConfig:
    base = [
        f"train.run_dir={run_dir}",
        "train.steps=10",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.device=cpu",
        "optim.lr=0.3",
        "optim.warmup_steps=2",
        "optim.weight_decay=0.0",
        "deepspeed.zero_stage=0",
        "tracking.enabled=false",
    ]
    return load_config(EngineConfig, None, [*base, *overrides])


def trainer(tmp_path: Path, task: ToyTask, *overrides: str, resume: str | None = None) -> Trainer:
    t = Trainer(task, config(tmp_path / "run", *overrides), resume=resume, runtime=FakeRuntime())
    task.trainer = t
    return t


def logged(tmp_path: Path) -> list[dict]:
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def checkpoints(tmp_path: Path) -> list[int]:
    return sorted(
        int(p.parent.name.split("_")[1]) for p in (tmp_path / "run" / "checkpoints").glob("*/complete")
    )


def test_train_step_accumulates_micro_batches_into_one_update(tmp_path: Path) -> None:
    task = ToyTask()
    t = trainer(tmp_path, task, "train.global_batch_size=12")  # 3 micro-batches of 4 per step
    batches = t._batches()
    done = t.train_step(batches)
    assert done is not None and t.engine.updates == 1 and t.engine.micro_steps == 3
    assert task.loader.seen == [(0, 0), (0, 1), (0, 2)]
    assert done.stats.loss == pytest.approx(sum(task.losses) / 3)
    assert done.stats.lr == lr_at(0, 0.3, 2, 10) == 0.0  # the LR the step used: warmup starts at 0
    assert (t.state.step, t.state.samples, t.state.epoch) == (1, 12, 0)
    t.train_step(batches)  # 6 batches per epoch: the next step finishes epoch 0
    t.train_step(batches)
    assert t.state.epoch == 1 and task.loader.seen[-1] == (1, 2)


def test_a_non_finite_loss_vetoes_the_whole_step(tmp_path: Path) -> None:
    task = ToyTask(nan_calls={4})  # the 2nd micro-batch of the 2nd step
    t = trainer(tmp_path, task, "train.global_batch_size=8")
    batches = t._batches()
    set_lr_step = t.train_step(batches)
    assert set_lr_step is not None
    before = {k: v.clone() for k, v in t.engine.module.state_dict().items()}
    moments = {k: v.clone() for k, v in t.optimizer.state[next(iter(t.optimizer.state))].items()}
    assert t.train_step(batches) is None  # skipped on every rank: weights and Adam state untouched
    assert all(torch.equal(before[k], v) for k, v in t.engine.module.state_dict().items())
    after = t.optimizer.state[next(iter(t.optimizer.state))]
    assert all(torch.equal(moments[k], after[k]) for k in moments)
    assert (t.state.step, t.state.nonfinite, t.state.samples) == (1, 1, 8)
    assert all(p.grad is None for p in t.engine.module.parameters())  # the bad gradients are gone
    assert t.train_step(batches) is not None and t.state.step == 2  # the next batches train normally


def test_too_many_skipped_steps_in_a_row_stop_the_run_naming_the_last_checkpoint(tmp_path: Path) -> None:
    task = ToyTask(nan_calls=range(6, 100))
    t = trainer(tmp_path, task, "checkpoint.every=2", "train.max_consecutive_nonfinite=3")
    with pytest.raises(TrainingStopped, match=r"3 consecutive non-finite losses at step 5.*step_00000004"):
        t.train()
    assert checkpoints(tmp_path) == [2, 4]


def test_evaluation_and_checkpoint_schedule_and_the_last_step_once(tmp_path: Path) -> None:
    task = ToyTask()
    result = trainer(
        tmp_path, task, "train.eval_every=3", "checkpoint.every=4", "checkpoint.keep_last=10"
    ).train()
    assert result.outcome is Outcome.FINISHED and result.step == 10
    assert task.evaluations == [3, 6, 9, 10]  # the final evaluation happens once, at the last step
    assert checkpoints(tmp_path) == [4, 8, 10]  # the final checkpoint too
    rows = logged(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, 0.3, 2, 10) for s in range(10)])
    assert rows[-1]["loss"] < rows[2]["loss"] and rows[-1]["samples"] == 40
    assert all(r["train/abs_err"] >= 0 for r in rows)
    assert (result.model_dir / "weights.pt").is_file()


def test_early_stop_ends_the_run_with_one_checkpoint_and_no_further_evaluation(tmp_path: Path) -> None:
    task = ToyTask(stop_at_eval=2)
    result = trainer(tmp_path, task, "train.eval_every=2", "checkpoint.keep_last=10").train()
    assert result.outcome is Outcome.EARLY_STOPPED and result.step == 4
    assert task.evaluations == [2, 4] and checkpoints(tmp_path) == [4]
    assert result.model_dir is not None  # a completed run exports


def test_preemption_checkpoints_at_the_step_boundary_and_resume_continues_exactly(tmp_path: Path) -> None:
    straight = ToyTask()
    trainer(tmp_path / "a", straight, "train.eval_every=3").train()

    first = ToyTask(preempt_call=4)
    result = trainer(tmp_path / "b", first, "train.eval_every=3").train()
    assert result.outcome is Outcome.PREEMPTED and result.step == 4 and result.model_dir is None
    assert checkpoints(tmp_path / "b") == [4] and first.evaluations == [3]
    second = ToyTask()
    result = trainer(tmp_path / "b", second, "train.eval_every=3", resume="auto").train()
    assert result.outcome is Outcome.FINISHED and second.evaluations == [3, 6, 9, 10]
    assert second.loader.seen[0] == (0, 4)  # the loader continued where it stopped
    a, b = logged(tmp_path / "a"), logged(tmp_path / "b")
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]  # bit-identical


def test_stop_at_pauses_with_a_checkpoint(tmp_path: Path) -> None:
    task = ToyTask()
    result = trainer(tmp_path, task, "train.stop_at=3", "train.eval_every=3").train()
    assert result.outcome is Outcome.PAUSED and result.step == 3
    assert task.evaluations == [] and checkpoints(tmp_path) == [3]  # no evaluation on the way out


def test_save_final_off_keeps_only_periodic_checkpoints(tmp_path: Path) -> None:
    result = trainer(
        tmp_path, ToyTask(val=False), "checkpoint.every=4", "checkpoint.save_final=false"
    ).train()
    assert result.outcome is Outcome.FINISHED and checkpoints(tmp_path) == [4, 8]
    assert result.last_checkpoint.name == "step_00000008"


class LoggingTask(ToyTask):
    """Records what the engine hands `log_model` at the end of a completed run."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.logged: list[tuple[Path, object]] = []

    def log_model(self, model_dir: Path, tracker: object) -> None:
        self.logged.append((model_dir, tracker))


def test_the_final_model_goes_through_the_tasks_log_model_hook(tmp_path: Path) -> None:
    task = LoggingTask()
    t = trainer(tmp_path, task)
    result = t.train()
    assert [d for d, _ in task.logged] == [result.model_dir] and task.logged[0][1] is t.tracker


def test_register_as_is_refused_for_a_task_that_logs_plain_files(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"tracking\.register_as='clf': ToyTask logs its model as plain files"
    ):
        trainer(tmp_path, ToyTask(), "tracking.enabled=true", "tracking.register_as=clf")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_resuming_a_finished_run_trains_nothing_more(tmp_path: Path) -> None:
    trainer(tmp_path, ToyTask(val=False)).train()
    again = ToyTask(val=False)
    result = trainer(tmp_path, again, resume="auto").train()
    assert result.outcome is Outcome.FINISHED and result.step == 10 and again.calls == 0
    assert [r["step"] for r in logged(tmp_path)] == list(range(1, 11))  # no step 11
    assert result.model_dir == tmp_path / "run" / "model"


def test_a_run_stopped_while_exporting_exports_on_resume_without_training(tmp_path: Path) -> None:
    trainer(tmp_path, ToyTask(val=False)).train()
    run = tmp_path / "run"
    (run / "exported.json").unlink()  # killed after the last checkpoint, before the export was done
    shutil.rmtree(run / "model")
    again = LoggingTask(val=False)
    result = trainer(tmp_path, again, resume="auto").train()
    assert result.outcome is Outcome.FINISHED and again.calls == 0
    assert (
        result.model_dir == run / "model" and (run / "model").is_dir() and (run / "exported.json").is_file()
    )
    assert [m for m, _ in again.logged] == [run / "model"]
