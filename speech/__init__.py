"""Audio datasets, soundfile I/O, torchaudio features and spoken-caption synthesis."""
