"""fulfil order-intake service."""
