"""The training loop's parts on their own: TrainState, CheckpointManager, train_one_epoch, LoopSettings."""

import pytest
import torch
from torch import nn

from slimdeploy.data import Normalize, make_synthetic
from slimdeploy.recipe import TrainCfg
from slimdeploy.sparsity import make_sparsifier
from slimdeploy.train import (CheckpointError, CheckpointManager, LoopSettings, TrainingDiverged, TrainState,
                              train, train_one_epoch)


def _model(width=4, classes=3):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def _state(seed=0, width=4):
    torch.manual_seed(seed)
    model = _model(width)
    sparsifier = make_sparsifier(model, "proximal", "l1", 0.01, beta=10.0)
    return TrainState.create(model, TrainCfg(epochs=2, lr=0.1, precision="fp32"), sparsifier, total_steps=10,
                             device_type="cpu")


def _batches(n, size=4, classes=3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 6, 6, generator=gen), torch.randint(0, classes, (size,), generator=gen))
            for _ in range(n)]


LOOP = LoopSettings(batch_size=4, eval_batch_size=4, augment=False)


def test_foreign_fingerprint_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    CheckpointManager(path, "recipe-a").save(_state())
    with pytest.raises(CheckpointError, match=r"ck\.pt: written by a different recipe or plan; use another --out"):
        CheckpointManager(path, "recipe-b").load_or_none()
    with pytest.raises(CheckpointError, match="different recipe"):
        CheckpointManager(path, "recipe-b").restore(_state())
    assert CheckpointManager(path, "recipe-a").load_or_none()["fingerprint"] == "recipe-a"


def test_restore_brings_back_weights_optimizer_counters_and_rng(tmp_path):
    saved = _state(seed=0)
    train_one_epoch(saved, _batches(3), LOOP)  # momentum buffers, moved γ and ξ, a scheduler position
    saved.history = [{"epoch": 1, "test_acc": 50.0}]
    manager = CheckpointManager(tmp_path / "ck.pt", "fp")
    torch.manual_seed(7)
    manager.save(saved)
    draws = torch.rand(5)  # what an uninterrupted run draws next

    torch.manual_seed(123)
    fresh = _state(seed=1)
    assert manager.restore(fresh)
    assert torch.equal(torch.rand(5), draws)
    for (name, a), b in zip(saved.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(saved.sparsifier.xi, fresh.sparsifier.xi))
    momenta = [[s["momentum_buffer"] for s in st.optimizer.state_dict()["state"].values()] for st in (saved, fresh)]
    assert momenta[0] and all(torch.equal(a, b) for a, b in zip(*momenta))
    assert fresh.scheduler.last_epoch == saved.scheduler.last_epoch == 3
    assert (fresh.epoch, fresh.step, fresh.seen, fresh.history) == (0, 3, 12, saved.history)
    assert torch.equal(fresh.loss_sum, saved.loss_sum)


def test_no_path_missing_file_and_other_ranks_read_and_write_nothing(tmp_path):
    state = _state()
    CheckpointManager(None, "fp").save(state)
    assert CheckpointManager(None, "fp").load_or_none() is None
    CheckpointManager(tmp_path / "ck.pt", "fp", rank=1).save(state)
    assert list(tmp_path.iterdir()) == []
    assert not CheckpointManager(tmp_path / "ck.pt", "fp").restore(state)


def test_checkpoint_of_another_model_does_not_fit(tmp_path):
    CheckpointManager(tmp_path / "ck.pt").save(_state(width=4))
    with pytest.raises(CheckpointError, match=r"ck\.pt: does not fit this model"):
        CheckpointManager(tmp_path / "ck.pt").restore(_state(width=8))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    manager, state = CheckpointManager(tmp_path / "ck.pt", "fp"), _state()
    state.epoch = 1
    manager.save(state)

    def write_half_then_fail(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    state.epoch = 2
    with pytest.raises(OSError, match="disk full"):
        manager.save(state)
    monkeypatch.undo()
    assert manager.load_or_none()["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_train_one_epoch_counts_steps_from_the_resumed_position():
    state = _state()
    state.step = 5  # resumed mid-epoch
    seen = []
    stats = train_one_epoch(state, _batches(3), LOOP, lambda st, loss: seen.append((st.step, loss.item())))
    assert [step for step, _ in seen] == [6, 7, 8] and state.seen == 12
    assert stats.epoch == 1 and stats.train_loss == pytest.approx(sum(loss for _, loss in seen) / 3)
    assert stats.lr == state.optimizer.param_groups[0]["lr"] and stats.precision == "fp32"
    assert stats.penalty == pytest.approx(state.sparsifier.penalty_value()) and stats.penalty > 0


def test_train_one_epoch_stops_on_a_non_finite_loss_before_stepping():
    state = _state()
    with torch.no_grad():
        state.model[-1].weight.fill_(float("nan"))
    weights = state.model[0].weight.clone()
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1, step 1$"):
        train_one_epoch(state, _batches(2), LOOP)
    assert torch.equal(state.model[0].weight, weights) and state.step == 0


def test_loop_fields_as_keywords_override_the_loop_settings():
    data = make_synthetic(num_classes=3, image_size=8, train_size=32, test_size=16, seed=0)
    cfg = TrainCfg(epochs=1, lr=0.1, precision="fp32")

    def weights(loop=None, **fields):
        torch.manual_seed(0)
        model = _model()
        train(model, data, cfg, loop, normalize=Normalize(data.mean, data.std, "cpu"),
              sparsifier=make_sparsifier(model, "none"), progress=False, **fields)
        return model[0].weight

    keywords = weights(batch_size=8, eval_batch_size=16, augment=False, seed=1)
    assert torch.equal(weights(LoopSettings(batch_size=8, eval_batch_size=16, augment=False, seed=0), seed=1), keywords)
    assert not torch.equal(weights(LoopSettings(batch_size=8, eval_batch_size=16, augment=False, seed=0)), keywords)
