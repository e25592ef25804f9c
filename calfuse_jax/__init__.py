"""calfuse_jax: class-incremental learning with frozen CLIP, a calibration gate and QR fusion."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_classifier":  # imported on first use, like the submodules
        from calfuse_jax.classifier import load_classifier

        return load_classifier
    raise AttributeError(f"module 'calfuse_jax' has no attribute {name!r}")
