"""``ddep experiment``: study files resolve into checked, content-addressed runs; a tiny study runs end to end."""
import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from ddep.cli import main
from ddep.config import ConfigError
from ddep.experiments.study import SCALES, list_studies, load_study, logged_values, run_hash, study_path

STUDIES = ("label-efficiency", "noise-magnitude", "noise-type", "target", "noise-level-sampling",
           "pretrain-compute", "pretrain-data", "decoder-width")
ROOTS = ["pretrain.data.root=/data/in21k", "finetune.data.root=/data/cityscapes"]


def test_every_study_the_issue_names_exists_at_both_scales():
    for scale in SCALES:
        assert set(STUDIES) <= set(list_studies(scale))
    # our investigation at 4 labels, DDeP on two smp decoders, the semi-supervised study's budget
    assert set(list_studies("demo")) - set(STUDIES) == {"few-labels", "smp-fpn", "smp-deeplabv3plus", "semi-budget", "semi-supervised"}


@pytest.mark.parametrize("scale, name", [(scale, name) for scale in SCALES for name in list_studies(scale)])
def test_every_study_resolves_into_checked_configs(tmp_path, scale, name):
    study = load_study(study_path(name, scale), tmp_path, ROOTS if scale == "paper" else ())
    assert len(study.cells) == len(study.values) * len(study.variants) >= 4
    assert study.baseline in study.variants or study.compare
    for cell in study.cells:
        assert len(cell.finetunes) == len(study.seeds)
        assert [f["seed"] for f in cell.finetunes] == [f["data"]["labeled_seed"] for f in cell.finetunes] == study.seeds
        if cell.pretrain is None:
            assert all(f["init"] is None for f in cell.finetunes)
        else:
            assert all(f["init"] == str(tmp_path / cell.pretrain["name"] / "model") for f in cell.finetunes)
    # the axis changes the runs: no two cells of a variant share fine-tuning runs, unless the
    # variant does not depend on the axis (no pretraining and an axis of pretraining settings)
    for variant in study.variants:
        cells = [c for c in study.cells if c.variant == variant]
        names = {tuple(f["name"] for f in c.finetunes) for c in cells}
        assert len(names) in (1, len(cells))


def test_cells_get_the_overrides_of_their_axis_value_and_variant(tmp_path):
    study = load_study(study_path("label-efficiency"), tmp_path)
    cells = {(c.variant, c.value): c for c in study.cells}
    assert cells["random init", "4"].pretrain is None
    assert cells["random init", "4"].finetunes[0]["model"]["encoder_weights"] is None
    assert cells["ImageNet encoder", "4"].finetunes[0]["model"]["encoder_weights"] == "efficientnet-lite0"
    dep, ddep = cells["DeP", "64"].pretrain, cells["DDeP", "64"].pretrain
    assert (dep["mode"], dep["model"]["encoder_weights"]) == ("encoder+decoder", None)
    assert (ddep["mode"], ddep["model"]["encoder_weights"]) == ("decoder", "efficientnet-lite0")
    assert [c.finetunes[1]["data"]["labeled"] for c in study.cells if c.variant == "DDeP"] == [4, 16, 64]
    # one DDeP pretraining serves every label count
    assert len({c.pretrain["name"] for c in study.cells if c.variant == "DDeP"}) == 1

    sampling = {c.value: c.pretrain["noise"] for c in load_study(study_path("noise-level-sampling"), tmp_path).cells if c.pretrain}
    assert sampling["U[0.4, 0.6]"]["level"] == "uniform" and sampling["U[0.4, 0.6]"]["std_range"] == [0.4, 0.6]
    assert (sampling["gamma U[0.8, 1]"]["level"], sampling["gamma U[0.8, 1]"]["gamma_min"]) == ("ddpm", 0.8)


def test_runs_are_shared_across_studies_and_named_by_what_they_compute(tmp_path):
    magnitude = load_study(study_path("noise-magnitude"), tmp_path)
    target = load_study(study_path("target"), tmp_path)
    same = [c for c in magnitude.cells if c.variant == "DDeP" and c.value == "0.5"][0]
    default = [c for c in target.cells if c.variant == "DDeP" and c.value == "noise"][0]
    assert same.pretrain["name"] == default.pretrain["name"]
    assert [f["name"] for f in same.finetunes] == [f["name"] for f in default.finetunes]
    config = dict(same.pretrain)
    assert run_hash({**config, "name": "x", "out_dir": "y", "progress": False, "log_every": 1}) == run_hash(config)
    assert run_hash({**config, "steps": config["steps"] + 1}) != run_hash(config)
    # a study-wide setting from the command line reaches every run and changes its name
    fewer = load_study(study_path("target"), tmp_path, ["finetune.steps=40"])
    assert {f["steps"] for c in fewer.cells for f in c.finetunes} == {40}
    assert fewer.cells[0].finetunes[0]["name"] != target.cells[0].finetunes[0]["name"]


def test_the_command_line_cannot_change_what_the_study_varies(tmp_path, caplog):
    study = load_study(study_path("noise-magnitude"), tmp_path, ["pretrain.noise.std=0.3"])
    assert [c.pretrain["noise"]["std"] for c in study.cells if c.pretrain] == [0.1, 0.2, 0.35, 0.5, 0.8]
    assert "the study sets pretrain.noise.std in some cells, replacing the command line's pretrain.noise.std=0.3" in caplog.text
    # a whole section from the command line keeps what it sets that the study does not vary
    study = load_study(study_path("noise-magnitude"), tmp_path, ["pretrain.noise={std: 0.3, type: simple}"])
    noises = [c.pretrain["noise"] for c in study.cells if c.pretrain]
    assert [n["std"] for n in noises] == [0.1, 0.2, 0.35, 0.5, 0.8] and {n["type"] for n in noises} == {"simple"}
    assert "replacing the command line's pretrain.noise=" in caplog.text


def write_study(folder: Path, **changes) -> Path:
    spec = {"pretrain": str(Path.cwd() / "configs/demo/pretrain.yaml"), "finetune": str(Path.cwd() / "configs/demo/finetune.yaml"),
            "axis": {"name": "sigma", "key": "pretrain.noise.std", "values": [0.2, 0.5]},
            "variants": {"random decoder": {"pretrain": False}, "DDeP": {}}, "baseline": "random decoder", **changes}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"variants": {"random decoder": {}, "DDeP": {"noise.std": 0.1}}}, "override keys start with pretrain. or finetune.; got 'noise.std'"),
    ({"variants": {"random decoder": {}, "DDeP": {"pretrain": "no"}}}, "'pretrain' takes true or false (false: no pretraining); got 'no'"),
    ({"variants": {"random decoder": {}, "DDeP": {"pretrain.noise.sdt": 0.1}}}, "pretrain config: unknown config key 'noise.sdt'; did you mean 'noise.std'?"),
    ({"baseline": "random"}, "baseline 'random' is not one of the variants"),
    ({"compare": [["DDeP", "random"]]}, "compare must be a list of [variant, other variant] pairs of ['random decoder', 'DDeP']"),
    ({"compare": [["DDeP", "DDeP"]]}, "compare must be a list of [variant, other variant] pairs"),
    ({"compare": [[["DDeP"], "DDeP"]]}, "compare must be a list of [variant, other variant] pairs"),
    ({"axis": {"name": "sigma"}}, "axis must be a mapping with name and values"),
    ({"sedes": [0]}, "unknown study keys ['sedes']"),
    ({"variants": {"random decoder": {}, "DDeP": "sigma=0.1"}}, "variant 'DDeP' must be a mapping; got 'sigma=0.1'"),
    ({"finetune": None}, "finetune must name the base finetune config file"),
    ({"seeds": 0}, "seeds must be a non-empty list of integers; got 0"),
    ({"overrides": {"finetune.seed": 3}}, "finetune.seed is set by the study for each run (one run per seed: use seeds or --seeds)"),
    ({"overrides": {"finetune.init": "x"}}, "finetune.init is set by the study for each run"),
])
def test_bad_study_files_are_refused_with_a_message_that_names_the_file(tmp_path, changes, message):
    path = write_study(tmp_path, **changes)
    with pytest.raises(ConfigError) as error:
        load_study(path, tmp_path / "out")
    assert message in str(error.value) and str(path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_paper_label_efficiency_ends_with_every_label_and_warns_about_nothing(tmp_path, caplog):
    from fractions import Fraction

    from ddep.data.splits import parse_amount

    study = load_study(study_path("label-efficiency", "paper"), tmp_path, ROOTS)
    assert [parse_amount(v) for v in study.values] == [Fraction(1, 30), Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), 1]
    assert isinstance(parse_amount(study.values[-1]), Fraction)  # all the labels, not one image
    assert "replacing the command line" not in caplog.text


def test_paper_scale_studies_need_the_dataset_roots(tmp_path, capsys):
    assert main(["experiment", "target", "--scale", "paper", "--dry-run", "--out", str(tmp_path)]) == 1
    assert "finetune.data.root is not set for dataset 'cityscapes'; pass finetune.data.root=DIR" in capsys.readouterr().err
    assert main(["experiment", "target", "--scale", "paper", "--dry-run", "--out", str(tmp_path), *ROOTS]) == 0
    printed = capsys.readouterr().out
    assert "DDeP" in printed and "target=image" in printed and not list(tmp_path.iterdir())  # a dry run writes nothing


def test_cli_lists_studies_and_names_unknown_ones(capsys):
    assert main(["experiment", "--list"]) == 0
    assert "demo scale: decoder-width, few-labels, label-efficiency" in capsys.readouterr().out
    assert main(["experiment", "noise-magnitdue"]) == 1
    assert "unknown study 'noise-magnitdue' at demo scale (known: decoder-width" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_study_runs_reports_and_resumes(tmp_path, capsys):
    tiny = ["pretrain.steps=2", "finetune.steps=2", "pretrain.data.options.num_images=8", "finetune.data.options.num_images=8",
            "pretrain.data.options.size=32", "finetune.data.options.size=32", "pretrain.data.crop_size=32",
            "finetune.data.crop_size=32", "pretrain.data.batch_size=4", "finetune.data.batch_size=2", "finetune.data.labeled=2",
            "pretrain.progress=false", "finetune.progress=false"]
    semi = {"finetune.semi.method": "unimatch", "finetune.semi.pseudo_label_accuracy": True}
    path = write_study(tmp_path, seeds=[0, 1], title="Tiny", compare=[["DDeP + UniMatch", "DDeP"]],
                       variants={"random decoder": {"pretrain": False}, "DDeP": {}, "DDeP + UniMatch": semi})
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out), *tiny]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "study" / "results.json").read_text())
    assert (record["values"], record["variants"], record["seeds"]) == (["0.2", "0.5"], ["random decoder", "DDeP", "DDeP + UniMatch"],
                                                                        [0, 1])
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert sum(r.startswith("pretrain-") for r in runs) == 2  # one per sigma
    assert sum(r.startswith("finetune-") for r in runs) == 10  # the random decoder's 2 seeds are shared by both sigmas
    for variant, by_value in record["results"].items():
        for value, values in by_value.items():
            names = record["runs"][variant][value]
            assert values == [json.loads((out / n / "metrics.json").read_text())["mIoU"] for n in names]
    assert record["results"]["random decoder"]["0.2"] == record["results"]["random decoder"]["0.5"]
    rows = list(csv.DictReader(io.StringIO((out / "study" / "results.csv").read_text())))
    assert [(r["sigma"], r["variant"], r["n"]) for r in rows] == [(sigma, variant, "2") for sigma in ("0.2", "0.5")
                                                                  for variant in ("random decoder", "DDeP", "DDeP + UniMatch")]
    table = (out / "study" / "table.md").read_text()
    assert table.startswith("# Tiny") and ("| sigma | random decoder | DDeP | DDeP + UniMatch | DDeP - random decoder | "
                                           "DDeP + UniMatch - random decoder | DDeP + UniMatch - DDeP |") in table
    # the semi-supervised runs' pseudo-label statistics at their last step, from their log.csv, in percent
    logged = record["logged"]["DDeP + UniMatch"]["0.5"][1]
    last = {row["key"]: float(row["value"]) for row in csv.DictReader(open(out / record["runs"]["DDeP + UniMatch"]["0.5"][1] / "log.csv"))}
    assert logged["mask_ratio"] == pytest.approx(100 * last["mask_ratio"]) and 0 <= logged["pseudo_accuracy"] <= 100
    assert "mask_ratio" not in record["logged"]["DDeP"]["0.5"][0] and record["logged"]["DDeP"]["0.5"][0]["images_per_s"] > 0
    assert "| sigma | DDeP + UniMatch |" in table.split("mask_ratio: unlabeled pixels whose pseudo-label reaches the threshold")[1]
    assert logged_values(tmp_path / "no-log.csv") == {}  # a run made with log_every=0, which shares its hash
    assert (out / "study" / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "DDeP - random decoder" in printed

    # a second call makes nothing new and reports the same numbers
    assert main(["experiment", str(path), "--out", str(out), *tiny]) == 0
    assert capsys.readouterr().out.count("(reused)") == 2 + 12
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs
    assert json.loads((out / "study" / "results.json").read_text())["results"] == record["results"]
