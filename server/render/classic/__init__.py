"""CPU backend: landmark paste, relighting and harmonisation without generative weights."""
