"""fulfil notifications service."""
