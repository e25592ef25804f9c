"""calfuse_jax: class-incremental learning with frozen CLIP, a calibration gate and QR fusion.

Pure functions for ablations live in `calibration`, `fusion`, `stats`, `losses` and `metrics`;
`clip` loads and runs the frozen encoders; `continual.run_continual` drives a whole task stream.
Submodules are imported on demand so that `import calfuse_jax` stays cheap.
"""

__version__ = "0.1.0"
