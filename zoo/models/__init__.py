"""What the models are: encoders (TinyViT configs by name), the light mask decoder, ClassPromptSAM (encoder + modality
head + class prompt + SAM's prompt encoder and mask decoder), checkpoints, pruned widths, FLOPs, and the one factory
that builds a model from its config."""
