"""Local stand-ins for production services, for the embedded default and the tests."""
