"""Distillation: losses (``train.distill.losses``) and the Ray Train + DeepSpeed job."""
