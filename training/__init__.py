"""CogPortrait."""
