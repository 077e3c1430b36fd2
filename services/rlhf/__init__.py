"""The RLHF platform: policy inference, reward scoring, feedback collection and a PPO trainer.

Subpackages:
    rlhf.v1        generated protobuf / gRPC stubs of the rlhf.v1 API (protos/generate.py)
    rlhf.core      torch + transformers only: models, generation, losses, GAE, KL, trainers, the demo task
    rlhf.bus       the message bus interface; Kafka and in-process implementations
    rlhf.cache     the cache interface; Redis and in-process implementations
    rlhf.serving   gRPC server plumbing shared by every service
    rlhf.feedback  the feedback collection service
"""

__version__ = "0.1.0"
