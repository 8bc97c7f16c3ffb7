"""Training loops and presets that drive routed layers and the recorder (nanoGPT-sized, byte-level)."""
