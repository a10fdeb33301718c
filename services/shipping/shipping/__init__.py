"""fulfil shipping service."""
