"""nextword.weights."""
