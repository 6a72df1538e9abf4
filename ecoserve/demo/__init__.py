"""`ecoserve demo`, the main job: the offline engine, then a local cluster serving a slice of a real trace."""
