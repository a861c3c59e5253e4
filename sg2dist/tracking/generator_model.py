"""G_ema as an MLflow pyfunc model: seeds or z and truncation psi -> uint8 images.

The weights travel as a tensor file plus the ModelConfig JSON, so loading the model
unpickles no code; the sg2dist package is shipped with it (code_paths), so it loads
where sg2dist is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from sg2dist.config import ModelConfig
from sg2dist.sampling import one_hot, to_uint8, z_from_seeds

if TYPE_CHECKING:
    from sg2dist.model import Generator


GENERATOR_MODEL_NAME = "generator"  # the name of the logged model in its run


class GeneratorModel(PythonModel):
    """pyfunc wrapper of G_ema: one row per image, columns `seed` or `z`, optional `psi`
    (truncation, default 1) and `class_idx` (conditional models); returns uint8 images
    [N, H, W, C]. z for a seed is `np.random.RandomState(seed).randn(z_dim)`."""

    def load_context(self, context: Any) -> None:
        from sg2dist.model import build_networks

        model_cfg = ModelConfig(**json.loads(Path(context.artifacts["model_config"]).read_text()))
        G, _ = build_networks(model_cfg)
        G.load_state_dict(
            torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.G = G.eval().requires_grad_(False).to(self.device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        return _generate_images(self.G, model_input, params or {}, self.device)


def _latents_from_rows(G: Generator, rows: Any) -> np.ndarray:
    if "z" in rows.columns and rows["z"].notna().all():
        z = np.stack([np.asarray(z_row, dtype=np.float64) for z_row in rows["z"]])
        if z.shape[1] != G.z_dim:
            raise ValueError(f"z has {z.shape[1]} values per row; this generator takes {G.z_dim}")
        return z
    if "seed" not in rows.columns:
        raise ValueError("give one column 'seed' (int) or 'z' (list of floats) per image")
    return z_from_seeds([int(seed) for seed in rows["seed"]], G.z_dim).numpy()


def _generate_images(
    G: Generator, rows: Any, params: dict[str, Any], device: torch.device
) -> np.ndarray:
    z = torch.from_numpy(_latents_from_rows(G, rows)).float().to(device)
    psi = rows["psi"].fillna(1.0).to_numpy() if "psi" in rows.columns else np.ones(len(rows))
    class_idx = torch.zeros(len(rows), dtype=torch.int64)
    if G.c_dim > 0:
        if "class_idx" not in rows.columns:
            raise ValueError(
                f"this generator is conditional: add a column 'class_idx' in 0..{G.c_dim - 1}"
            )
        class_idx = torch.as_tensor(rows["class_idx"].to_numpy().copy())
    c = one_hot(class_idx.to(device), G.c_dim)
    noise_mode = params.get("noise_mode", "const")
    images = []
    with torch.no_grad():
        # Rows may ask for different psi values: one forward per distinct psi.
        for value in np.unique(psi):
            index = torch.from_numpy(np.flatnonzero(psi == value)).to(device)
            img_NCHW = G(z[index], c[index], truncation_psi=float(value), noise_mode=noise_mode)
            images.append((index, img_NCHW))
    img_NCHW = torch.empty(len(rows), *images[0][1].shape[1:], device=device)
    for index, part in images:
        img_NCHW[index] = part.float()
    return to_uint8(img_NCHW)


def _generator_signature(model_cfg: ModelConfig) -> ModelSignature:
    columns: list[ColSpec | TensorSpec] = [
        ColSpec("long", "seed", required=False),
        ColSpec(Array("double"), "z", required=False),
        ColSpec("double", "psi", required=False),
    ]
    if model_cfg.c_dim > 0:
        columns.append(ColSpec("long", "class_idx", required=False))
    res, channels = model_cfg.resolution, model_cfg.img_channels
    return ModelSignature(
        inputs=Schema(columns),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, res, res, channels))]),
        params=ParamSchema([ParamSpec("noise_mode", "string", "const")]),
    )


def log_generator_model(
    G_ema: torch.nn.Module,
    model_cfg: ModelConfig,
    run_id: str,
    tracking_uri: str,
    *,
    register_name: str = "",
) -> str:
    """Log G_ema to `run_id` as the pyfunc model 'generator'; returns its model URI."""
    example = pd.DataFrame({"seed": [0, 1], "psi": [1.0, 0.7]})
    if model_cfg.c_dim > 0:
        example["class_idx"] = [0, 0]
    with tempfile.TemporaryDirectory(prefix="sg2dist-generator-") as tmp:
        weights = Path(tmp, "generator.pt")
        torch.save({k: v.detach().cpu() for k, v in G_ema.state_dict().items()}, weights)
        config_file = Path(tmp, "model_config.json")
        config_file.write_text(json.dumps(dataclasses.asdict(model_cfg)))
        mlflow.set_tracking_uri(tracking_uri)  # Model.log reads the process-wide URI
        # ... and files the model under the process-wide experiment ("Default" unless set),
        # not the run's: set it, so the model shows (and is found) with its run.
        run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
        mlflow.set_experiment(experiment_id=run.info.experiment_id)
        info = Model.log(
            artifact_path=None,
            name=GENERATOR_MODEL_NAME,
            flavor=mlflow.pyfunc,
            python_model=GeneratorModel(),
            artifacts={"weights": str(weights), "model_config": str(config_file)},
            code_paths=[str(Path(__file__).resolve().parents[1])],  # loads without sg2dist
            signature=_generator_signature(model_cfg),
            input_example=example,
            pip_requirements=["torch", "numpy", "pandas", "pyyaml"],
            registered_model_name=register_name or None,
            run_id=run_id,
        )
    return info.model_uri
