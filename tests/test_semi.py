"""Semi-supervised fine-tuning (UniMatch, FixMatch): views, CutMix, the consistency loss, and
runs that use unlabeled images, resume exactly and never read their masks."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY_TRANSUNET, tiny_model
from fake_data import FINETUNE, interrupt_after, rgb, save
from ddep.cli import main
from ddep.data.seeds import seeded
from ddep.data.semi import WeakStrongViews, cutmix_box, unlabeled_images
from ddep.data.unlabeled import UnlabeledImages
from ddep.engine.semi import consistency_loss, cutmix
from test_engine import DROPOUT_MODEL
from test_preemption import signal_on_micro_batch
from test_smp import DPT_TINY
from test_reliability import assert_same_weights, final_weights

SEMI = ["data.root=data", *FINETUNE, "data.labeled=2", "data.batch_size=2", "eval_every=0", "semi.method=unimatch"]


def test_a_cutmix_box_is_a_rectangle_of_2_to_40_percent_of_the_crop_inside_it():
    assert not cutmix_box((24, 32), p=0.0).any()
    for seed in range(20):
        with seeded(seed):
            box = cutmix_box((24, 32), p=1.0)
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert box.sum() == h * w  # one filled rectangle
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        # int() truncates each side of a box of U(0.02, 0.4) of the area
        assert 0 < h * w <= 0.4 * 24 * 32 and (h + 1) * (w + 1) >= 0.02 * 24 * 32


def test_cutmix_pastes_the_next_image_into_the_images_and_their_targets_alike():
    images = torch.stack([torch.full((1, 2, 3), 1.0), torch.full((1, 2, 3), 2.0)])
    boxes = torch.tensor([[[True, False, False], [True, False, False]], [[False] * 3, [False] * 3]])
    pseudo = torch.tensor([[[0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]]])
    confidence, ignore = pseudo.float() / 2, pseudo.bool()
    mixed, (mixed_pseudo, mixed_confidence, mixed_ignore) = cutmix(images, boxes, (pseudo, confidence, ignore))
    assert mixed[0, 0].tolist() == [[2.0, 1.0, 1.0], [2.0, 1.0, 1.0]]  # the box of image 0 holds image 1
    assert torch.equal(mixed[1], images[1])  # no box: unchanged
    assert mixed_pseudo[0].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert mixed_confidence[0].tolist() == [[0.5, 0, 0], [0.5, 0, 0]]
    assert mixed_ignore[0].tolist() == [[True, False, False], [True, False, False]]


def test_the_consistency_loss_is_unimatchs_criterion_by_hand():
    """Three pixels: confident, not confident, confident but padding. CE of logits (0, ln 3)
    against class 1 is -ln(3/4); only the first pixel counts, over the two that are not padding."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3)] * 3]).view(1, 2, 1, 3)
    pseudo = torch.ones(1, 1, 3, dtype=torch.long)
    confidence = torch.tensor([[[0.96, 0.9, 0.99]]])
    ignore = torch.tensor([[[False, False, True]]])
    loss = consistency_loss(logits, pseudo, confidence, ignore, threshold=0.95)
    assert loss.item() == pytest.approx(-math.log(0.75) / 2)
    assert consistency_loss(logits, pseudo, confidence, torch.ones_like(ignore), 0.95).item() == 0.0  # all padding: no NaN


def test_the_views_share_one_crop_mark_its_padding_and_differ_in_colour():
    views = WeakStrongViews((48, 40), mean=(0.5,) * 3, std=(0.25,) * 3, ratio_range=(1.0, 1.0))
    with seeded(3):
        sample = views({"image": rgb(1, size=(32, 36)), "name": "a.png"})  # 36 x 32: padded to 48 x 40
    assert sample["image"].shape == (3, 48, 40) and sample["strong"].shape == (2, 3, 48, 40)
    assert sample["boxes"].shape == (2, 48, 40) and sample["boxes"].dtype == torch.bool
    ignore = torch.ones(48, 40, dtype=torch.bool)
    ignore[:32, :36] = False
    assert torch.equal(sample["ignore"], ignore)
    assert (sample["strong"][:, :, 32:] == 0).all() and (sample["image"][:, 32:] == 0).all()  # padding: the mean colour
    with seeded(3):
        again = views({"image": rgb(1, size=(32, 36))})
    assert torch.equal(again["strong"], sample["strong"])  # seeded: the same views
    assert not torch.equal(sample["strong"][0], sample["image"]) or not torch.equal(sample["strong"][1], sample["image"])


@pytest.mark.parametrize("arch", ["unet", "transunet", "smp:FPN", "smp:DPT"])
def test_feature_perturbation_decodes_clean_and_dropped_features_in_one_pass(arch):
    model = ddep_model(arch).eval()
    x = torch.randn(2, 3, 64, 64)  # DPT: a ViT's prefix tokens beside its feature maps
    with torch.no_grad():
        clean, perturbed = model(x, perturb=True)
        assert torch.allclose(clean, model(x), atol=1e-5)  # the clean half is the plain forward pass
    assert perturbed.shape == clean.shape and not torch.allclose(perturbed, clean)


def test_complementary_masks_give_each_pair_of_views_the_two_halves_of_the_channels():
    from ddep.models.segmenter import complementary_masks

    torch.manual_seed(0)
    masks = complementary_masks(16, 64, torch.device("cpu"))  # 8 pairs: sample i and i + 8
    first, second = masks[:8], masks[8:]
    kept = (first == 1).all(1)
    assert kept.sum() == 4 and (second[kept] == 1).all()  # half of the pairs keep every channel
    dropped = first[~kept]
    assert set(dropped.unique().tolist()) == {0.0, 2.0} and torch.equal(second[~kept], 2 - dropped)
    assert (dropped.mean(1) - 1).abs().max() < 0.5  # about half the channels each
    with pytest.raises(ValueError, match="a batch of two views of the same images; got 3 samples"):
        complementary_masks(3, 8, torch.device("cpu"))


@pytest.mark.parametrize("arch", ["unet", "smp:DPT"])
def test_complementary_dropout_decodes_the_two_views_from_complementary_channels(arch):
    model = ddep_model(arch).eval()
    x = torch.randn(1, 3, 64, 64).repeat(4, 1, 1, 1)  # two views of two images, all alike
    with torch.no_grad():
        torch.manual_seed(1)
        out = model(x, complementary=True)
        plain = model(x)
    assert out.shape == plain.shape
    changed = [not torch.allclose(out[i], plain[i], atol=1e-5) for i in range(4)]
    assert changed[0] == changed[2] and changed[1] == changed[3] and sum(changed) == 2  # one pair dropped, one kept
    with pytest.raises(ValueError, match="choose one"):
        model(x, perturb=True, complementary=True)


def ddep_model(arch):
    import ddep

    if arch == "smp:FPN":
        return ddep.build_model("smp:FPN", "tu-test_resnet", classes=3)
    if arch == "smp:DPT":
        return ddep.build_model("smp:DPT", "tu-test_vit", classes=3, **DPT_TINY)
    return tiny_model(arch, classes=3) if arch == "unet" else tiny_model("transunet", classes=3)


def test_the_default_unlabeled_images_are_the_training_split_outside_the_labeled_ones_without_masks(data):
    from ddep.data import build_dataset

    labeled = build_dataset("folder", "data", "train", num_classes=3)
    images = unlabeled_images(labeled, [1, 4])
    assert isinstance(images, UnlabeledImages)
    assert images.files == [f"images/train/{i}.png" for i in (0, 2, 3, 5)]
    assert set(images[0]) == {"image", "name"}
    with pytest.raises(ValueError, match="all 6 training images are labeled, none is left unlabeled"):
        unlabeled_images(labeled, range(6))


@pytest.mark.parametrize("method, logged", [("unimatch", {"loss_supervised", "loss_strong", "loss_perturbed", "mask_ratio"}),
                                            ("fixmatch", {"loss_supervised", "loss_strong", "mask_ratio"}),
                                            ("unimatch_v2", {"loss_supervised", "loss_strong", "mask_ratio"})])
def test_a_semi_supervised_run_logs_its_losses_and_the_mask_ratio(data, method, logged):
    assert main(["finetune", *SEMI, "steps=2", f"semi.method={method}", "semi.threshold=0.0"]) == 0
    rows = [line.split(",") for line in Path("runs/finetune/log.csv").read_text().splitlines()[1:]]
    keys = {key for step, key, _ in rows if step == "2"}
    assert logged <= keys
    values = {key: float(value) for step, key, value in rows if step == "2"}
    assert values["mask_ratio"] == 1.0  # threshold 0: every pixel that is not padding
    assert values["loss_strong"] > 0
    if method != "unimatch":
        assert "loss_perturbed" not in keys


def test_other_unlabeled_images_without_masks_and_a_transunet_and_an_smp_model(data, capsys):
    for i in range(5):  # images only: no mask anywhere near
        save(rgb(50 + i, size=(40, 48)), Path("photos") / f"extra{i}.jpg")
    other = ["semi.unlabeled.dataset=unlabeled", "semi.unlabeled.root=photos", "steps=1"]
    tiny = "model.options={" + ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}" for k, v in TINY_TRANSUNET.items()) + "}"
    assert main(["finetune", *SEMI, *other, "model.arch=transunet", "model.encoder=vit_base_r50_s16_224", tiny, "name=tu"]) == 0
    assert main(["finetune", *SEMI, *other, *DROPOUT_MODEL, "name=fpn"]) == 0
    shutil.copy("data/images/val/3.png", "photos/3.png")  # an image of the reported split: never trained on
    assert main(["finetune", *SEMI, *other, "name=val"]) == 1
    assert "1 of the reported split's 5 images are among the unlabeled images semi-supervised training uses" in capsys.readouterr().err
    assert not Path("runs/val").exists()


def test_the_pseudo_labels_accuracy_is_logged_from_masks_that_never_reach_training(data, capsys):
    args = [*SEMI, "steps=2", "semi.threshold=0.5"]
    assert main(["finetune", *args, "name=plain"]) == 0
    assert main(["finetune", *args, "semi.pseudo_label_accuracy=true", "name=diagnosed"]) == 0
    assert_same_weights(final_weights("plain"), final_weights("diagnosed"))  # the same views, the same training
    rows = [line.split(",") for line in Path("runs/diagnosed/log.csv").read_text().splitlines()[1:]]
    logged = {key: float(value) for step, key, value in rows if step == "2"}
    assert 0 <= logged["pseudo_accuracy"] <= 1 and 0 <= logged["pseudo_accuracy_confident"] <= 1
    for i in range(2):
        save(rgb(60 + i, size=(40, 48)), Path("photos") / f"p{i}.jpg")
    other = ["semi.unlabeled.dataset=unlabeled", "semi.unlabeled.root=photos", "semi.pseudo_label_accuracy=true"]
    assert main(["finetune", *args, *other, "name=other"]) == 1
    assert "semi.pseudo_label_accuracy needs the unlabeled images' masks" in capsys.readouterr().err


def test_the_dry_run_counts_the_unlabeled_images_and_their_passes(data, capsys):
    assert main(["finetune", *SEMI, "steps=8", "semi.batch_size=3", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["semi"], plan["unlabeled_images"], plan["unlabeled_images_per_step"]) == ("unimatch", 4, 3)
    assert plan["passes_over_unlabeled"] == 6.0  # 8 steps x 3 images over 4


def test_a_semi_supervised_run_interrupted_and_resumed_ends_with_the_uninterrupted_weights(data, monkeypatch):
    """A crash after step 3 (resumed from step 2's checkpoint), and a SIGTERM in the middle of an
    accumulated step: both unlabeled and labeled streams go on from where the checkpoint was."""
    args = [*SEMI, *DROPOUT_MODEL, "steps=4", "semi.threshold=0.5", "optim.grad_accum=2"]
    assert main(["finetune", *args, "name=straight"]) == 0
    interrupt_after(monkeypatch, "finetune", [*args, "name=interrupted"], step=3)  # the checkpoint is step 2's
    assert main(["finetune", *args, "name=interrupted", "--resume"]) == 0
    assert_same_weights(final_weights("straight"), final_weights("interrupted"))
    with monkeypatch.context() as patch:
        signal_on_micro_batch(patch, {5})  # the first half of step 3
        assert main(["finetune", *args, "name=signalled"]) == 75
    assert main(["finetune", *args, "name=signalled", "--resume", "auto"]) == 0
    assert_same_weights(final_weights("straight"), final_weights("signalled"))


def test_an_ema_teacher_averages_the_model_after_each_step_and_resumes_with_the_run(data, monkeypatch, capsys):
    """UniMatch V2's teacher: a copy of the model after step 1, then ratio min(1 - 1/step, m) of
    itself; kept in the checkpoint, so a resumed run ends with the uninterrupted one's teacher too."""
    from ddep.engine.checkpoint import load_checkpoint

    args = [*SEMI, "steps=3", "checkpoint_every=1", "semi.teacher=ema", "semi.ema_momentum=0.6", "semi.threshold=0.5"]
    assert main(["finetune", *args, "name=straight"]) == 0
    before, after = (load_checkpoint(f"runs/straight/checkpoints/{name}.pt") for name in ("last-previous", "last"))
    assert (before["step"], after["step"]) == (2, 3)
    ratio = min(1 - 1 / 3, 0.6)
    for key, teacher in after["companions"]["teacher"].items():
        if teacher.is_floating_point():
            expected = ratio * before["companions"]["teacher"][key] + (1 - ratio) * after["model"][key]
            assert torch.allclose(teacher, expected, atol=1e-6), key
    assert main(["finetune", *args, "semi.teacher=none", "name=student"]) == 0
    assert not torch.equal(after["model"]["segmentation_head.weight"], final_weights("student")["segmentation_head.weight"])
    interrupt_after(monkeypatch, "finetune", [*args, "name=interrupted"], step=2)
    assert main(["finetune", *args, "name=interrupted", "--resume"]) == 0
    resumed = load_checkpoint("runs/interrupted/checkpoints/last.pt")
    assert_same_weights(after["model"], resumed["model"])
    assert_same_weights(after["companions"]["teacher"], resumed["companions"]["teacher"])
    assert main(["finetune", *args, "steps=4", "semi.teacher=none", "name=interrupted", "--resume"]) == 1  # would drop it
    assert "its checkpoint holds teacher that this run does not keep" in capsys.readouterr().err


def test_semi_settings_are_checked(data, capsys):
    assert main(["finetune", *SEMI, "semi.method=meanteacher"]) == 1
    assert "semi.method must be one of none, unimatch, fixmatch" in capsys.readouterr().err
    assert main(["finetune", *SEMI, "semi.threshold=1.5"]) == 1
    assert "semi.threshold is a confidence in [0, 1]; got 1.5" in capsys.readouterr().err
    assert main(["finetune", *SEMI, "data.labeled=6"]) == 1
    assert "none is left unlabeled" in capsys.readouterr().err
    assert main(["finetune", *SEMI, "semi.batch_size=1"]) == 1
    assert "semi.batch_size must be at least 2 (CutMix pairs each unlabeled image with another of its batch); got 1" in (
        capsys.readouterr().err)
    assert not Path("runs").exists()


def test_two_ranks_draw_disjoint_unlabeled_images_whose_union_is_a_pass(data):
    """The unlabeled stream is the labeled one's loader (rank x worker shares of seeded passes)."""
    from ddep.data import build_dataset
    from ddep.engine.distributed import DistInfo
    from ddep.engine.trainer import training_loader

    images = unlabeled_images(build_dataset("folder", "data", "train", num_classes=3), [0, 1])  # 4 images
    images.transform = WeakStrongViews(32, (0.5,) * 3, (0.25,) * 3)
    seen = []
    for rank in (0, 1):
        batches = iter(training_loader(images, 7, 1, 1, DistInfo(rank=rank, world_size=2)))
        seen.append([next(batches)["name"][0] for _ in range(2)])  # a pass: 4 images over 2 ranks
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(images.files)


def test_tar_shards_as_the_unlabeled_images_and_shards_of_the_reported_images_refused(data, capsys):
    from ddep.data.shard_writer import write_shards

    for i in range(4):
        save(rgb(70 + i, size=(40, 48)), Path("photos") / f"s{i}.jpg")
    write_shards("photos", "shards", max_size=48, per_shard=2, workers=1, progress=False, cache_dir="cache")
    other = ["semi.unlabeled.dataset=shards", "semi.unlabeled.root=shards", "semi.threshold=0.0"]
    assert main(["finetune", *SEMI, *other, "steps=4", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["unlabeled_images"], plan["passes_over_unlabeled"]) == (4, 2.0)
    assert main(["finetune", *SEMI, *other, "steps=2", "name=shards"]) == 0
    rows = [line.split(",") for line in Path("runs/shards/log.csv").read_text().splitlines()[1:]]
    assert {key: float(value) for step, key, value in rows if step == "2"}["mask_ratio"] == 1.0
    assert main(["finetune", *SEMI, *other, "semi.unlabeled.options={decode: gpu}", "name=gpu"]) == 1
    assert "semi.unlabeled.options.decode must be cpu" in capsys.readouterr().err
    shutil.move("data/images/val", "val-aside")
    write_shards("data/images", "before", max_size=48, workers=1, progress=False, cache_dir="cache")  # without val
    shutil.move("val-aside", "data/images/val")
    write_shards("data/images", "everything", max_size=48, workers=1, progress=False, cache_dir="cache")  # val too
    assert main(["finetune", *SEMI, "semi.unlabeled.dataset=shards", "semi.unlabeled.root=everything", "name=val"]) == 1
    assert "5 of the reported split's 5 images are among the unlabeled images" in capsys.readouterr().err
    # the val images under the shards' source folder, but written there after the shards: the shards' keys decide
    assert main(["finetune", *SEMI, "semi.unlabeled.dataset=shards", "semi.unlabeled.root=before", "steps=1", "name=before"]) == 0
    assert not Path("runs/gpu").exists() and not Path("runs/val").exists()


RECORDING_RUN = """
import json, os, sys
from ddep.cli import main
from ddep.engine import semi
drawn, start = [], semi.SemiSupervised.__init__

def recording(self, *args, **kwargs):  # the unlabeled batches' names, as the loss draws them
    start(self, *args, **kwargs)
    self.batches = (drawn.append(list(batch["name"])) or batch for batch in self.batches)

semi.SemiSupervised.__init__ = recording
code = main(sys.argv[2:])
open(f"{sys.argv[1]}.{os.environ['RANK']}.json", "w").write(json.dumps(drawn))
sys.exit(code)
"""


@pytest.mark.slow
def test_two_gloo_processes_draw_disjoint_unlabeled_images_whose_union_is_a_pass(data):
    """``ddep finetune`` with semi on under torchrun: each step, the two ranks' unlabeled batches
    (two loader workers each) are the 4 unlabeled images, once."""
    Path("run.py").write_text(RECORDING_RUN)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "run.py",
                           "drawn", "finetune", *SEMI, "steps=3", "data.num_workers=2", "device=cpu", "semi.threshold=0.5"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"drawn.{rank}.json").read_text()) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # a batch of 2 per rank and step
    unlabeled = set(ranks[0][0]) | set(ranks[1][0])
    assert len(unlabeled) == 4 and unlabeled < {f"images/train/{i}.png" for i in range(6)}
    for mine, theirs in zip(*ranks):
        assert len(set(mine)) == len(set(theirs)) == 2 and not set(mine) & set(theirs) and set(mine) | set(theirs) == unlabeled
    assert "loss_strong" in Path("runs/finetune/log.csv").read_text()
