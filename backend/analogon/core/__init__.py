"""What several methods share: images and maps, edit-map schedules, diffusion building blocks,
inversions, attention processors, CLIP embeddings and the cache of per-image work."""
