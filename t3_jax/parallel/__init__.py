"""Meshes, logical axis rules, and how a model's activations are laid out over devices."""
