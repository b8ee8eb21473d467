"""The pipeline's stages, one script each, run as `python -m stages.<name>` by dvc.yaml."""
