import pickle

import pytest
import torch

from conftest import tiny_model
from ddep.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddep.models.saving import load_model, save_model


@pytest.mark.parametrize("arch", ["unet", "transunet"])
def test_exported_model_round_trip(tmp_path, arch):
    model = tiny_model(arch, classes=4).eval()
    save_model(model, tmp_path / "exported")
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "exported").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.config == dict(model.config, encoder_weights=None)


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    model = tiny_model("unet")
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "step": 3}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert load_checkpoint(path)["step"] == 3
    assert isinstance(load_model(path), torch.nn.Module)


class Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "model_config": Exploit()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pt: refused, it holds pickled objects other than tensors"):
        load_model(path)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_checkpoint_names_the_file(tmp_path):
    model = tiny_model("unet")
    path = tmp_path / "last.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="last.pt: unreadable or truncated checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_exported_weights_that_do_not_fit_the_config(tmp_path):
    save_model(tiny_model("unet", classes=4), tmp_path / "m")
    config = (tmp_path / "m" / "config.json").read_text().replace('"classes": 4', '"classes": 5')
    (tmp_path / "m" / "config.json").write_text(config)
    with pytest.raises(ValueError, match="weights do not fit the model config"):
        load_model(tmp_path / "m")
