"""nextword.client."""
