"""batchgen: offline batch generation with LLaMA-family models over Parquet datasets, on Ray."""

__version__ = "0.1.0"
