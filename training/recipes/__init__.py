"""Ray Train recipes (the only part of ``training/`` that imports Ray)."""
