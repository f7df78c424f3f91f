"""eval_finetune: end-to-end fine-tuning with layer-wise lr decay."""
