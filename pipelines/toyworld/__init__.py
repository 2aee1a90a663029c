"""toyworld: a seeded procedural world of textured subjects, written as real image/video files."""
