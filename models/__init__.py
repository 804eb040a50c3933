"""Models that diffusers does not ship (the VidRD UNet port)."""

__all__: list[str] = []
