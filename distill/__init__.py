"""Stage 1 of the pipeline: make a small TinyViT encoder imitate a large one (MedSAM, SAM or LiteMedSAM)."""

import zoo  # noqa: F401  first, for its Ctrl-C start-up guard (zoo.interrupts)
