"""The FlowNP core: pure torch (and torchdiffeq) on normalised tensors; no files, units or HTTP.
It imports nothing of the project outside `flownp.core`."""
