"""The revisions of imagegen's one schema history (a package, so the wheel ships them)."""
