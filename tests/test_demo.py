"""``ddep demo --quick`` end to end: the files it promises, with the structure it promises."""
import json
from pathlib import Path

import pytest

from ddep.cli import main
from ddep.config import load_config
from ddep.experiments.demo import FULL, QUICK, STARTS, finetune_config, pretrain_config


@pytest.mark.slow
def test_quick_demo_writes_results_report_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert record["label_counts"] == list(QUICK.label_counts)
    assert record["seeds"] == list(QUICK.seeds)
    assert set(record["results"]) == set(STARTS) == {"random_decoder", "ddep"}
    for start, by_count in record["results"].items():
        assert set(by_count) == {str(n) for n in QUICK.label_counts}
        for values in by_count.values():
            assert len(values) == len(QUICK.seeds)
            assert all(0.0 <= v <= 100.0 for v in values)
    assert set(record["timings"]) >= {"pretrain_s", "finetune_and_evaluate_s", "report_s", "total_s"}
    assert all(v >= 0 for v in record["timings"].values())
    for name in ("report.md", "miou_vs_labels.png", "denoising.png", "predictions.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "miou_vs_labels.png").read_bytes()[:4] == b"\x89PNG"
    # the printed table has a row per label count with both starts and the difference
    first = record["results"]["ddep"][str(QUICK.label_counts[0])][0]
    assert f"{first:.1f}" in printed and "ddep - random_decoder" in printed
    # the semi-supervised start is not in the demo: its report and output name the command that shows it
    assert "`ddep experiment semi-supervised`" in (out / "report.md").read_text() and "experiment semi-supervised" in printed

    # a second call reuses every finished run and reports the same numbers
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("(reused)") == len(QUICK.label_counts) * len(QUICK.seeds) * 2
    assert json.loads((out / "results.json").read_text())["results"] == record["results"]


def test_both_starts_get_identical_budgets_and_labeled_images(tmp_path):
    a = finetune_config(FULL, tmp_path, "random_decoder", 16, 2)
    b = finetune_config(FULL, tmp_path, "ddep", 16, 2)
    assert a["init"] is None and b["init"] == str(tmp_path / "pretrain" / "model")
    for config in (a, b):
        del config["init"], config["name"]
    assert a == b
    assert a["data"]["labeled"] == 16 and a["data"]["labeled_seed"] == 2
    assert pretrain_config(FULL, tmp_path)["mode"] == "decoder"


def test_a_folder_made_with_other_settings_is_refused(tmp_path, capsys):
    (tmp_path / "settings.json").write_text(json.dumps({"image_size": 32}))
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} holds a demo run made with other settings: pass --fresh" in err
    assert json.loads((tmp_path / "settings.json").read_text()) == {"image_size": 32}  # untouched


def test_shipped_demo_recipes_are_the_runs_the_demo_makes():
    root = Path(__file__).resolve().parents[1] / "configs" / "demo"
    out = Path("runs/demo")
    assert load_config("pretrain", root / "pretrain.yaml") == pretrain_config(FULL, out)
    assert load_config("finetune", root / "finetune.yaml") == finetune_config(FULL, out, "ddep", 16, 0)
