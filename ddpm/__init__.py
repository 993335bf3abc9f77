"""mnist-ddpm: denoising diffusion on MNIST as a plain PyTorch library (no Ray, Prefect or MLflow here)."""

__version__ = "0.1.0"
