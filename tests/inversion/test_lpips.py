"""LPIPS as a feature map (sg2dist.inversion.lpips) with test-built VGG16 weights
(tests/support/lpips.py): the distance is the paper's definition, the weights file follows
the Inception weights' convention (local or s3://, one clear error line)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from support.lpips import lpips_by_definition

from sg2dist import storage
from sg2dist.errors import UserError
from sg2dist.inversion.lpips import LPIPS_FILE, load_lpips, lpips_distance


def random_images(n: int, side: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand([n, channels, side, side], generator=generator) * 255


def test_feature_distance_is_the_lpips_definition(lpips_weights: str) -> None:
    lpips = load_lpips(lpips_weights)
    state = torch.load(lpips_weights, weights_only=True)
    img0, img1 = random_images(3, 32, seed=1), random_images(3, 32, seed=2)
    img1[0] = img0[0]  # identical images are at distance 0

    with torch.no_grad():
        distance = lpips_distance(lpips(img0), lpips(img1))

    expected = lpips_by_definition(state, img0, img1)
    assert distance[0] == 0 and expected[1] > 0
    torch.testing.assert_close(distance.double(), expected, rtol=1e-4, atol=1e-7)


def test_a_grayscale_image_is_three_equal_channels_and_small_images_are_enlarged(
    lpips_weights: str,
) -> None:
    lpips = load_lpips(lpips_weights)
    gray = random_images(2, 8, channels=1)
    with torch.no_grad():
        torch.testing.assert_close(lpips(gray), lpips(gray.expand(-1, 3, -1, -1)))
        enlarged = gray.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(lpips(gray), lpips(enlarged))


def test_weights_load_from_s3(lpips_weights: str, s3_env, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    url = f"{s3_env.url}/models/{LPIPS_FILE}"
    storage.upload_file(lpips_weights, url)
    img = random_images(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_lpips(url)(img), load_lpips(lpips_weights)(img))


def test_missing_or_wrong_weights_are_one_clear_error(lpips_weights: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"no LPIPS weights set; .*{LPIPS_FILE}.*--lpips-weights"):
        load_lpips("")
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(UserError, match=rf"{missing} do not exist; .*metrics.lpips_weights"):
        load_lpips(missing)

    state = torch.load(lpips_weights, weights_only=True)
    del state["lin4.model.1.weight"]
    torch.save(state, tmp_path / "no-lin.pth")
    with pytest.raises(UserError, match="no LPIPS linear weights 'lin4.model.1.weight'"):
        load_lpips(str(tmp_path / "no-lin.pth"))

    state = torch.load(lpips_weights, weights_only=True)
    state["features.0.weight"] = state["features.0.weight"][:32]
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(UserError, match="does not fit VGG16 .*features.0.weight"):
        load_lpips(str(tmp_path / "narrow.pth"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated; NVlabs' vgg16.pt is one
        program = torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    program.save(str(tmp_path / "vgg16.pt"))
    with pytest.raises(UserError, match="is a TorchScript archive .* not a weights file"):
        load_lpips(str(tmp_path / "vgg16.pt"))
