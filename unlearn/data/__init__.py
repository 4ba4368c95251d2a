"""Records and their per-element weights: token spans of concept names (MLLMs), pixel masks (SD)."""
