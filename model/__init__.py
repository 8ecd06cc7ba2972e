"""Strata's model: plain PyTorch, no process groups (parallel/ shards it from outside)."""
from model.config import AttentionConfig, MambaConfig, MLPConfig, ModelConfig
from model.hybrid import HybridLM

__all__ = ["AttentionConfig", "HybridLM", "MLPConfig", "MambaConfig", "ModelConfig"]
