"""megatron-ultramem: UltraMem ultra-sparse memory layers for Megatron-Core."""

from .compat import check_version as _check_version

__version__ = "0.1.0"

_check_version()  # warns once on an untested megatron-core release
