"""telemed-gateway: telemedicine partners' orders in, PharmaOne Manager order requests out."""

__version__ = "0.1.0"
