"""Instruction data: loading, prompt template, tokenization, the built-in synthetic suite."""
