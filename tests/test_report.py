import pytest

from ddep.experiments.report import csv_text, markdown_table, mean_std, plot, text_table

RESULTS = {"random_decoder": {"4": [10.0, 14.0], "16": [30.0]}, "ddep": {"4": [20.0, 22.0], "16": [33.0]}}


def test_mean_and_sample_std():
    assert mean_std([10.0, 14.0]) == (12.0, pytest.approx(2.8284271))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_tables_show_mean_std_and_difference():
    md = markdown_table(RESULTS, ["4", "16"], "labels", baseline="random_decoder")
    assert md.splitlines()[0] == "| labels | random_decoder | ddep | ddep - random_decoder |"
    # paired by seed: differences 10 and 8 -> +9.0 ± 1.4
    assert md.splitlines()[2] == "| 4 | 12.0 ± 2.8 | 21.0 ± 1.4 | +9.0 ± 1.4 |"
    assert md.splitlines()[3] == "| 16 | 30.0 ± 0.0 | 33.0 ± 0.0 | +3.0 |"
    assert "+9.0" in text_table(RESULTS, ["4", "16"], "labels", baseline="random_decoder")
    compared = markdown_table(RESULTS, ["4"], "labels", compare=[("random_decoder", "ddep")]).splitlines()
    assert compared[0] == "| labels | random_decoder | ddep | random_decoder - ddep |"
    assert compared[2] == "| 4 | 12.0 ± 2.8 | 21.0 ± 1.4 | -9.0 ± 1.4 |"
    rows = csv_text(RESULTS, ["4"], "labels").splitlines()
    assert rows[0] == "labels,variant,mean,std,n,values"
    assert rows[1] == "4,random_decoder,12.000,2.828,2,10.000 14.000"


def test_plot_writes_a_png(tmp_path):
    plot(RESULTS, ["4", "16"], tmp_path / "p.png", "labels", "test", log_x=True)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
