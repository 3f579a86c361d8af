"""Thin adapters for file formats and model families: PEFT adapter folders, Hugging Face model folders, GPT-2."""
