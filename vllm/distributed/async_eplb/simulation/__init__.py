"""Simulation helpers: a toy expert-parallel MoE model and the load simulator.

Importable with torch and numpy alone (no vLLM).
"""
