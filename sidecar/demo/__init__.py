"""The zero-install demo: a fake AI gateway, traffic, and a live terminal table."""
