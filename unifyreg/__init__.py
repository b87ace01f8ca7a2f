"""unifyreg: entropy probes and a contextual-prediction regularizer for UMMs."""

__version__ = "0.1.0"
