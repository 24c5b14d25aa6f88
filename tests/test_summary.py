"""What a finished run says: the terminal summary, metrics.json's class names, report.md, the
labelled denoising grid, and the loss a denoiser is read against."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from fake_data import FINETUNE, PRETRAIN
from ddep.cli import main
from ddep.engine.summary import read_log
from ddep.noise import denoising_loss, zero_prediction_loss


def test_runs_print_their_folder_and_numbers_and_finetuning_writes_a_report(data, capsys):
    assert main(["pretrain", "data.root=data/images", *PRETRAIN]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    loss = read_log("runs/pretrain")["loss"][-1][1]
    assert out[-1] == f"pretrain: runs/pretrain: 4 steps, final loss {loss:.3g} (predicting zero: 1.00); model runs/pretrain/model"
    grid = Image.open("runs/pretrain/images/step0000004.png")
    assert grid.width > 4 * (32 + 2) + 2 and grid.getpixel((2, 2)) == (255, 255, 255)  # a margin for the row labels

    Path("classes.txt").write_text("sky\ngrass\nroad\n")
    assert main(["finetune", "data.root=data", *FINETUNE, "init=runs/pretrain/model", "data.options={classes_file: classes.txt}"]) == 0
    metrics = json.loads(Path("runs/finetune/metrics.json").read_text())
    assert metrics["classes"] == ["sky", "grass", "road"]
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-4] == (f"finetune: runs/finetune: mIoU {metrics['mIoU']:.2f} on 5 images; model runs/finetune/model; "
                       "report runs/finetune/report.md")
    assert [line.split()[0] for line in out[-3:]] == ["sky", "grass", "road"]
    assert out[-3].endswith(f"IoU {metrics['IoU'][0]:6.2f}")
    report = Path("runs/finetune/report.md").read_text()
    assert f"mIoU **{metrics['mIoU']:.2f}**" in report and "| road |" in report
    assert "![loss and mIoU against the step](curves.png)" in report
    predictions = Image.open("runs/finetune/predictions.png")
    assert predictions.height == 4 * (160 + 4) and predictions.width == 3 * 160  # 4 rows of image | truth | prediction
    assert Image.open("runs/finetune/curves.png").width > 0


def test_the_log_keeps_one_value_per_step_the_last(tmp_path):
    (tmp_path / "log.csv").write_text("step,key,value\n1,loss,3\n2,loss,2\n3,loss,1.5\n2,loss,2.5\n3,loss,1\n2,val_mIoU,40\n")
    assert read_log(tmp_path) == {"loss": [(1, 3.0), (2, 2.5), (3, 1.0)], "val_mIoU": [(2, 40.0)]}


@pytest.mark.parametrize("loss, value", [("l2", 1.0), ("l1", math.sqrt(2 / math.pi)), ("huber", 0.42466)])
def test_predicting_zero_noise_scores_the_expected_loss(loss, value):
    assert zero_prediction_loss(loss) == pytest.approx(value, abs=1e-5)
    eps = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
    assert float(denoising_loss(torch.zeros_like(eps), eps, loss)) == pytest.approx(value, abs=3e-3)
