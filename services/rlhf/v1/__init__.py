"""Generated stubs of the rlhf.v1 API (protos/generate.py). Do not edit."""
