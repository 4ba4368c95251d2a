"""The forgetting audit of an MLLM run: removed or hidden (see :mod:`.base`)."""
