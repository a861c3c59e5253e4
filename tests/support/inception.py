"""A stand-in for torch-fidelity's Inception weights file.

The real weights (weights-inception-2015-12-05-6726825d.pth, 95,628,359 bytes) cannot be
downloaded on the test machines. Tests build their own weights file: torch-fidelity's
FeatureExtractorInceptionV3, randomly initialised with a fixed seed, saved as a state dict and
passed as `inception_weights` exactly like a real copy. Scores are then not comparable with
published FIDs, but all the plumbing (loading, features, caching, statistics) is real.
"""

import pytest
import torch
from torch import nn
from torch_fidelity import FeatureExtractorInceptionV3


class _ArchitectureOnly(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its random initial weights (loading is skipped)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "nothing.pt")
    torch.manual_seed(0)
    extractor = _ArchitectureOnly(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "nothing.pt")
    )
    for module in extractor.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(extractor.state_dict(), folder / "random-inception.pth")
    return str(folder / "random-inception.pth")
