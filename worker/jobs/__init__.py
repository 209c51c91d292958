"""Saved jobs: versioned definitions with typed options, data passed between steps and conditions."""
