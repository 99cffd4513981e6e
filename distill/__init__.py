"""Stage 1 of the pipeline: make a small TinyViT encoder imitate a large one (MedSAM, SAM or LiteMedSAM)."""
