"""MultimodalLM: image insertion, loss paths, gradient checkpointing, KV-cache generation."""

import pytest
import torch

import mmadapt
from mmadapt.adapters import adapter_parameters
from mmadapt.compat import set_activation_checkpointing
from mmadapt.errors import InputError
from tests.helpers import REPO


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = mmadapt.load_config(REPO / "configs" / "xcomposer.yaml", ["model=models/tiny.yaml", "adapters.0.dropout=0"])
    built = mmadapt.build_model(cfg)
    for param in adapter_parameters(built.llm).values():
        torch.nn.init.normal_(param, std=0.1)  # as if trained: B no longer zero
    return built


def _batch(n_images=2, tokens_per_image=9):
    slots = [-1] * tokens_per_image
    row0 = [1, 5, *slots, 6, 7, *slots, 8, 9, 10]
    row1 = [1, 5, 6, 7, 8, 9, 10, 11] + [2] * (len(row0) - 8)
    ids = torch.tensor([row0, row1])
    mask = torch.tensor([[1] * len(row0), [1] * 8 + [0] * (len(row0) - 8)])
    labels = ids.masked_fill(ids < 0, -100).masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return ids, mask, torch.randn(n_images, 3, 48, 48), labels


def test_labelled_only_loss_equals_full_logits_loss(model):
    ids, mask, images, labels = _batch()
    model.eval()
    full = model(ids, mask, images, labels).loss
    labelled = model(ids, mask, images, labels, return_logits=False).loss
    torch.testing.assert_close(labelled, full)


def test_image_slots_must_match_images(model):
    ids, mask, images, _ = _batch()
    with pytest.raises(InputError, match="18 image slots but 1 images"):
        model(ids, mask, images[:1])
    with pytest.raises(InputError, match="image slots but no images"):
        model(ids, mask)


def test_text_only_input_is_the_base_llm(model):
    ids = torch.randint(0, 200, (2, 9))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.llm(input_ids=ids).logits)


def _adapter_grads(model, batch):
    model.zero_grad()
    ids, mask, images, labels = batch
    model(ids, mask, images, labels, return_logits=False).loss.backward()
    grads = {n: p.grad.clone() for n, p in adapter_parameters(model.llm).items()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    return grads


@pytest.mark.parametrize("reentrant", [True, False])
def test_frozen_llm_and_encoder_with_checkpointing_still_train_adapters(model, reentrant):
    for name, param in model.named_parameters():
        param.requires_grad_(".mmadapt." in name)
    model.train()
    batch = _batch()
    reference = _adapter_grads(model, batch)
    set_activation_checkpointing(model.llm, use_reentrant=reentrant)
    checkpointed = _adapter_grads(model, batch)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-7)


def test_generation_with_kv_cache_equals_without(model):
    image_prompt = [1, 5, *[-1] * 9, 6, 7]
    text_prompt = [1, 5, 6, 7, 8, 9, 10, 11]
    pad = len(image_prompt) - len(text_prompt)
    ids = torch.tensor([image_prompt, [2] * pad + text_prompt])
    mask = torch.tensor([[1] * len(image_prompt), [0] * pad + [1] * len(text_prompt)])
    images = torch.randn(1, 3, 48, 48)
    model.eval()
    cached = model.generate(ids, mask, images, max_new_tokens=12, use_cache=True)
    uncached = model.generate(ids, mask, images, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, uncached)
    adapted = model.generate(ids, mask, images, max_new_tokens=12)
    with mmadapt.disable_adapters(model):
        base = model.generate(ids, mask, images, max_new_tokens=12)
    assert torch.equal(base[1], adapted[1]), "the text-only row must not change"


@pytest.mark.parametrize("objective", ["readout", "contrastive"])
def test_alignment_loss_trains_encoder_and_projector_only(model, objective):
    model.image_alignment = objective
    ids, _, _, labels = _batch()  # its first row holds two images, which readout skips
    one_image = torch.cat([ids[:1, :13], ids[:1, 22:]], dim=1)  # [1, 5, 9 slots, 6, 7, 8, 9, 10]
    one_image_labels = torch.cat([labels[:1, :13], labels[:1, 22:]], dim=1)
    batch_ids = torch.cat([one_image] * 3)
    batch_labels = torch.cat([one_image_labels] * 3)
    batch_labels[1, -3:] = torch.tensor([20, 21, 22])
    batch_labels[2, -3:] = torch.tensor([30, 31, 32])
    loss = model(batch_ids, images=torch.randn(3, 3, 48, 48), labels=batch_labels, align=True).loss
    loss.backward()
    groups = model.parameter_groups()
    assert loss > 0
    assert all(p.grad is not None for p in groups["vision"].values() if p.requires_grad)
    assert all(p.grad is not None for n, p in groups["projector"].items() if n.startswith("projectors.image."))
    assert all(p.grad is None for n, p in groups["projector"].items() if n.startswith("projectors.speech."))
    assert all(p.grad is None for p in groups["adapters"].values())
    assert all(p.grad is None for p in groups["llm"].values())


def test_readout_alignment_skips_multi_image_samples(model):
    ids, _, _, labels = _batch()
    loss = model(ids[:1], images=torch.randn(2, 3, 48, 48), labels=labels[:1], align=True).loss
    assert loss.item() == 0.0
