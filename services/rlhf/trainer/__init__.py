"""The trainer service (TrainerService of rlhf.v1): feedback becomes a durable dataset and gated reward-model versions."""
