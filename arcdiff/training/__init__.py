"""Offline tooling that makes models: the training loop, data loading and distillation.

It may import the method (`arcdiff.model`); nothing that serves (service, worker, contract, client)
imports it. The `arcdiff train` and `arcdiff distill` commands are its entry points."""
