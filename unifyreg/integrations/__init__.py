"""Integrations with trainers other than Lightning (``hf``: the Hugging Face ``Trainer``)."""
