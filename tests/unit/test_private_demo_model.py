"""The private demo's saved model is reused only when it is the current revision and seed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcompute import private_demo


@pytest.fixture
def saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake_save(path: str, hidden_units: int = 0, seed: int | None = 0) -> str:
        Path(path).mkdir(parents=True)
        (Path(path) / "saved_model.pb").write_bytes(b"model")
        calls.append(int(seed or 0))
        return path

    import fedcompute.models.functional as functional
    import fedcompute.models.small_classifier as small_classifier

    monkeypatch.setattr(small_classifier, "save_small_classifier", fake_save)
    monkeypatch.setattr(functional, "kill_tff_worker_children", lambda: 0)
    return calls


def test_a_model_saved_by_an_older_demo_or_another_seed_is_saved_again(tmp_path: Path, saves: list[int]) -> None:
    model_dir = tmp_path / "fashion_logreg"
    model_dir.mkdir()
    (model_dir / "saved_model.pb").write_bytes(b"old demo's model")  # no stamp: an older revision
    (model_dir / "variables").mkdir()
    private_demo.save_model(model_dir, seed=0)
    assert saves == [0] and not (model_dir / "variables").exists()
    assert json.loads(private_demo.model_stamp(model_dir).read_text())["revision"] == private_demo.MODEL_REVISION
    private_demo.save_model(model_dir, seed=0)  # current revision and seed: reused
    assert saves == [0]
    private_demo.save_model(model_dir, seed=3)  # another seed: other initial weights
    assert saves == [0, 3]
