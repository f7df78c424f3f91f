"""DINO self-supervised pretraining of Vision Transformers."""
