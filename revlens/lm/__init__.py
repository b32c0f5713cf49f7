"""Hooked wrappers for real diffusion LMs (LLaDA, Dream) and matched ARMs (Qwen2, LLaMA)."""

from revlens.lm.families import FAMILIES, Family, detect_family, get_family
from revlens.lm.hooked_lm import HookedLM

__all__ = ["FAMILIES", "Family", "HookedLM", "detect_family", "get_family"]
