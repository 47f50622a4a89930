"""Fine-tuning: data reading and tokenizing, batch plans, the training loop, checkpoints, DDP ranks, reports."""
