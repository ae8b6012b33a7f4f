"""Metrics go to metrics.jsonl always, and to TensorBoard / W&B (offline) when asked for."""

import json

import pytest

from nanor1.metrics import MetricsSink, TrackingConfig


def test_jsonl_always(tmp_path):
    sink = MetricsSink(tmp_path)
    sink.log(step=1, loss=2.5)
    sink.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    sink = MetricsSink(tmp_path, TrackingConfig(tensorboard=True))
    for s in range(3):
        sink.log(step=s, loss=1.0 / (s + 1))
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [round(e.value, 4) for e in acc.Scalars("loss")] == [1.0, 0.5, 0.3333]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = MetricsSink(tmp_path, TrackingConfig(wandb=True), name="t", config={"lr": 1})
    sink.log(step=1, loss=0.5)
    sink.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "an offline W&B run folder is written"
