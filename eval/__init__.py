"""The evaluation tools, one folder each: knn, linear, finetune, retrieval, video_seg, attention (with
``visualize_attention``), plus export and the demo's scorecard; ``common`` holds what the tools share
(the backbone flags, the main skeleton, result output). The measuring itself lives below training, in
``dino_train.measure``.

Import submodules explicitly (``from eval.knn import cli``): never ``import eval``, which would shadow the
builtin of the same name.
"""
