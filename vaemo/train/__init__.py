"""Training: one loop for Stage 1 and Stage 2, and the Stage 1 entry point."""
