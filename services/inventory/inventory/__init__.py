"""fulfil inventory service."""
