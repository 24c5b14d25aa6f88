from fractions import Fraction

import pytest

import fake_data
from ddep.cli import main
from ddep.data import DataError, build_dataset
from ddep.data.splits import amount_name, parse_amount, select_indices, split_hash


def test_amounts():
    assert parse_amount("1/30") == Fraction(1, 30)
    assert parse_amount("0.05") == Fraction(1, 20)
    assert parse_amount("100") == 100
    assert amount_name("1/30") == "1_30"
    for bad in ("0", "1/0", "2/1", "-3", "abc"):
        with pytest.raises(DataError, match="must be a fraction in"):
            parse_amount(bad)


def test_counts_follow_the_literature():
    # Cityscapes' 2975 training images: 1/30 -> 100, 1/8 -> 372, 1/4 -> 744 (ceil)
    assert [len(select_indices(2975, parse_amount(a), 0)) for a in ("1/30", "1/8", "1/4")] == [100, 372, 744]
    assert len(select_indices(10, parse_amount("0.01"), 0)) == 1  # never empty
    with pytest.raises(DataError, match="asked for 11 labeled images but the dataset has 10"):
        select_indices(10, 11, 0)


def test_deterministic_and_nested():
    small = select_indices(500, Fraction(1, 30), seed=3)
    large = select_indices(500, Fraction(1, 8), seed=3)
    assert small == select_indices(500, Fraction(1, 30), seed=3)
    assert set(small) < set(large)
    assert select_indices(500, Fraction(1, 8), seed=4) != large


def test_cli_writes_nested_split_files(tmp_path, capsys):
    fake_data.cityscapes(tmp_path / "cs", cities={"aachen": 6, "bremen": 4})
    args = ["splits", "--dataset", "cityscapes", "--root", str(tmp_path / "cs"), "--fractions", "1/5,0.5,3",
            "--seeds", "0,1", "--out", str(tmp_path / "splits")]
    assert main(args) == 0
    out = capsys.readouterr().out
    read = lambda a, s: (tmp_path / "splits" / "cityscapes" / a / f"seed{s}" / "labeled.txt").read_text().splitlines()
    assert [len(read(a, 0)) for a in ("1_5", "0.5", "3")] == [2, 5, 3]
    for seed in (0, 1):
        assert set(read("1_5", seed)) <= set(read("3", seed)) <= set(read("0.5", seed))
    unlabeled = (tmp_path / "splits" / "cityscapes" / "0.5" / "seed0" / "unlabeled.txt").read_text().splitlines()
    assert len(unlabeled) == 5 and not set(unlabeled) & set(read("0.5", 0))
    first = read("0.5", 0)
    assert main(args) == 0 and read("0.5", 0) == first  # deterministic across runs
    # the files are valid split files for the dataset, and their hash is printed
    ds = build_dataset("cityscapes", tmp_path / "cs", split_file=tmp_path / "splits/cityscapes/0.5/seed0/labeled.txt")
    assert len(ds) == 5 and f"hash {split_hash(ds.pairs)}" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["splits", "--dataset", "cityscapes", "--root", str(tmp_path / "none"), "--fractions", "1/8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"ddep splits: error: Cityscapes root not found: {tmp_path / 'none'}"
    fake_data.cityscapes(tmp_path / "cs")
    assert main(["splits", "--dataset", "cityscapes", "--root", str(tmp_path / "cs"), "--fractions", "3/2"]) == 1
    assert "label amount '3/2' must be a fraction" in capsys.readouterr().err


def test_labeled_subset_matches_the_written_split(tmp_path):
    from ddep.data.splits import labeled_subset, write_splits

    fake_data.cityscapes(tmp_path / "cs", cities={"aachen": 7})
    full = build_dataset("cityscapes", tmp_path / "cs")
    subset = labeled_subset(full, "3", seed=2)
    (path, pairs), = write_splits("cityscapes", full.pairs, ["3"], [2], tmp_path / "splits")
    assert subset.pairs == pairs and len(subset) == 3 and len(full) == 7
    assert subset[0]["name"] == pairs[0][0]
    assert labeled_subset(full, "1/2", seed=2).pairs[:3] == pairs  # nested


@pytest.mark.parametrize("make", [["--fractions", "1/2"], ["--val", "0.5"]])
def test_split_files_written_for_another_root_are_never_replaced(tmp_path, capsys, make):
    """Both roots map to splits/cityscapes/...: the second root's files would replace the first's,
    changing the images of every run whose split_file names them."""
    fake_data.cityscapes(tmp_path / "a", cities={"aachen": 4})
    fake_data.cityscapes(tmp_path / "b", cities={"bremen": 4})
    args = lambda root: ["splits", "--dataset", "cityscapes", "--root", str(tmp_path / root), *make, "--seeds", "0,1",
                         "--out", str(tmp_path / "splits")]
    assert main(args("a")) == 0
    written = {p: p.read_text() for p in (tmp_path / "splits").rglob("*.txt")}
    assert len(written) == 4  # two seeds
    assert main(args("a")) == 0  # the same files again: rewritten as they are
    assert main(args("b")) == 1
    err = capsys.readouterr().err
    first = sorted(written)[0]
    assert f"{first} (and 3 more) already lists other images (written for another root, split or options?): " \
           "pass --out another folder, or delete it to write these" in err
    # nothing replaced, nothing added: no seed's files are written while another seed's are refused
    assert {p: p.read_text() for p in (tmp_path / "splits").rglob("*.txt")} == written
