"""The core: requests, scheduling, KV memory, the model runner and sampling. No HTTP here.

Kept import-light on purpose: importing `server.engine.scheduler` must not import torch.
"""
