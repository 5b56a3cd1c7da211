"""Skill tasks with automatic scorers (SQL, Python, JSON extraction) and LoRA training
of skill adapters on the base model."""
