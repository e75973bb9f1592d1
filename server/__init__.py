"""nextword.server."""
