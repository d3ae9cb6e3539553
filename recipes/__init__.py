"""Recipes for torchtitan and Megatron-LM generated from our presets (see recipes/README.md)."""
