"""From an image back to the generator's latent space, and the perceptual distance it needs.

    lpips.py      LPIPS (VGG16 features + the LPIPS linear weights) as a feature map whose
                  squared Euclidean distance is the LPIPS distance; loaded from a weights
                  file (local or s3://), never downloaded
    projector.py  the projection of a target image into W (or W+): LPIPS distance plus noise
                  regularisation, Adam with a learning-rate ramp, as the official projector

The perceptual path length metric (sg2dist/metrics.py) uses the same LPIPS network.
Nothing here knows about checkpoints, configs, training or MLflow.
"""
