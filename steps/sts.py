"""Steps for this product (being written)."""
