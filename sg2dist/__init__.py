"""sg2dist: distributed StyleGAN2 training with object storage, MLflow and Kubernetes."""

__version__ = "0.1.0"
