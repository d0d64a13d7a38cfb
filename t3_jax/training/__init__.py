"""The retrofit fine-tune: data, the trainer, LoRA."""
