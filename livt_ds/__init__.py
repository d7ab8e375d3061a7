"""livt-ds: LiVT (masked generative pretraining + Balanced-BCE fine-tuning of ViTs on long-tailed data) on DeepSpeed."""

__version__ = "0.1.0"
