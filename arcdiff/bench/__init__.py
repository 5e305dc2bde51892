"""Benchmarks that report figures (never timed tests): the engine alone, the HTTP service under a
request mix, and this engine next to diffusers' DDIMPipeline. Each writes a JSON record."""
