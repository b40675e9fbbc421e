"""The data side of a job: the YAML spec, input shards and prompts, and the Parquet output."""
