"""Multi-turn tool rollouts: engines (embedded with prefix-KV reuse, SGLang), tools, episode loop.

Installed as ``deepeyesv2_rollout``. Does not import ``deepeyesv2``: models, processors and
sampling parameters are passed in.
"""

__version__ = "0.1.0"
