"""Media I/O: probe, streaming decode, encode, audio, atomic writes."""
