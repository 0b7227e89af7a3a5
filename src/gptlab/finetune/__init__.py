"""Fine-tuning stages built on the one training loop (``gptlab.train.train``)."""
