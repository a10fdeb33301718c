"""fulfil kpi service."""
