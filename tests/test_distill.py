"""Distillation from the unpruned model: the soft term is the KL at temperature T, the teacher stays
frozen, training pulls the student toward it, and the combinations it cannot serve are refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_train import TinyClassification, TinyDetection, _tiny_vgg

from prunekit.distill import Distillation
from prunekit.models import ssd300_vgg16
from prunekit.prune.method import PruneConfig, run_phases
from prunekit.prune.trainer import DataTrainer, FnTrainer
from prunekit.train import TrainConfig, train


def _kl_to(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor, t: float) -> float:
    teacher.eval()
    student.eval()
    with torch.no_grad():
        p = F.log_softmax(teacher(x) / t, 1)
        q = F.log_softmax(student(x) / t, 1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


def test_soft_loss_is_the_scaled_kl_and_zero_against_itself() -> None:
    teacher = _tiny_vgg().eval()
    x = torch.rand(4, 3, 32, 32)
    d = Distillation(teacher, alpha=0.7, temperature=3.0)
    with torch.no_grad():
        logits = teacher(x)
        assert float(d.soft_loss(logits, x)) == pytest.approx(0.0, abs=1e-6)
        other = logits + torch.randn_like(logits)
        expected = 9.0 * F.kl_div(F.log_softmax(other / 3, 1), F.log_softmax(logits / 3, 1),
                                  log_target=True, reduction="batchmean")  # fmt: skip
        assert float(d.soft_loss(other, x)) == pytest.approx(float(expected), rel=1e-5)
        y = torch.tensor([0, 1, 2, 3])
        parts = d.losses(other, x, y)
        assert float(parts["classification"]) == pytest.approx(
            0.3 * float(F.cross_entropy(other, y)), rel=1e-5
        )
        assert float(parts["distillation"]) == pytest.approx(0.7 * float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        Distillation(teacher, alpha=1.5)
    with pytest.raises(ValueError, match="same classes"):
        Distillation(teacher).soft_loss(torch.zeros(4, 3), x)


def test_training_with_soft_targets_moves_the_student_toward_a_frozen_teacher(one_thread) -> None:
    torch.manual_seed(0)
    teacher, student = _tiny_vgg(), _tiny_vgg()
    ds = TinyClassification(32)
    x = torch.stack([ds[i][0] for i in range(32)])
    before_teacher = copy.deepcopy(teacher.state_dict())
    from prunekit.evaluate import normalizer

    norm = normalizer(student, "cpu")
    xn = (x - norm[0]) / norm[1] if norm is not None else x
    kl0 = _kl_to(teacher, student, xn, 4.0)
    hist = train(student, ds, TrainConfig(epochs=6, lr=0.05, batch_size=8), progress=False,
                 distill=Distillation(teacher, alpha=1.0, temperature=4.0))  # fmt: skip
    kl1 = _kl_to(teacher, student, xn, 4.0)
    assert "distillation" in hist["epochs"][-1]
    assert kl1 < 0.5 * kl0, (kl0, kl1)
    for k, v in teacher.state_dict().items():  # the caller's teacher is untouched
        assert torch.equal(v, before_teacher[k]), k


def test_distillation_refuses_detectors_and_trainers_without_it() -> None:
    det = ssd300_vgg16(num_classes=3, width=0.0625)
    with pytest.raises(ValueError, match="classifiers only"):
        train(det, TinyDetection(2), TrainConfig(batch_size=2), progress=False,
              distill=Distillation(copy.deepcopy(det)))  # fmt: skip
    fn = FnTrainer(lambda m, s, e, t: None, lambda m: 0.5)
    with pytest.raises(ValueError, match="classifiers only"):
        run_phases(det, "ssd300", fn, PruneConfig(distill=True, eps1=1, eps2=1, eps_pruned=1))
    with pytest.raises(ValueError, match="distill_from"):
        run_phases(_tiny_vgg(), "vgg16", fn, PruneConfig(distill=True, eps1=1, eps2=1, eps_pruned=1))


def test_data_trainer_passes_its_teacher_to_every_stage(monkeypatch, one_thread) -> None:
    seen = []

    def fake_train(model, ds, cfg, regularizer=None, progress=False, distill=None):
        seen.append(distill)

    monkeypatch.setattr("prunekit.train.train", fake_train)
    tr = DataTrainer(TinyClassification(8), TinyClassification(8), TrainConfig(batch_size=4))
    tr.train(_tiny_vgg(), 1, None, "plain")
    tr.distill_from(_tiny_vgg(), alpha=0.5, temperature=2.0)
    tr.train(_tiny_vgg(), 1, None, "retrain")
    assert seen[0] is None and isinstance(seen[1], Distillation)
    assert (seen[1].alpha, seen[1].temperature) == (0.5, 2.0)


def test_the_search_distils_a_classifier_where_asked_and_never_a_detector(
    monkeypatch, one_thread, tmp_path
) -> None:
    """``--distill`` reached the fixed-settings phases only; the budget search ignored it. Now every
    stage of the search (the controls' too) distils a classifier from the original, where asked."""
    from prunekit.prune.search import SearchConfig, run_search

    seen: list = []

    def fake_train(model, ds, cfg, regularizer=None, progress=False, distill=None):
        seen.append(distill)

    monkeypatch.setattr("prunekit.train.train", fake_train)
    cases = [("vgg", _tiny_vgg(), TinyClassification(8), True, True),
             ("vgg_off", _tiny_vgg(), TinyClassification(8), False, False),
             ("ssd", ssd300_vgg16(num_classes=3, width=0.0625), TinyDetection(2), True, False)]  # fmt: skip
    for name, model, data, distill, want in cases:
        seen.clear()
        tr = DataTrainer(data, data, TrainConfig(batch_size=4))
        monkeypatch.setattr(tr, "evaluate", lambda m, per_image=False: {"top1": 0.5, "map50": 0.5})
        cfg = SearchConfig(max_candidates=1, stage_steps=1)
        run_search(model, [], tr, PruneConfig(distill=distill), cfg, tmp_path / name, steps_per_epoch=1)
        assert seen, f"{name}: the search trained nothing"
        assert all((d is not None) == want for d in seen), (name, seen)
        assert all(isinstance(d, Distillation) for d in seen if d is not None)
