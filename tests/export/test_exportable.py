"""G_ema exported to ONNX (run with onnxruntime) and to a torch.export program gives
PyTorch's images within 1e-4, for several seeds, classes and truncations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from support.tiny import tiny_model_config

from sg2dist.errors import UserError
from sg2dist.export.exportable import ExportableGenerator, export_program, save_onnx, save_pt2
from sg2dist.model import build_networks
from sg2dist.sampling import class_labels, z_from_seeds


def tiny_generator(**overrides: int):
    torch.manual_seed(0)
    G, _ = build_networks(tiny_model_config(**overrides))
    with torch.no_grad():
        for name, param in G.named_parameters():
            if name.endswith("noise_strength"):
                param.fill_(0.5)  # the constant noise must reach the exported image
    return G.eval()


def run_onnx(path: Path, z: torch.Tensor, psi: float, c: torch.Tensor | None = None):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"z": z.numpy(), "psi": np.array(psi, dtype=np.float32)}
    if c is not None:
        feeds["c"] = c.numpy()
    (img,) = session.run(["img"], feeds)
    return img


def test_onnx_export_with_a_dynamic_batch_matches_pytorch(tmp_path: Path) -> None:
    G = tiny_generator()
    path = tmp_path / "g.onnx"
    save_onnx(export_program(G), G, str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)

    for seeds in ([0], [1, 2, 3, 4, 5]):
        z = z_from_seeds(seeds, G.z_dim)
        for psi in (1.0, 0.7, 0.0):
            with torch.no_grad():
                expected = G(z, class_labels(0, None, len(z)), psi, noise_mode="const").numpy()
            np.testing.assert_allclose(run_onnx(path, z, psi), expected, rtol=0, atol=1e-4)


def test_conditional_export_with_a_fixed_batch_no_noise_and_a_cutoff_matches_pytorch(
    tmp_path: Path,
) -> None:
    G = tiny_generator(img_channels=1, c_dim=3)
    program = export_program(G, batch=4, noise_mode="none", truncation_cutoff=2)
    save_onnx(program, G, str(tmp_path / "g.onnx"))
    save_pt2(program, str(tmp_path / "g.pt2"))
    loaded = torch.export.load(str(tmp_path / "g.pt2")).module()

    for seeds, classes in (([0, 1, 2, 3], [0, 1, 2, 1]), ([7, 8, 9, 10], [2, 2, 0, 0])):
        z = z_from_seeds(seeds, G.z_dim)
        c = class_labels(G.c_dim, classes, 4)
        for psi in (1.0, 0.5):
            with torch.no_grad():
                expected = G(z, c, psi, truncation_cutoff=2, noise_mode="none")
                from_pt2 = loaded(z, torch.tensor(psi), c)
            assert expected.shape == (4, 1, 16, 16)
            np.testing.assert_allclose(
                run_onnx(tmp_path / "g.onnx", z, psi, c), expected.numpy(), atol=1e-4, rtol=0
            )
            torch.testing.assert_close(from_pt2, expected, atol=1e-4, rtol=0)
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument):
        run_onnx(tmp_path / "g.onnx", z[:2], 1.0, c[:2])  # the batch is fixed at 4


def test_random_noise_is_not_exported() -> None:
    with pytest.raises(UserError, match="noise mode 'random' cannot be exported.* const .* none"):
        ExportableGenerator(tiny_generator(), noise_mode="random")
