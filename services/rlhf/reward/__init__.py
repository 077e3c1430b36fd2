"""The reward scoring service (RewardService of rlhf.v1)."""
