"""deepeyesv2: a lean, kernel-first RL trainer for agentic multimodal models (DeepEyesV2 recipe)."""

__version__ = "0.1.0"
