"""G_ema as one exportable graph: (z, psi[, c]) -> image.

Inputs: `z` float32 [N, z_dim] (seed s gives `np.random.RandomState(s).randn(z_dim)`, as
everywhere in sg2dist), `psi` float32 [] (truncation: 1 none, 0.7 typical, 0 the average
image) and, for a conditional model only, `c` float32 [N, c_dim] (one-hot class). Output:
`img` float32 [N, C, R, R] in about [-1, 1] (x 127.5 + 128, clamped, gives uint8 pixels).
N is fixed at export time or dynamic. The noise is the checkpoint's constant noise or none
(random noise is not exported: an ONNX runtime's random numbers could never match torch's,
so images would not be reproducible). The graph is traced with torch.export once; ONNX
files come from torch's ONNX exporter (it needs the `onnx` and `onnxscript` packages) and
are checked with onnx's checker.
"""

from __future__ import annotations

import copy
import importlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from sg2dist.errors import UserError

if TYPE_CHECKING:
    from sg2dist.model import Generator

EXPORT_NOISE_MODES = ("const", "none")
EXAMPLE_BATCH = 2  # a dynamic batch is traced with 2 (torch.export specialises 0 and 1)
ONNX_OPSET = 18
ONNX_PACKAGES = ("onnx", "onnxscript")


class ExportableGenerator(nn.Module):
    """G_ema's mapping + truncation + synthesis with only tensor inputs and no branches on
    their values. Truncation is always applied (psi = 1 changes ws by float rounding only)
    to the first `truncation_cutoff` ws (all when None)."""

    def __init__(
        self, G: Generator, *, noise_mode: str = "const", truncation_cutoff: int | None = None
    ) -> None:
        super().__init__()
        if noise_mode not in EXPORT_NOISE_MODES:
            raise UserError(
                f"noise mode '{noise_mode}' cannot be exported: an exported model's random "
                "numbers would not be torch's, so images would not be reproducible; "
                "use const (the model's own noise) or none"
            )
        self.G = copy.deepcopy(G).eval().requires_grad_(False).cpu()
        self.noise_mode = noise_mode
        self.cutoff = G.num_ws if truncation_cutoff is None else truncation_cutoff

    def forward(self, z: torch.Tensor, psi: torch.Tensor, c: torch.Tensor | None = None):
        G = self.G
        if c is None:
            c = z.new_zeros([z.shape[0], 0])
        ws = G.mapping(z, c)
        truncated = G.mapping.w_avg.lerp(ws[:, : self.cutoff], psi)
        ws = torch.cat([truncated, ws[:, self.cutoff :]], dim=1)
        # The non-fused modulated convolution: the fused one folds the batch into the groups
        # of a grouped convolution, which an ONNX graph cannot keep dynamic.
        return G.synthesis(ws, noise_mode=self.noise_mode, fused_modconv=False)


def example_inputs(G: Generator, batch: int) -> tuple[torch.Tensor, ...]:
    """(z, psi[, c]) of the right shapes for tracing."""
    z = torch.randn([batch, G.z_dim], generator=torch.Generator().manual_seed(0))
    psi = torch.tensor(0.7)
    if G.c_dim == 0:
        return z, psi
    return z, psi, torch.eye(G.c_dim)[torch.arange(batch) % G.c_dim]


def input_names(G: Generator) -> list[str]:
    return ["z", "psi"] if G.c_dim == 0 else ["z", "psi", "c"]


def export_program(
    G: Generator,
    *,
    batch: int | None = None,
    noise_mode: str = "const",
    truncation_cutoff: int | None = None,
) -> torch.export.ExportedProgram:
    """G_ema traced by torch.export, on the CPU; `batch` None = any batch size."""
    module = ExportableGenerator(G, noise_mode=noise_mode, truncation_cutoff=truncation_cutoff)
    args = example_inputs(G, batch or EXAMPLE_BATCH)
    dynamic_shapes = None
    if batch is None:
        N = torch.export.Dim("batch", min=1)
        dynamic_shapes = {"z": {0: N}, "psi": None}
        if G.c_dim > 0:
            dynamic_shapes["c"] = {0: N}
    try:
        with torch.no_grad():
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise UserError(f"G_ema could not be traced for export ({_first_line(exc)})") from None


def require_onnx() -> None:
    """One clear error when the optional ONNX packages are missing."""
    for package in ONNX_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(
                f"--format onnx needs the '{package}' package, which is not installed; "
                "pip install 'sg2dist[onnx]' (or: pip install onnx onnxscript)"
            ) from None


def save_onnx(program: torch.export.ExportedProgram, G: Generator, path: str) -> None:
    """Write the program as an ONNX file at the local `path` and check it with onnx's checker."""
    require_onnx()
    import onnx

    try:
        torch.onnx.export(
            program,
            (),
            path,
            input_names=input_names(G),
            output_names=["img"],
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
            # onnxscript's graph optimizer (0.7) rewrites the fixed-batch graph into one that
            # computes other images (a test compares with PyTorch); onnxruntime optimises
            # the graph itself when it loads it.
            optimize=False,
        )
    except Exception as exc:
        raise UserError(f"G_ema could not be converted to ONNX ({_first_line(exc)})") from None
    model = onnx.load(path)
    _name_batch_dimension(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def _name_batch_dimension(model) -> None:
    """Call the exporter's symbolic batch dimension (e.g. 's20') 'batch' everywhere."""
    graph = model.graph
    symbolic = {dim.dim_param for dim in graph.input[0].type.tensor_type.shape.dim[:1]}
    symbolic.discard("")
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbolic:
                dim.dim_param = "batch"


def save_pt2(program: torch.export.ExportedProgram, path: str) -> None:
    """Write the program as a torch.export archive (`torch.export.load(path).module()`)."""
    torch.export.save(program, path)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:300]}"
