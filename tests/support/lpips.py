"""A stand-in for the LPIPS VGG16 weights file (see sg2dist/inversion/lpips.py).

The real file combines torchvision's ImageNet VGG16 (vgg16-397923af.pth, 528 MB) with the
LPIPS v0.1 linear weights; neither can be downloaded on the test machines. Tests build
their own file with the same keys: torchvision's own VGG16 layer builder (so the names and
shapes are torchvision's), He-initialised with a fixed seed as torchvision initialises
VGG, plus random non-negative linear weights under the lpips package's key names.
Distances are then not the published LPIPS scale, but loading, features and every
computation on them are the real ones.
"""

import pytest
import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers


def random_lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    features = make_layers(cfgs["D"])  # torchvision's VGG16 `features`, same module indices
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    for tap, channels in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{tap}.model.1.weight"] = torch.rand(1, channels, 1, 1)
    return state


@pytest.fixture(scope="session")
def lpips_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("lpips") / "random-lpips-vgg16.pth"
    torch.save(random_lpips_state(), path)
    return str(path)


def lpips_by_definition(
    state: dict[str, torch.Tensor], img0: torch.Tensor, img1: torch.Tensor
) -> torch.Tensor:
    """LPIPS distance [N] written out from the paper's definition, independently of sg2dist:
    VGG16 run with plain F.conv2d from the state dict; at each tap, activations divided by
    their length over channels, squared difference weighted per channel, averaged over
    pixels; summed over taps. Images [N, 3, H, W] in [0, 255], 16..256 px."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
    x = torch.cat([img0, img1]).double()
    x = ((x / 127.5 - 1) - shift) / scale
    total = torch.zeros(len(img0), dtype=torch.float64)
    index, tap = 0, 0  # torchvision's module index in `features`; LPIPS tap
    for item in cfgs["D"][:-1]:  # up to relu5_3
        if item == "M":
            total += _tap_distance(state, tap, x)
            tap += 1
            x = torch.nn.functional.max_pool2d(x, 2)
            index += 1
            continue
        weight, bias = (state[f"features.{index}.{name}"].double() for name in ("weight", "bias"))
        x = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))
        index += 2  # the convolution and its ReLU
    return total + _tap_distance(state, tap, x)


def _tap_distance(state, tap: int, x: torch.Tensor) -> torch.Tensor:
    f0, f1 = x.chunk(2)
    n0 = f0 / (f0.square().sum(1, keepdim=True).sqrt() + 1e-10)
    n1 = f1 / (f1.square().sum(1, keepdim=True).sqrt() + 1e-10)
    w = state[f"lin{tap}.model.1.weight"].double().reshape(1, -1, 1, 1)
    return (w * (n0 - n1).square()).sum(1).mean(dim=(1, 2))
