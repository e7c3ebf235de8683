"""lsvcr-dist: distributed training of LSVCR (arXiv 2403.13574) on Ray Train + DeepSpeed."""

__version__ = "0.1.0"
