"""LPIPS with VGG16 features (Zhang et al. 2018, "lin" variant), as a feature map.

`LPIPS(img)` maps uint8-range images [N, C, H, W] (values in [0, 255], 1 or 3 channels)
to one vector per image such that `((LPIPS(a) - LPIPS(b)) ** 2).sum(1)` is the LPIPS
distance of a and b. That is the form the official StyleGAN2 projector and perceptual
path length use: for each of the five VGG16 taps (relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3) the activations are normalised to unit length over channels, weighted per
channel by the square root of the LPIPS linear weights and by 1 / sqrt(H x W), and
flattened; the squared distance of the concatenation is then
sum_l mean_hw sum_c w_lc (n0 - n1)^2, the LPIPS definition.

Preprocessing as in the official code and the lpips package: images larger than 256 px
are area-downsampled to 256 (VGG was trained on 224 px images), values go to [-1, 1] and
through LPIPS's per-channel shift and scale, a grayscale image is used as three equal
channels. Images below 16 px are enlarged (nearest) to at least 16 px: VGG16 pools four
times before its last tap, so a smaller image would leave it no pixel at all.

Weights: one state-dict file (`torch.load(weights_only=True)`: tensors only, no code)
holding torchvision's VGG16 `features.*` tensors and the LPIPS v0.1 linear weights
`lin0.model.1.weight` .. `lin4.model.1.weight`, exactly as those two projects name them
(README, "Perceptual similarity weights", says how to build it). NVlabs' TorchScript
`vgg16.pt` is refused: a TorchScript archive is a program, not a weights file.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sg2dist import storage
from sg2dist.errors import UserError

LPIPS_FILE = "lpips-vgg16.pth"
# torchvision's VGG16 configuration "D": channels of the 3x3 convolutions, per block.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# LPIPS's input scaling, applied to images in [-1, 1] (ImageNet statistics in that range).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
MAX_SIDE = 256  # larger images are area-downsampled to this (the official choice)
MIN_SIDE = 16  # VGG16 pools 4 times before relu5_3
NORM_EPS = 1e-10  # the lpips package's epsilon of the channel normalisation
MISSING_HINT = (
    f"LPIPS needs VGG16 weights: a state-dict file {LPIPS_FILE} holding torchvision's VGG16 "
    "features (vgg16-397923af.pth) and the LPIPS v0.1 linear weights (lpips package, "
    "weights/v0.1/vgg.pth), built as README 'Perceptual similarity weights' shows; "
    "pass --lpips-weights PATH_OR_S3_URL or set metrics.lpips_weights"
)


def vgg16_features() -> tuple[nn.Sequential, tuple[int, ...]]:
    """(VGG16's convolutional part up to relu5_3 with torchvision's module indices, so its
    state dict keys are torchvision's `features.N.*`; the indices of the five LPIPS taps)."""
    layers: list[nn.Module] = []
    taps = []
    in_channels = 3
    for block_index, block in enumerate(VGG16_BLOCKS):
        if block_index > 0:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        for out_channels in block:
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
            in_channels = out_channels
        taps.append(len(layers) - 1)
    return nn.Sequential(*layers), tuple(taps)


class LPIPS(nn.Module):
    """images [N, 1|3, H, W] in [0, 255] -> LPIPS feature vectors [N, F] (see the module doc)."""

    shift: torch.Tensor  # buffers
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.features, self.taps = vgg16_features()
        # Per-channel LPIPS weights of each tap (non-negative), as given in the weights file.
        self.lin = nn.ParameterList(
            nn.Parameter(torch.ones(block[-1]), requires_grad=False) for block in VGG16_BLOCKS
        )
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1), False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1), False)

    def forward(self, img_NCHW: torch.Tensor) -> torch.Tensor:
        x = img_NCHW.to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        side = x.shape[2]
        if side > MAX_SIDE:
            x = F.interpolate(x, size=(MAX_SIDE, MAX_SIDE), mode="area")
        elif side < MIN_SIDE:
            x = F.interpolate(x, scale_factor=math.ceil(MIN_SIDE / side), mode="nearest")
        x = ((x / 127.5 - 1) - self.shift) / self.scale
        parts = []
        tap_weights = iter(self.lin)
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                unit = x / (x.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS)
                weight = next(tap_weights).sqrt() / math.sqrt(x.shape[2] * x.shape[3])
                parts.append((unit * weight.reshape(1, -1, 1, 1)).flatten(1))
        return torch.cat(parts, dim=1)


def lpips_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """LPIPS distance [N] of two feature batches [N, F] (or [1, F] against [N, F])."""
    return (features_a - features_b).square().sum(dim=1)


# ---------------------------------------------------------------------------- loading


def _local_path(url: str) -> str:
    """A local path for `url`; an s3:// file is copied once into the torch hub cache."""
    local = storage.cached_local_copy(url, Path(torch.hub.get_dir()) / "sg2dist")
    if not os.path.isfile(local):
        raise UserError(f"LPIPS weights {url} do not exist; {MISSING_HINT}")
    return local


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _read_state(url: str, path: str) -> dict[str, torch.Tensor]:
    if _is_torchscript(path):
        raise UserError(
            f"{url} is a TorchScript archive (such as NVlabs' vgg16.pt), which sg2dist does not "
            f"load: it is a program, not a weights file; {MISSING_HINT}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise UserError(
            f"{url} is not a tensors-only state dict ({type(exc).__name__}: {reason}); "
            f"{MISSING_HINT}"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{url} holds a {type(state).__name__}, not a state dict; {MISSING_HINT}")
    return state


def _lpips_state(url: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights file's tensors under this module's names: `features.*` as they are,
    `linL.model.1.weight` [1, C, 1, 1] -> `lin.L` [C]; anything else (torchvision's
    classifier) is ignored."""
    ours = {key: value for key, value in state.items() if key.startswith("features.")}
    for tap in range(len(VGG16_BLOCKS)):
        key = f"lin{tap}.model.1.weight"
        if key not in state:
            raise UserError(f"{url} has no LPIPS linear weights '{key}'; {MISSING_HINT}")
        weight = state[key].flatten()
        if bool((weight < 0).any()):
            raise UserError(f"{url}: '{key}' has negative weights, so it is not LPIPS'")
        ours[f"lin.{tap}"] = weight
    return ours


def load_lpips(url: str, device: torch.device | str = "cpu") -> LPIPS:
    """The LPIPS network in eval mode, frozen, on `device`; one UserError line for a missing
    or wrong weights file."""
    if not url:
        raise UserError(f"no LPIPS weights set; {MISSING_HINT}")
    path = _local_path(url)
    lpips = LPIPS()
    try:
        lpips.load_state_dict(_lpips_state(url, _read_state(url, path)))
    except RuntimeError as exc:  # missing keys or mismatched shapes
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"{url} does not fit VGG16 ({reason}); {MISSING_HINT}") from None
    return lpips.eval().requires_grad_(False).to(device)
