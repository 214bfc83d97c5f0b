import pytest
import torch

from gdseg.modeling.preprocess import batch_images, pad_targets

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def test_batch_images_normalizes_then_pads_with_zeros():
    torch.manual_seed(0)
    a = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 64, 30), dtype=torch.uint8)
    batch, sizes = batch_images([a, b], MEAN, STD, size_divisibility=32)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    assert sizes == [(40, 50), (64, 30)]
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(batch[0, :, :40, :50], (a.float() - mean) / std)
    assert batch[0, :, 40:].abs().sum() == 0 and batch[0, :, :, 50:].abs().sum() == 0
    assert batch[1, :, :, 30:].abs().sum() == 0
    # The published Cityscapes config says -1 (no padding); the network still needs 32.
    for div in (-1, 0, 1):
        batch, _ = batch_images([a], MEAN, STD, size_divisibility=div)
        assert batch.shape == (1, 3, 64, 64)
    batch, _ = batch_images([a], MEAN, STD, size_divisibility=64)
    assert batch.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError):
        batch_images([], MEAN, STD)


def test_pad_targets():
    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, :10, :10] = True
    out = pad_targets(
        [
            {"labels": torch.tensor([1, 2]), "masks": masks},
            {
                "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 64, 30, dtype=torch.bool),
            },
        ],
        (64, 64),
    )
    assert out[0]["masks"].shape == (2, 64, 64) and out[0]["masks"].dtype == torch.bool
    assert out[0]["masks"].sum() == 100 and out[0]["masks"][0, :10, :10].all()
    assert out[1]["masks"].shape == (0, 64, 64) and out[1]["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="do not fit"):
        pad_targets([{"labels": torch.tensor([1]), "masks": torch.zeros(1, 70, 10)}], (64, 64))
