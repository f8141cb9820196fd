"""Backends that are other people's engines: vLLM (``integrations.vllm``, optional extra ``[vllm]``)."""
