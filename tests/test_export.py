"""``ddep export``: what it writes where, what it refuses, and how it fails (see ddep/engine/export.py)."""
import errno
import hashlib
import logging
import os
import re
import shutil

import pytest
import torch
from conftest import onnx_matches_pytorch

import ddep
import ddep.atomic
from ddep.cli import main
from ddep.engine import export as export_module
from ddep.models.saving import load_model, save_model

SMP_ENCODER = "tu-test_resnet"


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def unet_checkpoint(tmp_path):
    return save_model(ddep.build_model("unet", "resnet18", classes=3), tmp_path / "unet")


@pytest.fixture
def smp_checkpoint(tmp_path, no_network):
    return save_model(ddep.build_model("smp:FPN", SMP_ENCODER, classes=3), tmp_path / "fpn")


def tree(folder):
    """Every file and folder under ``folder`` (hidden ones too) with its content's hash and mode."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.isdir(path):
                out[key + "/"] = None
            else:
                with open(path, "rb") as f:
                    out[key] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mode & 0o777)
    return out


def run_export(*args):
    return main(["export", *map(str, args)])


def test_foreign_files_in_the_output_folder_are_refused_by_name_and_nothing_changes(tmp_path, unet_checkpoint, capsys):
    out = tmp_path / "out"
    save_model(ddep.build_model("unet", "resnet18", classes=2), out)  # an earlier export, of another model
    for i in range(5):
        (out / f"notes{i}.txt").write_text("mine")
    (out / "data").mkdir()
    before = tree(out)
    assert run_export(f"checkpoint={unet_checkpoint}", f"output={out}") == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"output {out} holds 6 files that export did not write (data/, notes0.txt, notes1.txt and 3 more)" in error
    assert "pass overwrite=true" in error
    assert tree(out) == before
    # an own name taken by a folder cannot be written, even with overwrite=true
    (out / "model.onnx").mkdir()
    before = tree(out)
    assert run_export(f"checkpoint={unet_checkpoint}", f"output={out}", "overwrite=true", "onnx=true") == 1
    assert f"{out / 'model.onnx'} is a folder where export writes a file" in capsys.readouterr().err
    assert tree(out) == before


def test_foreign_files_in_smp_are_refused_then_kept_with_overwrite(tmp_path, smp_checkpoint, capsys, umask022):
    import segmentation_models_pytorch as smp

    out = tmp_path / "out"
    (out / "smp").mkdir(parents=True)
    (out / "smp" / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my model card")
    before = tree(out)
    assert run_export(f"checkpoint={smp_checkpoint}", f"output={out}") == 1
    assert "holds 2 files that export did not write (README.md, smp/notes.txt)" in capsys.readouterr().err
    assert tree(out) == before
    assert run_export(f"checkpoint={smp_checkpoint}", f"output={out}", "overwrite=true") == 0
    printed = capsys.readouterr().out
    assert f"smp model (segmentation_models_pytorch.from_pretrained): {out / 'smp'}" in printed
    assert (out / "smp" / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() == "my model card"
    assert set(tree(out)) == {"README.md", "config.json", "model.safetensors", "smp/", "smp/notes.txt",
                              "smp/README.md", "smp/config.json", "smp/model.safetensors"}
    model = load_model(smp_checkpoint).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(smp.from_pretrained(str(out / "smp")).eval()(x), model(x))
        assert torch.equal(load_model(out).eval()(x), model(x))


def test_an_export_folder_is_written_over_without_asking_with_mode_0644(tmp_path, smp_checkpoint, unet_checkpoint, capsys,
                                                                          umask022):
    out = tmp_path / "out"
    assert run_export(f"checkpoint={smp_checkpoint}", f"output={out}") == 0
    first = tree(out)
    own = {"config.json", "model.safetensors", "smp/", "smp/README.md", "smp/config.json", "smp/model.safetensors"}
    assert set(first) == own  # no hidden temporaries either
    assert {path: entry[1] for path, entry in first.items() if entry} == dict.fromkeys(own - {"smp/"}, 0o644)
    # the hidden temporaries of an interrupted export (earlier ddep versions' too) go once their process is gone
    dead = 999999999
    for name in (f".model.onnx.partial-{dead}.data", f".model.safetensors.tmp{dead}"):
        (out / name).write_bytes(b"partial")
    (out / f".smp.partial-{dead}").mkdir()
    (out / f".smp.partial-{dead}" / "config.json").write_text("{}")
    capsys.readouterr()
    assert run_export(f"checkpoint={smp_checkpoint}", f"output={out}") == 0  # the same export again
    assert f"removed 3 temporary files of an interrupted export from {out}" in capsys.readouterr().out
    assert tree(out) == first
    # another, non-smp model: the earlier model's smp/ would be stale, and goes (printed)
    capsys.readouterr()
    assert run_export(f"checkpoint={unet_checkpoint}", f"output={out}") == 0
    printed = capsys.readouterr().out
    assert f"removed {out / 'smp' / 'model.safetensors'}" in printed
    assert set(tree(out)) == {"config.json", "model.safetensors"}
    assert load_model(out).config["arch"] == "unet"


@pytest.mark.parametrize("size, message", [
    ("[48, 64]", "onnx_size=[48, 64]: smp:FPN needs multiples of 32 (e.g. onnx_size=[64, 64])"),
    ("[64]", "onnx_size must be two positive integers [height, width], got [64]"),
    ("[0, 64]", "onnx_size must be two positive integers"),
    ("[64.5, 64]", "onnx_size must be two positive integers"),
], ids=["not-multiples", "one-value", "zero", "float"])
def test_a_bad_onnx_size_is_refused_before_anything_is_written(tmp_path, smp_checkpoint, capsys, size, message):
    assert run_export(f"checkpoint={smp_checkpoint}", f"output={tmp_path / 'out'}", "onnx=true", f"onnx_size={size}") == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_onnx_is_self_contained_quiet_and_copyable(tmp_path, unet_checkpoint, capsys, caplog):
    """The printed files, copied elsewhere, load in onnxruntime; no hidden file stays; a re-export leaves the same set."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    model = load_model(unet_checkpoint).eval()
    x = torch.randn(2, 3, 32, 32)  # a batch of 2 through a graph traced with 1
    for _ in range(2):
        assert run_export(f"checkpoint={unet_checkpoint}", f"output={out}", "onnx=true", "onnx_size=[32, 32]") == 0
        printed = capsys.readouterr().out
        assert sorted(os.listdir(out)) == ["config.json", "model.onnx", "model.safetensors"]  # as ls -a: nothing hidden
        onnx_files = re.search(r"^ONNX: (.*)$", printed, re.M)[1].split(", ")
        assert onnx_files == [str(out / "model.onnx")]
        elsewhere = tmp_path / "elsewhere"
        shutil.rmtree(elsewhere, ignore_errors=True)
        elsewhere.mkdir()
        for path in onnx_files:
            shutil.copy(path, elsewhere)
        onnx_matches_pytorch(elsewhere / "model.onnx", model, x)
    # verbose=false (the default): none of the exporter's ~130 INFO lines
    assert not [r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir", "torch.onnx"))]


def tiny_onnx(tmp_path):
    """A 1x1 convolution as an onnx_ir model (no torch export: fast), and the torch module it computes."""
    import onnx
    import onnx_ir
    from onnx import TensorProto, helper, numpy_helper

    conv = torch.nn.Conv2d(3, 3, 1, bias=False).eval()
    weight = numpy_helper.from_array(conv.weight.detach().numpy(), "weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 8, 8])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return onnx_ir.from_proto(proto), conv


def test_onnx_past_the_single_file_limit_keeps_its_weights_in_model_onnx_data(tmp_path, monkeypatch, umask022):
    monkeypatch.setattr(export_module, "ONNX_SINGLE_FILE_BYTES", 0)
    graph, conv = tiny_onnx(tmp_path)
    out = tmp_path / "out"
    written = export_module.write_onnx(graph, out / "model.onnx")
    assert written == [out / "model.onnx", out / "model.onnx.data"]
    assert tree(out) == {name: (tree(out)[name][0], 0o644) for name in ("model.onnx", "model.onnx.data")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in written:
        shutil.copy(path, elsewhere)
    onnx_matches_pytorch(elsewhere / "model.onnx", conv, torch.randn(2, 3, 8, 8))


class FullDisk:
    """``open`` for ddep.atomic: files opened for writing take half of the first write, then the disk is full."""

    def __init__(self, real_open):
        self.real_open = real_open

    def __call__(self, path, mode="r", *args, **kwargs):
        f = self.real_open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        real_write = f.write

        def write(data):
            real_write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        f.write = write
        return f


def test_a_full_disk_leaves_no_temporaries_and_names_the_path(tmp_path, smp_checkpoint, monkeypatch, capsys):
    import builtins

    import onnx_ir
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "out"
    # model.safetensors (write_atomic)
    with monkeypatch.context() as m:
        m.setattr(ddep.atomic, "open", FullDisk(builtins.open), raising=False)
        assert run_export(f"checkpoint={smp_checkpoint}", f"output={out}") == 1
    assert f"[Errno 28] cannot write {out / 'model.safetensors'}: No space left on device" in capsys.readouterr().err
    assert tree(out) == {}

    # smp/model.safetensors: safetensors writes it from Rust, whose I/O errors are SafetensorError
    def full_safetensors(model, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_model", full_safetensors)
        assert run_export(f"checkpoint={smp_checkpoint}", f"output={out}") == 1
    assert f"[Errno 28] cannot write {out / 'smp'}: No space left on device" in capsys.readouterr().err
    assert set(tree(out)) == {"config.json", "model.safetensors"}  # written before smp/; nothing of smp's

    # model.onnx, in one file (write_atomic) or with model.onnx.data (onnx_ir.save into a temporary folder)
    graph, _ = tiny_onnx(tmp_path)
    before = tree(out)
    with monkeypatch.context() as m:
        m.setattr(ddep.atomic, "open", FullDisk(builtins.open), raising=False)
        with pytest.raises(OSError, match=f"cannot write {re.escape(str(out / 'model.onnx'))}: No space left"):
            export_module.write_onnx(graph, out / "model.onnx")
    assert tree(out) == before

    def full_onnx_save(model, path, external_data=None, **kwargs):
        (path.parent / external_data).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(export_module, "ONNX_SINGLE_FILE_BYTES", 0)
        m.setattr(onnx_ir, "save", full_onnx_save)
        with pytest.raises(OSError, match=f"cannot write {re.escape(str(out / 'model.onnx'))}: No space left"):
            export_module.write_onnx(graph, out / "model.onnx")
    assert tree(out) == before


def test_a_runs_own_model_folder_is_refused_unless_overwrite(unet_checkpoint, tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    save_model(ddep.build_model("unet", "resnet18", classes=3), run / "model")
    (run / "config.yaml").write_text("name: x\n")
    (run / "checkpoints").mkdir()
    before = tree(run)
    assert main(["export", f"checkpoint={unet_checkpoint}", f"output={run / 'model'}"]) == 1
    assert f"output {run / 'model'} is the result of the run {run} (its metrics.json describes it)" in capsys.readouterr().err
    assert tree(run) == before
    assert main(["export", f"checkpoint={unet_checkpoint}", f"output={run / 'model'}", "overwrite=true"]) == 0
