"""G_ema as a file that runs without sg2dist: ONNX (any ONNX runtime) or a torch.export
program (.pt2).

`exportable.py` wraps mapping and synthesis into one graph with truncation psi as an input
and the noise fixed (the model's constant noise, or none), traces it once with
torch.export (fixed or dynamic batch), and writes it. The MLflow pyfunc model is
sg2dist/tracking/generator_model.py. Nothing here knows about checkpoints or MLflow.
"""
