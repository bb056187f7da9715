"""Deploying pruned models: a channel-major subgraph planned for one C call (``ubp_model_run``),
standalone or as an ExecuTorch custom operator (XNNPACK runs the rest)."""
