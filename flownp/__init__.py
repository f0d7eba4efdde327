"""FlowNP: flow-matching neural processes on normalised tensors (pure torch; no files, units or HTTP)."""

__version__ = "0.1.0"
