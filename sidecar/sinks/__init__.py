"""Event sinks: each drains its own bounded queue in a background task."""
