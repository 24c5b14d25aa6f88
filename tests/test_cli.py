import subprocess
import sys

from ddep.cli import main


def test_help_lists_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "models" in out and "usage: ddep" in out


def test_models_lists_archs_options_and_offline_weights(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "unet  (default encoder: resnet50)" in out
    assert "transunet  (default encoder: vit_base_r50_s16_224)" in out
    assert "decoder_channels = (256, 128, 64, 16)" in out
    assert "efficientnet-lite0:" in out and "tf_efficientnet_lite0" in out
    assert "smp:FPN  (default encoder: resnet34)" in out and "    decoder_pyramid_channels = 256" in out
    assert "smp:<Arch>: segmentation_models_pytorch's architectures" in out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "ddep", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ddep ")


def test_dataset_options_must_be_key_value(tmp_path, capsys):
    assert main(["splits", "--dataset", "folder", "--root", str(tmp_path), "--fractions", "1", "-o", "num_classes"]) == 1
    assert "-o option must look like key=value, got 'num_classes'" in capsys.readouterr().err


def test_help_version_and_a_config_error_import_no_torch():
    """``ddep --help`` and ``--version`` answer at once: nothing heavy is imported for them."""
    import subprocess
    import sys

    script = ("import sys\nfrom ddep.cli import main\nfor argv in (['--version'], ['--help'], ['finetune', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "print(sorted(m for m in ('torch', 'timm', 'segmentation_models_pytorch', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr


def test_load_model_is_one_top_level_call(tmp_path):
    import ddep

    model = ddep.build_model("unet", "resnet18", classes=2)
    ddep.save_model(model, tmp_path / "m")
    loaded = ddep.load_model(tmp_path / "m")
    assert loaded.config == dict(model.config, encoder_weights=None)
