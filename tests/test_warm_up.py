"""Workers load and trace their models when they start, not in the first job."""

from __future__ import annotations

import logging

import pytest

from pacsnode.core.settings import BUNDLED_MODELS_DIR
from pacsnode.models.registry import Registry
from pacsnode.workers import infer


def test_warm_up_loads_and_traces_every_enabled_model(caplog: pytest.LogCaptureFixture) -> None:
    from pacsnode.models import runtime

    registry = Registry.load(BUNDLED_MODELS_DIR, [])
    assert registry.enabled, "the bundled models are the fixture"
    runtime.clear_model_cache()
    with caplog.at_level(logging.INFO, logger="pacsnode.workers.infer"):
        warmed = infer.warm_up(registry)
    assert warmed == len(registry.enabled)
    assert any(r.getMessage().startswith("models warm: ") for r in caplog.records)
    # The jobs' own loads now hit the cache: the same object, already traced.
    for model in registry.enabled:
        loaded = infer.load_for_inference(model)
        assert loaded is infer.load_for_inference(model)
        assert isinstance(loaded, runtime.LoadedModel)
        assert loaded._infer.experimental_get_tracing_count() >= 1


def test_pool_processes_warm_their_models_at_start() -> None:
    from celery import signals

    from pacsnode.workers import tasks

    # Connected with weak=False: the receivers list holds the function itself.
    receivers = [entry[1] for entry in signals.worker_process_init.receivers]
    assert tasks.warm_models in receivers
