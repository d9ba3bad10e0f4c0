"""megatron-ultramem: UltraMem ultra-sparse memory layers for Megatron-Core."""

__version__ = "0.1.0"
