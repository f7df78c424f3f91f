"""Evaluation of pretrained backbones: checkpoint loading (ours, the original release's, timm's), weighted
k-NN with faiss, and linear probing.

Import submodules explicitly (``from eval import knn_eval``): never ``import eval``, which would shadow the
builtin of the same name.
"""
