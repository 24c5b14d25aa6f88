import torch

from conftest import tiny_model
from ddep.noise import corrupt, denoising_loss, to_model_input


def pretraining_step(model, optimizer, images):
    """One decoder denoising step: corrupt in [-1, 1], normalise, predict the noise."""
    x_noisy, eps = corrupt(images * 2 - 1, generator=torch.Generator().manual_seed(0))
    loss = denoising_loss(model(to_model_input(x_noisy, model.config["mean"], model.config["std"])), eps)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_frozen_encoder_is_bit_identical_after_a_pretraining_step():
    model = tiny_model("unet").freeze_encoder()
    model.train()
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pretraining_step(model, optimizer, torch.rand(4, 3, 32, 32))

    assert any(k.endswith("running_mean") for k in encoder_before)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key  # weights and BatchNorm statistics
    assert all(p.grad is None for p in model.encoder.parameters())
    changed = [k for k, v in model.decoder.state_dict().items() if not torch.equal(v, decoder_before[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("running_mean") for k in changed)


def test_frozen_encoder_stays_in_eval_mode_across_train_calls():
    model = tiny_model("transunet").freeze_encoder()
    model.train()
    model.train(True)
    assert model.training and model.decoder.training and model.segmentation_head.training
    assert not any(m.training for m in model.encoder.modules())
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_unfreeze_restores_gradients_and_mode():
    model = tiny_model("unet").freeze_encoder().train()
    model.unfreeze_encoder()
    assert all(m.training for m in model.encoder.modules())
    assert all(p.requires_grad for p in model.encoder.parameters())
    model.eval().unfreeze_encoder()
    assert not model.encoder.training


def test_unfrozen_encoder_learns():
    model = tiny_model("unet").train()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    pretraining_step(model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.rand(4, 3, 32, 32))
    assert any(not torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())
