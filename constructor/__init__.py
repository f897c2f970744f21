"""constructor package."""
