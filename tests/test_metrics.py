import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ddep.metrics import SegMetric


def approx(x):
    return pytest.approx(x, abs=1e-9)


def test_hand_computed_confusion_with_ignore_absent_and_spurious_classes():
    # K = 4. Class 2 is predicted once but never labelled (union 1, IoU 0, Acc undefined);
    # class 3 is neither labelled nor predicted (IoU and Acc undefined, left out of the means).
    target = torch.tensor([[0, 0, 0, 1], [1, 1, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 2, 3, 0]])  # predictions on ignored pixels don't count
    m = SegMetric(4)
    m.update(pred, target)
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(m.confusion, expected) and m.confusion.dtype == torch.int64
    a = m.areas()
    assert a["area_intersect"].tolist() == [2, 2, 0, 0]
    assert a["area_pred_label"].tolist() == [2, 3, 1, 0]
    assert a["area_label"].tolist() == [3, 3, 0, 0]
    assert a["area_union"].tolist() == [3, 4, 1, 0]
    r = m.compute()
    # IoU: 2/3, 2/4, 0/1, nan; Acc: 2/3, 2/3, nan, nan; aAcc 4/6
    assert r["IoU"][:3] == [approx(200 / 3), approx(50.0), approx(0.0)] and r["IoU"][3] is None
    assert r["Acc"][:2] == [approx(200 / 3), approx(200 / 3)] and r["Acc"][2:] == [None, None]
    assert r["mIoU"] == approx((200 / 3 + 50 + 0) / 3)
    assert r["mAcc"] == approx(200 / 3)
    assert r["aAcc"] == approx(400 / 6)
    assert all(isinstance(r[k], float) for k in ("aAcc", "mIoU", "mAcc"))
    json.loads(json.dumps(r, allow_nan=False))  # strict JSON: no NaN anywhere


def test_perfect_prediction_and_batched_input():
    target = torch.randint(0, 3, (2, 5, 7))
    m = SegMetric(3)
    m.update(target.clone(), target)
    r = m.compute()
    assert r["aAcc"] == r["mIoU"] == r["mAcc"] == 100.0


def test_accumulation_equals_one_update_on_concatenated_data_and_reset():
    g = torch.Generator().manual_seed(1)
    preds = [torch.randint(0, 5, (2, 9, 11), generator=g) for _ in range(3)]
    targets = [torch.randint(0, 6, (2, 9, 11), generator=g) for _ in range(3)]
    targets = [torch.where(t == 5, torch.tensor(255), t) for t in targets]  # some ignored pixels
    many, one = SegMetric(5), SegMetric(5)
    for p, t in zip(preds, targets):
        many.update(p, t)
    one.update(torch.cat(preds), torch.cat(targets))
    assert torch.equal(many.confusion, one.confusion)
    assert many.compute() == one.compute()
    many.reset()
    assert many.confusion.sum() == 0
    many.update(preds[0], targets[0])
    single = SegMetric(5)
    single.update(preds[0], targets[0])
    assert many.compute() == single.compute()


def numpy_reference(preds, targets, k, ignore):
    """An independent mmsegmentation-style computation: per-image intersect/union via histograms."""
    inter, union, pred_area, label_area = (np.zeros(k) for _ in range(4))
    for p, t in zip(preds, targets):
        mask = t != ignore
        p, t = p[mask], t[mask]
        i = p[p == t]
        ai = np.histogram(i, bins=k, range=(0, k - 1))[0]
        ap = np.histogram(p, bins=k, range=(0, k - 1))[0]
        al = np.histogram(t, bins=k, range=(0, k - 1))[0]
        inter += ai
        pred_area += ap
        label_area += al
        union += ap + al - ai
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / label_area
    return {
        "aAcc": inter.sum() / label_area.sum() * 100,
        "mIoU": np.nanmean(iou) * 100,
        "mAcc": np.nanmean(acc) * 100,
    }


def test_matches_independent_numpy_implementation_on_random_data():
    rng = np.random.default_rng(0)
    k = 7
    preds = [rng.integers(0, k, (13, 17)) for _ in range(4)]
    targets = [np.where(rng.random((13, 17)) < 0.1, 255, rng.integers(0, k - 2, (13, 17))) for _ in range(4)]
    m = SegMetric(k)
    for p, t in zip(preds, targets):
        m.update(torch.from_numpy(p), torch.from_numpy(t))
    ours, ref = m.compute(), numpy_reference(preds, targets, k, 255)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], rel=1e-12)
    assert ours["Acc"][-2:] == [None, None]  # classes 5 and 6 are never labelled


def test_uint8_target_and_custom_ignore_index():
    m = SegMetric(2, ignore_index=-1)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, -1, 1]))
    assert m.compute()["aAcc"] == 100.0
    m = SegMetric(2)
    m.update(torch.tensor([0, 1, 0], dtype=torch.uint8), torch.tensor([0, 255, 1], dtype=torch.uint8))
    assert m.confusion.tolist() == [[1, 0], [1, 0]]


def test_errors():
    m = SegMetric(3)
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="argmax"):
        m.update(torch.zeros(2, 3, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        m.update(torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside 0\.\.2.*ignore index 255: \[3\]"):
        m.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 3, 255, 1]))
    with pytest.raises(ValueError, match=r"outside 0\.\.2.*\[-1\]"):
        m.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, -1, 255, 1]))
    with pytest.raises(ValueError, match=r"pred holds values outside 0\.\.2: \[5\]"):
        m.update(torch.tensor([0, 5, 0, 0]), torch.tensor([0, 1, 255, 1]))
    assert m.confusion.sum() == 0  # failed updates count nothing
    with pytest.raises(ValueError, match="no labelled pixels"):
        m.compute()
    m.update(torch.tensor([0, 9]), torch.tensor([255, 255]))  # a wrong pred on an ignored pixel is fine
    with pytest.raises(ValueError, match="no labelled pixels"):
        m.compute()
    with pytest.raises(ValueError, match="num_classes"):
        SegMetric(0)
    with pytest.raises(ValueError, match="ignore_index"):
        SegMetric(3, ignore_index=1)


def test_all_reduce_is_a_noop_without_distributed_and_refuses_double_counting():
    m = SegMetric(2)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    before = m.confusion.clone()
    assert m.all_reduce() is m
    assert torch.equal(m.confusion, before)
    with pytest.raises(RuntimeError, match="already all-reduced"):
        m.all_reduce()
    with pytest.raises(RuntimeError, match="already all-reduced"):
        m.update(torch.tensor([0]), torch.tensor([0]))
    m.reset()
    m.update(torch.tensor([0]), torch.tensor([0]))


def test_all_reduce_sums_confusion_across_ranks(monkeypatch):
    """With torch.distributed faked, two ranks' shards reduce to the single-process result."""
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (6, 8), generator=g) for _ in range(5)]
    targets = [torch.randint(0, 4, (6, 8), generator=g) for _ in range(5)]
    single = SegMetric(4)
    for p, t in zip(preds, targets):
        single.update(p, t)
    ranks = [SegMetric(4), SegMetric(4)]
    for i, (p, t) in enumerate(zip(preds, targets)):
        ranks[i % 2].update(p, t)
    total = ranks[0].confusion + ranks[1].confusion

    def fake_all_reduce(tensor, op=None):
        assert op == dist.ReduceOp.SUM
        tensor.copy_(total)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    assert all(r.all_reduce().compute() == single.compute() for r in ranks)


# Spawned ranks load metrics.py by path: importing the ddep package would also import timm (~9 s).
WORKER = """
import importlib.util, json, sys
import torch, torch.distributed as dist
rank, init, data, out, src = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
spec = importlib.util.spec_from_file_location("metrics_under_test", src)
metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(metrics)
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
preds, targets = torch.load(data)
m = metrics.SegMetric(4)
for p, t in zip(preds[rank::2], targets[rank::2]):
    m.update(p, t)
result = m.all_reduce().compute()
dist.destroy_process_group()
with open(out, "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
def test_distributed_all_reduce_equals_single_process(tmp_path):
    import subprocess
    import sys

    import ddep.metrics

    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (6, 8), generator=g) for _ in range(5)]  # rank 0 gets 3, rank 1 gets 2
    targets = [torch.randint(0, 4, (6, 8), generator=g) for _ in range(5)]
    torch.save((preds, targets), tmp_path / "data.pt")
    single = SegMetric(4)
    for p, t in zip(preds, targets):
        single.update(p, t)
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(tmp_path / "init"), str(tmp_path / "data.pt"),
                          str(tmp_path / f"out{rank}.json"), ddep.metrics.__file__])
        for rank in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    expected = json.loads(json.dumps(single.compute()))
    for rank in range(2):
        assert json.loads((tmp_path / f"out{rank}.json").read_text()) == expected
    assert not math.isnan(expected["mIoU"])
